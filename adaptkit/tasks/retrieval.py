"""Image-text retrieval and classification with contrastive and matching objectives (BLIP-2 stage 1).

- data: caption data (``adaptkit.data.captions``: caption JSONL, COCO captions JSON,
  ``easyvqa-captions:train|test``); every caption of an image is one training pair;
- a pair: the image's features and the caption's frozen text-encoder states (``TextBank``: each distinct
  caption encoded once); its *group* is the image's ``label`` when the data has one, else the image, and
  pairs of one group are positives of each other;
- objectives: ``itc``, ``itm``, ``triplet`` (``adaptkit.contrastive``) on the adapter's image tokens, and
  optionally ``lm`` (image-grounded generation of the caption after ``data.prompt_template``: BLIP-2's
  ITG) — any weighted sum the recipe sets;
- metric: image->text and text->image Recall@1/5/10 and mean rank over the eval split's images and
  distinct captions (a caption is correct for an image of its group), ``r_mean`` their mean (the
  headline); with labels, classification accuracy with ``data.class_template`` prompts as classes;
- run file: ``texts.json``, the candidates ``predict`` and the demo rank when given none (the class
  prompts, or the training captions);
- predictor: :class:`RetrievalPredictor` (``embed_images``, ``embed_texts``, ``rank_texts``).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptkit.artifacts import read_list, write_json
from adaptkit.backbones.text import TextBank
from adaptkit.contrastive import similarity
from adaptkit.data.captions import load_captions
from adaptkit.data.formats import DataError
from adaptkit.data.pairs import PairDataset, caption_lengths, collate_pairs
from adaptkit.model.batch import Batch
from adaptkit.predictor import ImageInput, Predictor
from adaptkit.tasks.base import DemoSpec, Task, eval_examples

log = logging.getLogger(__name__)

TEXTS_FILE = "texts.json"
MAX_CANDIDATES = 1000  # training captions kept as predict's default candidates
EVAL_CHUNK = 256


@torch.no_grad()
def embed_features(model, features, rows: Sequence[int], batch_size: int = EVAL_CHUNK) -> torch.Tensor:
    """``(N, Q, E)`` image embeddings (the embedding head on the adapter's image tokens) of feature rows."""
    head = model.objectives.heads["embed"]
    parts = []
    for start in range(0, len(rows), batch_size):
        chunk = torch.tensor(list(rows[start : start + batch_size]))
        parts.append(head.image_embeds(model.image_tokens(features.lookup(chunk))))
    return torch.cat(parts)


@torch.no_grad()
def embed_bank(model, bank: TextBank, batch_size: int = EVAL_CHUNK) -> torch.Tensor:
    """``(N, E)`` text embeddings of every text of a bank."""
    head = model.objectives.heads["embed"]
    parts = []
    for start in range(0, len(bank), batch_size):
        states, mask = bank.lookup(torch.arange(start, min(start + batch_size, len(bank))))
        parts.append(head.text_embeds(states, mask))
    return torch.cat(parts)


@torch.no_grad()
def held_scores(model, samples) -> tuple[list[str], list[str], torch.Tensor]:
    """The samples' distinct images, their distinct captions (whitespace joined) and ``model``'s
    temperature-scaled similarity of each image to every caption (float64), as ``predict`` ranks them."""
    from adaptkit.data.images import open_image

    paths = list(dict.fromkeys(str(s.image) for s in samples))
    texts = list(dict.fromkeys(" ".join(c.split()) for s in samples for c in s.captions))
    head = model.objectives.heads["embed"]
    images = head.image_embeds(model.image_tokens(model.encode_images([open_image(p) for p in paths])))
    states, mask = model.text_encoder(texts)
    return paths, texts, (similarity(images, head.text_embeds(states, mask)) * head.scale()).double()


def first_correct_ranks(sim: torch.Tensor, correct: torch.Tensor) -> list[int]:
    """Per row, the 0-based rank of its best-scored correct column (ties counted in its favour)."""
    best = sim.masked_fill(~correct, float("-inf")).max(1).values
    return (sim > best[:, None]).sum(1).tolist()


class RetrievalTask(Task):
    """Image-text retrieval (see the module docstring)."""

    name = "retrieval"
    headline_metric = "r_mean"
    demo = DemoSpec(
        text_label="Candidate texts (one per line; empty: the run's classes or captions)",
        text_placeholder="a red circle\na blue triangle",
        output_label="Best match",
        ranked_label="Texts ranked for the image",
        intro="Rank texts for an image. A frozen vision backbone encodes the image, the trained adapter and "
        "projection embed it; a frozen text encoder and its projection embed each text; the most similar "
        "text wins.",
        text_required=False,
        text_lines=4,
    )

    @classmethod
    def config_problem(cls, recipe) -> str | None:
        obj = recipe.objectives
        if not (obj.itc or obj.itm or obj.triplet):
            return (
                "task retrieval trains an image-text objective: set objectives.itc (and/or itm, triplet) > 0"
            )
        if obj.classify:
            return "task retrieval has no answer classes: set objectives.classify=0"
        if recipe.pack_questions > 1:
            return "task retrieval trains on (image, caption) pairs: set pack_questions=1"
        return None

    def load(self, spec: str, on_bad_sample: str = "error"):
        return load_captions(spec, on_bad_sample)

    def dataset(self, samples, image_rows, tokenizer) -> PairDataset:
        with_lm = self.recipe.objectives.lm > 0
        prompt = self.recipe.data.prompt_template if with_lm else None
        return PairDataset(samples, image_rows, tokenizer if with_lm else None, prompt, self.cut_texts_to)

    def text_lengths(self, samples, tokenizer) -> list[int]:
        """LM tokens only where the LM reads the captions (objectives.lm > 0); the text encoder cuts its
        texts at text_encoder.max_length itself."""
        if self.recipe.objectives.lm <= 0:
            return [0] * len(samples)
        return caption_lengths(samples, tokenizer, self.recipe.data.prompt_template)

    def lengths(self, dataset) -> list[int]:
        if dataset.target_ids is None:
            return [1] * len(dataset)
        return [len(dataset.prompt_ids) + len(t) for t in dataset.target_ids]

    def text_pairs(self, samples, tokenizer=None) -> list[tuple[str, str]]:
        prompt = self.recipe.data.prompt_template
        return [(prompt, " " + " ".join(c.split())) for s in samples for c in s.captions]

    # ---- training ------------------------------------------------------------------------------------

    def collate(self, pad_id: int, pack: int = 1):
        return functools.partial(collate_pairs, pad_id=pad_id)

    def setup_objectives(self, model, dataset) -> str:
        if model.text_encoder is None:
            raise ValueError(
                "task retrieval needs a text encoder: set text_encoder.name (e.g. embedded:minilm)"
            )
        self.pairs, self.encoder = dataset, model.text_encoder
        dataset.prepare_texts(model.text_encoder)
        weights = {n: w for n, w in model.objectives.weights.items() if w > 0}
        parts = " + ".join(f"{w:.3g} x {n}" for n, w in weights.items())
        counts = (
            f"{len(dataset)} pairs, {len(dataset.texts)} distinct captions, {len(dataset.group_names)} groups"
        )
        return f"objectives: {parts} ({counts})"

    def loss(self, model, features: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        text = self.pairs.text_inputs(self.encoder, batch["text"])
        text["groups"] = batch["group"].to(text["text_mask"].device)
        lm = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}
        return model(Batch.of(features, lm, **text)).loss

    # ---- evaluation ----------------------------------------------------------------------------------

    def class_prompts(self, labels: Sequence[str]) -> list[str]:
        return [self.recipe.data.class_template.format(label=label) for label in labels]

    def evaluate(self, model, dataset, features, batch_size=None, progress=True, accelerator=None):
        from adaptkit.metrics import ClassAccuracy, RetrievalRecall

        start = time.perf_counter()
        was_training = model.training
        model.eval()
        images: dict[int, int] = {}  # feature row -> image index
        image_samples, group_list = [], []
        for row, sample, group in zip(dataset.image_rows, dataset.samples, dataset.groups):
            if row not in images:
                images[row] = len(images)
                image_samples.append(sample)
                group_list.append(group)
        # a text is correct for every image of a group it was written for
        text_groups = torch.zeros(len(dataset.group_names), len(dataset.texts), dtype=torch.bool)
        text_groups[torch.tensor(dataset.groups), torch.tensor(dataset.text_ids)] = True
        correct = text_groups[torch.tensor(group_list)]
        image_emb = embed_features(model, features, list(images), batch_size or EVAL_CHUNK)
        text_emb = embed_bank(model, dataset.text_bank(model.text_encoder, progress))
        sim = similarity(image_emb, text_emb).cpu()
        metrics = {}
        for direction, ranks in (
            ("i2t", first_correct_ranks(sim, correct)),
            ("t2i", first_correct_ranks(sim.t(), correct.t())),
        ):
            for key, value in RetrievalRecall().compute(ranks=ranks).items():
                metrics[f"{direction}_{key}"] = value
        metrics["r_mean"] = sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)) / 6
        best = sim.argmax(1).tolist()
        records = [
            {
                "origin": s.origin,
                "label": s.label,
                "best_text": dataset.texts[b],
                "correct": bool(correct[i, b]),
            }
            for i, (s, b) in enumerate(zip(image_samples, best))
        ]
        labels = [s.label for s in image_samples]
        if all(label is not None for label in labels):
            classes = sorted(set(labels))
            bank = TextBank(model.text_encoder, self.class_prompts(classes), progress=False)
            predicted = similarity(image_emb, embed_bank(model, bank)).argmax(1).tolist()
            refs = [classes.index(label) for label in labels]
            metrics["classification_accuracy"] = ClassAccuracy().compute(
                predictions=predicted, references=refs
            )["accuracy"]
            metrics["classes"] = len(classes)
            for record, p in zip(records, predicted):
                record["predicted_class"] = classes[p]
        metrics["n"] = len(images)
        metrics["texts"] = len(dataset.texts)
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        model.train(was_training)
        return metrics, records

    def format_metrics(self, metrics: dict) -> str:
        def direction(d: str, name: str) -> str:
            recalls = " / ".join(f"{metrics[f'{d}_r{k}']:.4f}" for k in (1, 5, 10))
            return f"{name} R@1/5/10 {recalls} (mean rank {metrics[f'{d}_mean_rank']:.2f})"

        line = (
            f"r_mean {metrics['r_mean']:.4f}: {direction('i2t', 'image->text')}, "
            f"{direction('t2i', 'text->image')} over {metrics['n']} images and {metrics['texts']} texts"
        )
        if "classification_accuracy" in metrics:
            accuracy, classes = metrics["classification_accuracy"], metrics["classes"]
            line += f"; classification accuracy {accuracy:.4f} ({classes} classes)"
        return line + f" in {metrics['seconds']} s"

    # ---- run files, inference ------------------------------------------------------------------------

    def candidates(self, samples) -> list[str]:
        """Default texts to rank: the class prompts when every sample has a label, else the captions."""
        labels = [s.label for s in samples]
        if labels and all(label is not None for label in labels):
            return self.class_prompts(sorted(set(labels)))
        seen = dict.fromkeys(" ".join(c.split()) for s in samples for c in s.captions)
        return list(seen)[:MAX_CANDIDATES]

    def save_run_files(self, run_dir: Path, dataset) -> None:
        write_json(run_dir / TEXTS_FILE, {"candidates": self.candidates(dataset.samples)})

    def run_candidates(self, run_dir: Path) -> list[str]:
        if (run_dir / TEXTS_FILE).exists():
            return read_list(run_dir / TEXTS_FILE, "candidates") or []
        try:
            return self.candidates(load_captions(self.recipe.data.train, "skip").samples)
        except (DataError, OSError) as err:
            log.warning("no default candidates for %s: %s", run_dir, err)
            return []

    def export_info(self, run_dir: Path) -> dict:
        return {"candidates": self.run_candidates(run_dir)}

    compares_exports = True

    @torch.no_grad()
    def compare_export(self, trained, exported, samples) -> dict:
        """Temperature-scaled similarities of the held images against their captions, computed by the
        trained run and by the export loaded from its folder: identical best texts, logits within 1e-4."""
        paths, texts, a = held_scores(trained, samples)
        b = held_scores(exported, samples)[2]
        diff = float((a - b).abs().max())
        same = float((a.argmax(1) == b.argmax(1)).float().mean())
        return {
            "samples": len(paths),
            "texts": len(texts),
            "reference": "the trained run; compared: scaled image-text similarities (the retrieval logits)",
            "answers_identical": same,
            "max_abs_logit_diff": diff,
            "tolerance": 1e-4,
            "passed": same == 1.0 and diff <= 1e-4,
        }

    def predictor(self, model, run_dir: Path, manifest: dict | None, info: dict, device):
        texts = manifest["candidates"] if manifest else self.run_candidates(run_dir)
        return RetrievalPredictor(model, self.recipe, self, info, device, texts)

    def examples(self, count: int) -> list[tuple[str, str]]:
        return eval_examples(lambda: load_captions(self.recipe.data.eval, "skip").samples, count)


