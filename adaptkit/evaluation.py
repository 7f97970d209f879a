"""Evaluation machinery shared by tasks: greedy generation over a dataset, sharded over processes.

A task's ``evaluate`` (``adaptkit.tasks``) calls :func:`generate_texts` through :func:`on_shards` and
scores the result with its metric (``adaptkit.metrics``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from adaptkit.data.collate import collate_prompts


@torch.no_grad()
def generate_texts(
    model,
    dataset,
    features,
    batch_size: int = 64,
    max_new_tokens: int = 5,
    progress: bool = True,
    desc: str = "evaluating",
) -> tuple[list[str], list[float]]:
    """Greedy texts (and their probabilities) for every sample of ``dataset``, in order.

    Batches are made of prompts of similar length (the samples sorted by prompt length, the texts put
    back in dataset order), so left padding costs little.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["prompt"]))
    loader = DataLoader(
        Subset(dataset, order),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=lambda items: collate_prompts(items, model.tokenizer.pad_token_id),
    )
    device = model.base_lm.get_input_embeddings().weight.device
    texts: list[str] = [""] * len(dataset)
    scores: list[float] = [0.0] * len(dataset)
    done = 0
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        feats = features.lookup(batch["image"])
        got, probs = model.generate(
            feats, batch["input_ids"].to(device), batch["attention_mask"].to(device), max_new_tokens
        )
        for i, text, prob in zip(order[done : done + len(got)], got, probs):
            texts[i], scores[i] = text, prob
        done += len(got)
    model.train(was_training)
    return texts, scores


def on_shards(run: Callable[[Sequence[int]], tuple[list, ...]], n: int, accelerator=None) -> tuple[list, ...]:
    """``run(indices)`` for all ``n`` samples: with an ``accelerator`` of several processes each process
    runs every N-th index and the results are gathered back in index order, so every process returns
    the same lists. ``run`` returns a tuple of lists, one entry per index."""
    if accelerator is None or accelerator.num_processes <= 1:
        return run(list(range(n)))
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    shard = list(range(rank, n, world))
    got = run(shard)
    gathered = gather_object([list(zip(shard, *got))])
    ordered = sorted((row for part in gathered for row in part), key=lambda row: row[0])
    return tuple([row[k + 1] for row in ordered] for k in range(len(got)))
