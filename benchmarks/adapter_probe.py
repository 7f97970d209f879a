"""How far can the fusion adapter alone answer the questions? A diagnostic, not a training recipe.

Trains the recipe's adapter (Q-Former) plus the answer-classification head of ``objectives.classify``
directly on the answers, with no language model in the loop (only its token embeddings, which the
text-conditioned adapter reads), and reports answer accuracy on a slice of the eval split, overall and
on yes/no questions, alongside the text-only prior: the accuracy of answering each yes/no question
with its most frequent training answer. This separates "the adapter cannot get the signal through
the frozen LM" from "the task is slow to learn for the adapter itself".

    python benchmarks/adapter_probe.py --steps 500
    python benchmarks/adapter_probe.py --steps 500 adapter.qformer.num_layers=4
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from collections import Counter, defaultdict
from dataclasses import replace

import torch
import torch.nn.functional as F

from adaptkit.data.collate import answer_vocab, collate_train
from adaptkit.data.feature_cache import FeatureCache
from adaptkit.data.splits import feature_cache_root, prepare_split
from adaptkit.model import build_model
from adaptkit.recipes import load_recipe
from adaptkit.tasks import get_task

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def text_only_prior(train, test) -> float:
    """Accuracy on yes/no test questions of the majority training answer for the same question text."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for s in train:
        if s.answer in ("yes", "no"):
            counts[s.question][s.answer] += 1
    yes_no = [s for s in test if s.answer in ("yes", "no")]
    hits = sum(
        1 for s in yes_no if counts[s.question] and counts[s.question].most_common(1)[0][0] == s.answer
    )
    return hits / max(1, len(yes_no))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. adapter.qformer.num_layers=4")
    parser.add_argument("--recipe", default="recipes/easyvqa_qformer_lora.yaml")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--eval-limit", type=int, default=2000)
    parser.add_argument("--evals", type=int, default=5, help="evaluations spread over the steps")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe, [*args.overrides, "lora.enabled=false"])
    torch.manual_seed(recipe.seed)
    only_classify = replace(recipe.objectives, lm=0.0, classify=1.0)  # no LM in the loop
    recipe = replace(recipe, objectives=only_classify)
    task = get_task(recipe)
    model = build_model(recipe)
    root = feature_cache_root(recipe.feature_cache_dir)
    cache = FeatureCache.for_backbone(root, model.vision, "cpu", model.feature_dtype) if root else None
    split = functools.partial(
        prepare_split,
        task,
        model,
        device="cpu",
        progress=False,
        cache_root=cache,
    )
    train, train_feats, _ = split(recipe.data.train)
    test, test_feats, _ = split(recipe.data.eval, limit=args.eval_limit)
    model.adapter.set_feature_stats(*train_feats.stats())
    task.setup_objectives(model, train)
    head = model.objectives.heads["classify"]
    vocab = answer_vocab([s.answer for s in train.samples], recipe.objectives.classify_max_answers)
    test.set_answer_vocab(vocab)
    embed = model.base_lm.get_input_embeddings()
    params = list(model.adapter.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.lr_adapter, weight_decay=recipe.weight_decay)
    pad = model.tokenizer.pad_token_id
    yes_no_ids = {vocab.index(a) for a in ("yes", "no") if a in vocab}

    def logits(ds, feats, rows):
        batch = collate_train([ds[i] for i in rows], pad)
        prompt_mask = batch["attention_mask"] * (batch["labels"] == -100)
        soft = model.adapter(feats.lookup(batch["image"]), embed(batch["input_ids"]), prompt_mask)
        return head(soft), batch["answer_class"]

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        hit = total = yn_hit = yn_total = 0
        for start in range(0, len(test), 256):
            pred, gold = logits(test, test_feats, range(start, min(len(test), start + 256)))
            right = pred.argmax(-1) == gold
            is_yes_no = torch.tensor([int(c) in yes_no_ids for c in gold])
            hit, total = hit + int(right.sum()), total + len(gold)
            yn_hit, yn_total = yn_hit + int((right & is_yes_no).sum()), yn_total + int(is_yes_no.sum())
        model.train()
        return {"accuracy": hit / total, "accuracy_yes_no": yn_hit / max(1, yn_total)}

    generator = torch.Generator().manual_seed(recipe.seed)
    every = max(1, args.steps // args.evals)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        rows = torch.randint(len(train), (recipe.batch_size,), generator=generator).tolist()
        pred, gold = logits(train, train_feats, rows)
        loss = F.cross_entropy(pred, gold, ignore_index=-100)
        warm = min(1.0, step / max(1, recipe.warmup_steps))
        for group in optimizer.param_groups:  # the recipe's warmup + cosine, over --steps
            group["lr"] = recipe.lr_adapter * warm * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        loss.backward()
        if recipe.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % every == 0 or step == args.steps:
            row = {"step": step, **evaluate(), "seconds": round(time.perf_counter() - started, 1)}
            print(json.dumps(row), flush=True)
    prior = text_only_prior(train.samples, test.samples)
    print(json.dumps({"steps": args.steps, "text_only_yes_no_prior": round(prior, 4), **evaluate()}))


if __name__ == "__main__":
    main()