@dataclass
class Ranking:
    """Texts ranked for one image: the best text, its probability, and the top ``(text, probability)``."""

    text: str
    score: float
    top: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"text": self.text, "score": self.score, "top": [[t, p] for t, p in self.top]}


class RetrievalPredictor(Predictor):
    """Embeds images and texts and ranks texts for an image::

        predictor = load_for_inference("runs/easyvqa_retrieval")
        predictor.rank_texts("shape.png", ["a red circle", "a blue square"])   # [(text, probability), ...]
        predictor.predict("shape.png")        # ranks the run's classes (or training captions)
        predictor.embed_images([...]), predictor.embed_texts([...])           # for your own index

    Probabilities are the softmax of the trained temperature-scaled similarities over the candidates.
    """

    def __init__(self, model, recipe, task, info: dict, device, candidates: list[str]) -> None:
        super().__init__(model, recipe, task, info, device)
        self.candidates = candidates

    @torch.no_grad()
    def embed_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """``(B, Q, E)`` normalized image embeddings (an image-text similarity takes the best of Q)."""
        head = self.model.objectives.heads["embed"]
        return head.image_embeds(self.model.image_tokens(self.encode(images)))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, E)`` normalized text embeddings."""
        texts = [" ".join(t.split()) for t in texts]
        if not texts or not all(texts):
            raise ValueError("embed_texts needs non-empty texts")
        states, mask = self.model.text_encoder(texts)
        return self.model.objectives.heads["embed"].text_embeds(states, mask)

    @torch.no_grad()
    def rank_texts(self, image: ImageInput, texts: Sequence[str], top_k: int | None = None) -> list:
        """``(text, probability)`` for ``texts``, best first (``top_k`` of them)."""
        sim = similarity(self.embed_images([image]), self.embed_texts(texts))[0]
        probs = (sim * self.model.objectives.heads["embed"].scale()).softmax(-1)
        order = probs.argsort(descending=True).tolist()[: top_k or len(texts)]
        return [(texts[i], round(float(probs[i]), 6)) for i in order]

    def predict(self, image: ImageInput, text: str | None = None, top_k: int = 5) -> Ranking:
        """Rank ``text``'s lines (or ``|``-separated texts) for the image; without text, the run's
        candidates (its class prompts, or training captions)."""
        texts = [t.strip() for t in (text or "").replace("|", "\n").splitlines() if t.strip()]
        texts = texts or self.candidates
        if not texts:
            raise ValueError("no texts to rank: give candidate texts (one per line, or separated by '|')")
        ranked = self.rank_texts(image, texts)
        return Ranking(ranked[0][0], ranked[0][1], ranked[: max(1, top_k)])
