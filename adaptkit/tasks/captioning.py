"""Image captioning: the LM writes a caption for an image (BLIP-2 stage 2, LLaVA-style).

- data: caption data (``adaptkit.data.captions``: caption JSONL, COCO captions JSON,
  ``easyvqa-captions:train|test``); every caption of an image is one training target;
- a sample: the fixed prompt ``data.prompt_template`` (e.g. "A short caption:"), the target
  ``" " + caption`` and EOS; image-text objectives (``itc``, ``itm``, ``triplet``) can be added with a text
  encoder (BLIP-2 stage 1's ITC + ITM + ITG in one recipe);
- metric: BLEU-4, CIDEr-D and ROUGE-L of one greedy caption per image against all of its references
  (``adaptkit.metrics.CaptionScores``, the COCO toolkit's scorers), CIDEr the headline;
- predictor: :class:`CaptionPredictor` (``caption``, ``caption_batch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Subset

from adaptkit.data.captions import load_captions
from adaptkit.data.collate import collate_prompts
from adaptkit.data.pairs import PairDataset, caption_lengths, collate_pairs
from adaptkit.model.batch import Batch
from adaptkit.predictor import ImageInput, Predictor
from adaptkit.tasks.base import DemoSpec, eval_examples
from adaptkit.tasks.generative import GenerativeTask


class CaptionTask(GenerativeTask):
    """Generative captioning (see the module docstring)."""

    name = "caption"
    headline_metric = "cider"
    demo = DemoSpec(
        text_label="Prompt (empty: the recipe's caption prompt)",
        text_placeholder="",
        output_label="Caption",
        ranked_label="Caption and its probability",
        intro="Caption an image. A frozen vision backbone encodes it, the trained adapter turns it into soft "
        "tokens for the language model, which writes the caption.",
        text_required=False,
    )

    @classmethod
    def config_problem(cls, recipe) -> str | None:
        obj = recipe.objectives
        if obj.lm <= 0:
            return "task caption trains the LM to write captions: set objectives.lm > 0"
        if obj.classify:
            return "task caption has no answer classes: set objectives.classify=0"
        if recipe.pack_questions > 1:
            return "task caption trains one caption per sequence: set pack_questions=1"
        return None

    def load(self, spec: str, on_bad_sample: str = "error"):
        return load_captions(spec, on_bad_sample)

    def dataset(self, samples, image_rows, tokenizer) -> PairDataset:
        return PairDataset(
            samples, image_rows, tokenizer, self.recipe.data.prompt_template, self.cut_texts_to
        )

    def text_lengths(self, samples, tokenizer) -> list[int]:
        return caption_lengths(samples, tokenizer, self.recipe.data.prompt_template)

    def text_pairs(self, samples, tokenizer=None) -> list[tuple[str, str]]:
        prompt = self.recipe.data.prompt_template
        return [(prompt, " " + " ".join(c.split())) for s in samples for c in s.captions]

    def collate(self, pad_id: int, pack: int = 1):
        import functools

        return functools.partial(collate_pairs, pad_id=pad_id)

    def setup_objectives(self, model, dataset) -> str:
        if model.text_encoder is None:
            return super().setup_objectives(model, dataset)
        # ITC / ITM / triplet beside the LM loss: the training texts' states (or tokens, with text LoRA)
        self.pairs, self.encoder = dataset, model.text_encoder
        dataset.prepare_texts(model.text_encoder)
        weights = {n: w for n, w in model.objectives.weights.items() if w > 0}
        return "objectives: " + " + ".join(f"{w:.3g} x {n}" for n, w in weights.items())

    def loss(self, model, features: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        lm = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        if getattr(self, "pairs", None) is None:
            return model(Batch.of(features, lm)).loss
        text = self.pairs.text_inputs(self.encoder, batch["text"])
        return model(Batch.of(features, lm, **text, groups=batch["group"].to(text["text_mask"].device))).loss

    def evaluate(self, model, dataset, features, batch_size=None, progress=True, accelerator=None):
        from adaptkit.metrics import CaptionScores, LabelMentioned

        first: dict[int, int] = {}  # one generated caption per image: its first pair
        for k, row in enumerate(dataset.image_rows):
            first.setdefault(row, k)
        per_image = Subset(dataset, list(first.values()))
        per_image.samples = [dataset.samples[k] for k in first.values()]
        generated = self.generate(model, per_image, features, batch_size, progress, accelerator)
        captions, scores, seconds = generated
        refs = [list(s.captions) for s in per_image.samples]
        metrics = CaptionScores().compute(predictions=captions, references=refs)
        labels = [s.label for s in per_image.samples]
        if labels and all(label is not None for label in labels):  # labelled data: is the label named?
            mentioned = LabelMentioned().compute(predictions=captions, references=labels)
            metrics["label_mentioned"] = mentioned["label_mentioned"]
        metrics["seconds"] = seconds
        records = [
            {
                "origin": s.origin,
                "caption": c,
                "score": round(p, 5),
                "references": list(s.captions),
                "label": s.label,
            }
            for s, c, p in zip(per_image.samples, captions, scores)
        ]
        return metrics, records

    def format_metrics(self, metrics: dict) -> str:
        named = metrics.get("label_mentioned")
        return (
            f"CIDEr {metrics['cider']:.4f}, BLEU-4 {metrics['bleu4']:.4f}, ROUGE-L {metrics['rouge_l']:.4f}"
            + (f", label named {named:.4f}" if named is not None else "")
            + f" on {metrics['n']} images in {metrics['seconds']} s"
        )

    def predictor(self, model, run_dir: Path, manifest: dict | None, info: dict, device) -> CaptionPredictor:
        return CaptionPredictor(model, self.recipe, self, info, device)

    def examples(self, count: int) -> list[tuple[str, str]]:
        return eval_examples(lambda: load_captions(self.recipe.data.eval, "skip").samples, count)


@dataclass
class Caption:
    """A generated caption and its probability under the model (every token up to EOS)."""

    text: str
    score: float
    top: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"caption": self.text, "score": self.score}


class CaptionPredictor(Predictor):
    """Captions images::

    predictor = load_for_inference("runs/easyvqa_caption")
    predictor.caption("shape.png").text                    # "a red circle"
    """

    @torch.no_grad()
    def caption_batch(self, images: Sequence[ImageInput], prompt: str | None = None) -> list[Caption]:
        """Greedy captions of ``images`` after ``prompt`` (default: the recipe's caption prompt)."""
        text = " ".join((prompt or self.recipe.data.prompt_template).split())
        ids = self.model.tokenizer([text], add_special_tokens=False)["input_ids"][0]
        results: list[Caption] = []
        size = self.recipe.eval_batch_size
        for start in range(0, len(images), size):
            feats = self.encode(images[start : start + size])
            items = [{"index": i, "image": i, "prompt": ids} for i in range(feats.shape[0])]
            batch = collate_prompts(items, self.model.tokenizer.pad_token_id)
            texts, probs = self.model.generate(
                feats,
                batch["input_ids"].to(self.device),
                batch["attention_mask"].to(self.device),
                self.recipe.max_new_tokens,
            )
            results += [Caption(t, round(p, 6), [(t, round(p, 6))]) for t, p in zip(texts, probs)]
        return results

    def caption(self, image: ImageInput, prompt: str | None = None) -> Caption:
        return self.caption_batch([image], prompt)[0]

    def predict(self, image: ImageInput, text: str | None = None, top_k: int = 5) -> Caption:
        return self.caption(image, text or None)
