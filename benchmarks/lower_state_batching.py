"""Would batching the lower-layer states of new texts keep runs exact, and would it pay?

The lower-state store (``adaptkit.model.lower_states``) computes each new text alone, so that a text's
states never depend on what it was batched with (a resumed run fills the store in another order). This
probe checks, on this machine, the rule a batched fill would need: with a fixed batch shape (``B`` rows
padded to ``W`` tokens), is a text's result the same whatever its neighbours and its row? And it times
``B`` texts computed alone against one batched pass, for short (easy-VQA-like) and long (instruction-like)
texts, with the default recipe's LM (SmolLM2, entry layer 20).

    python benchmarks/lower_state_batching.py
"""

from __future__ import annotations

import json
import os
import random
import time

import torch

from adaptkit.model import build_model
from adaptkit.recipes import load_recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (text length, padded width, rows per pass)
SHAPES = [(14, 16, 8), (37, 48, 8), (120, 128, 4), (200, 208, 8)]


def main() -> None:
    torch.manual_seed(0)
    recipe = load_recipe("recipes/easyvqa_qformer_lora.yaml", ["compile=false"])
    model = build_model(recipe, torch.device("cpu")).eval()
    embedding = model.base_lm.get_input_embeddings()
    store = model.fusion._store(1024, keep_kv=False, evict=False)
    lead = store._lead_embeds
    n_lead = lead.shape[1]
    rng = random.Random(0)

    def batched(texts: list[list[int]], width: int) -> list[torch.Tensor]:
        ids = torch.zeros(len(texts), width, dtype=torch.long)
        mask = torch.zeros(len(texts), n_lead + width, dtype=torch.long)
        mask[:, :n_lead] = 1
        for i, t in enumerate(texts):
            ids[i, : len(t)] = torch.tensor(t)
            mask[i, n_lead : n_lead + len(t)] = 1
        with torch.no_grad():
            states, _ = store._run(torch.cat([lead.expand(len(texts), -1, -1), embedding(ids)], 1), mask)
        return [states[i, n_lead : n_lead + len(t)] for i, t in enumerate(texts)]

    for length, width, rows in SHAPES:
        texts = [
            [rng.randrange(1000, 40000) for _ in range(rng.randint(max(1, length - 5), length))]
            for _ in range(3 * rows)
        ]
        target = texts[0]
        ref = batched([target, *texts[1:rows]], width)[0]
        independent = True
        for _ in range(4):  # other neighbours, another row
            others, pos = rng.sample(texts[1:], rows - 1), rng.randrange(rows)
            independent &= torch.equal(batched([*others[:pos], target, *others[pos:]], width)[pos], ref)
        alone = store._compute(tuple(target), embedding)[0]
        start = time.perf_counter()
        for t in texts[:rows]:
            store._compute(tuple(t), embedding)
        alone_s = time.perf_counter() - start
        start = time.perf_counter()
        batched(texts[:rows], width)
        batched_s = time.perf_counter() - start
        print(
            json.dumps(
                {
                    "tokens": length,
                    "width": width,
                    "rows": rows,
                    "same_whatever_the_neighbours": independent,
                    "equals_computed_alone": torch.equal(alone, ref),
                    "max_diff_from_alone": float((alone - ref).abs().max()),
                    "alone_s": round(alone_s, 3),
                    "batched_s": round(batched_s, 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
