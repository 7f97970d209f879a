"""``adaptkit check-quant``: how far a 8-bit / 4-bit backbone's outputs are from full precision.

Run before training to see whether quantizing a frozen backbone costs anything on *your* data:

- language model: on the recipe's prompts + answers (template applied, teacher-forced), the KL
  divergence of the quantized LM's next-token distribution from the full-precision one, the top-1
  agreement, and the KL at answer positions alone (the ones the loss trains);
- vision backbone (``vision.family: hf``): the cosine similarity of every image token's feature.

Weights' memory (``get_memory_footprint``) is reported next to each, so the trade is visible.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from adaptkit.backbones.language import load_language_model
from adaptkit.backbones.vision import build_vision_backbone
from adaptkit.data.encoding import encode_images
from adaptkit.data.images import open_image
from adaptkit.data.splits import subset
from adaptkit.perf import significant
from adaptkit.tasks import get_task

if TYPE_CHECKING:
    from adaptkit.config import Recipe

log = logging.getLogger(__name__)


def _levels(recipe_level: str, requested: list[str] | None) -> list[str]:
    if requested:
        return requested
    return [recipe_level] if recipe_level != "none" else ["8bit", "4bit"]


def _footprint_mb(model: torch.nn.Module) -> float:
    if hasattr(model, "get_memory_footprint"):
        return round(model.get_memory_footprint() / 2**20, 1)
    return round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1)


@torch.no_grad()
def _lm_outputs(model, batches: list[dict]) -> list[torch.Tensor]:
    return [model(**{k: v for k, v in b.items() if k != "answer_mask"}).logits.float() for b in batches]


def check_language(recipe: Recipe, samples, levels: list[str], device, batch_size: int = 16) -> list[dict]:
    """Compare the recipe's LM in full precision with each quantization level."""
    full, tokenizer = load_language_model(replace(recipe.language, quant="none"), device)
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        pairs = get_task(recipe).text_pairs(chunk, tokenizer)
        prompts = [p for p, _ in pairs]
        texts = [p + t + tokenizer.eos_token for p, t in pairs]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        prompt_lens = [len(x) for x in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        answer_mask = torch.zeros_like(enc["attention_mask"], dtype=torch.bool)
        for row, n in enumerate(prompt_lens):
            # position t predicts token t+1: answer tokens start at index n, predicted from n-1.
            answer_mask[row, n - 1 : int(enc["attention_mask"][row].sum()) - 1] = True
        batches.append({**{k: v.to(device) for k, v in enc.items()}, "answer_mask": answer_mask.to(device)})
    reference = _lm_outputs(full, batches)
    full_mb = _footprint_mb(full)
    del full
    rows = []
    for level in levels:
        start = time.perf_counter()
        quant, _ = load_language_model(replace(recipe.language, quant=level), device)
        outputs = _lm_outputs(quant, batches)
        kls, answer_kls, agree, n = [], [], 0, 0
        for batch, ref, out in zip(batches, reference, outputs):
            valid = batch["attention_mask"].bool()
            p_log, q_log = ref.log_softmax(-1), out.log_softmax(-1)
            kl = (p_log.exp() * (p_log - q_log)).sum(-1)  # KL(full || quantized) per position
            kls.append(kl[valid])
            answer_kls.append(kl[batch["answer_mask"]])
            agree += int((ref.argmax(-1) == out.argmax(-1))[valid].sum())
            n += int(valid.sum())
        rows.append(
            {
                "backbone": "language",
                "name": recipe.language.name,
                "quant": level,
                "compute_dtype": recipe.language.compute_dtype,
                "samples": len(samples),
                "tokens": n,
                "kl_mean": significant(torch.cat(kls).mean().item()),
                "kl_answer_mean": significant(torch.cat(answer_kls).mean().item()),
                "top1_agreement": round(agree / n, 4),
                "memory_mb": _footprint_mb(quant),
                "full_precision_memory_mb": full_mb,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        del quant
    return rows


def check_vision(recipe: Recipe, samples, levels: list[str], device) -> list[dict]:
    """Compare the recipe's vision backbone in full precision with each quantization level."""
    if recipe.vision.family != "hf":
        return [
            {
                "backbone": "vision",
                "name": recipe.vision.name,
                "quant": "none",
                "note": f"{recipe.vision.family} backbones are not quantized (convolutions / fused "
                "attention); bitsandbytes 8/4-bit applies to vision.family=hf",
            }
        ]
    paths = list(dict.fromkeys(s.image for s in samples))
    images = [open_image(p) for p in paths]
    full = build_vision_backbone(replace(recipe.vision, quant="none"), device)
    reference = encode_images(full, images, device)
    full_mb = _footprint_mb(full)
    del full
    rows = []
    for level in levels:
        start = time.perf_counter()
        quant = build_vision_backbone(replace(recipe.vision, quant=level), device)
        feats = encode_images(quant, images, device)
        cos = F.cosine_similarity(reference.flatten(0, 1), feats.flatten(0, 1), dim=-1)
        rows.append(
            {
                "backbone": "vision",
                "name": recipe.vision.name,
                "quant": level,
                "compute_dtype": recipe.vision.compute_dtype,
                "images": len(images),
                "feature_cosine_mean": significant(cos.mean().item()),
                "feature_cosine_min": significant(cos.min().item()),
                "memory_mb": _footprint_mb(quant),
                "full_precision_memory_mb": full_mb,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        del quant
    return rows


def check_quant(
    recipe: Recipe, samples: int = 64, levels: list[str] | None = None, device: torch.device | str = "cpu"
) -> list[dict]:
    """Rows of figures for the LM and the vision backbone at each quantization level."""
    data = get_task(recipe).load(recipe.data.train, recipe.data.on_bad_sample)
    chosen = subset(data.samples, samples, seed=recipe.seed)
    rows = check_language(recipe, chosen, _levels(recipe.language.quant, levels), device)
    rows += check_vision(recipe, chosen, _levels(recipe.vision.quant, levels), device)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        head = f"{row['backbone']:8s} {row['quant']:5s} {row['name']}"
        if "note" in row:
            lines.append(f"{head}: {row['note']}")
        elif row["backbone"] == "language":
            lines.append(
                f"{head}: KL {row['kl_mean']:.4f} (answers {row['kl_answer_mean']:.4f}), top-1 agreement "
                f"{100 * row['top1_agreement']:.1f}% over {row['tokens']} tokens; weights "
                f"{row['memory_mb']} MB vs {row['full_precision_memory_mb']} MB"
            )
        else:
            lines.append(
                f"{head}: feature cosine mean {row['feature_cosine_mean']:.4f} (min "
                f"{row['feature_cosine_min']:.4f}) over {row['images']} images; weights "
                f"{row['memory_mb']} MB vs {row['full_precision_memory_mb']} MB"
            )
    return "\n".join(lines)
