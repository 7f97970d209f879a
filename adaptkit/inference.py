"""One inference API for run directories and exported models.

    from adaptkit import load_for_inference
    predictor = load_for_inference("runs/easyvqa")          # or an `adaptkit export` folder
    result = predictor.answer("shape.png", "What color is the shape?")
    result.text, result.score, result.top                   # "red", 0.998, [("red", 0.998), ...]

``score`` is the probability the model gives its greedy answer (every token up to EOS). ``top`` ranks the
answers seen in training (a closed answer set, as in BLIP's ranking mode) by their likelihood under the
model, normalised over that set; it is empty when the run has no answer set (more than
``MAX_ANSWER_SET`` distinct training answers, or training data no longer readable).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from adaptkit.data.collate import answer_vocab, collate_prompts, collate_train, format_prompt
from adaptkit.data.features import UnusableImage, decode_image, encode_images, open_image, to_rgb
from adaptkit.data.formats import DataError
from adaptkit.runs import read_json

log = logging.getLogger(__name__)

ANSWERS_FILE = "answers.json"
MAX_ANSWER_SET = 200  # larger answer vocabularies are open-ended: no ranking of candidates

ImageInput = str | Path | bytes | Image.Image | np.ndarray


@dataclass
class Answer:
    """One answer: the greedy text, its probability, and the top answers of the answer set."""

    text: str
    score: float
    top: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"answer": self.text, "score": self.score, "top": [[a, p] for a, p in self.top]}


def answer_set(answers: Sequence[str]) -> list[str] | None:
    """Distinct answers, most frequent first (None when there are more than ``MAX_ANSWER_SET``)."""
    ranked = answer_vocab(answers, MAX_ANSWER_SET + 1)
    return ranked if 0 < len(ranked) <= MAX_ANSWER_SET else None


def to_image(image: ImageInput, name: str = "image") -> Image.Image:
    """Decode any supported image input to RGB, exactly as training images are (:func:`decode_image`).

    Raises:
        DataError: the input is not an image PIL can decode (message names ``name`` or the file).
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        try:
            return to_rgb(Image.fromarray(image))
        except (TypeError, ValueError) as err:
            raise DataError(f"{name}: array of shape {image.shape} is not an image ({err})") from None
    if isinstance(image, bytes | bytearray):
        try:
            if not image:
                raise UnusableImage("is empty (0 bytes)")
            return decode_image(io.BytesIO(image))
        except UnusableImage as err:
            raise DataError(
                f"{name}: the bytes are not an image PIL can decode (the data {err.reason})"
            ) from None
    if isinstance(image, str | Path):
        return open_image(str(image))
    raise DataError(f"{name}: expected a path, bytes, PIL image or array, got {type(image).__name__}")


class Predictor:
    """Answers questions about images with a trained model (see the module docstring)."""

    def __init__(self, model, recipe, answers: list[str] | None, info: dict, device) -> None:
        self.model = model.eval()
        self.recipe = recipe
        self.answers = answers
        self.info = info
        self.device = torch.device(device)

    @property
    def template(self) -> str:
        return self.recipe.data.prompt_template

    def _prompts(self, questions: Sequence[str]) -> list[list[int]]:
        texts = [format_prompt(self.template, q) for q in questions]
        return self.model.tokenizer(texts, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def encode(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Frozen-backbone features ``(B, T, D)`` of the images."""
        decoded = [to_image(img, f"image {i}") for i, img in enumerate(images)]
        return encode_images(self.model.vision, decoded, self.device)

    def answer(self, image: ImageInput, question: str, top_k: int = 5) -> Answer:
        """The answer to one question about one image."""
        return self.answer_batch([image], [question], top_k=top_k)[0]

    @torch.no_grad()
    def answer_batch(
        self,
        images: Sequence[ImageInput],
        questions: Sequence[str],
        top_k: int = 5,
        batch_size: int | None = None,
    ) -> list[Answer]:
        """Answers for ``images[i]`` + ``questions[i]``, processed ``batch_size`` at a time."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"question {i} is empty; ask something about the image")
        size = batch_size or self.recipe.eval_batch_size
        results: list[Answer] = []
        for start in range(0, len(images), size):
            feats = self.encode(images[start : start + size])
            results += self._answer_features(feats, questions[start : start + size], top_k)
        return results

    def _answer_features(self, feats: torch.Tensor, questions: Sequence[str], top_k: int) -> list[Answer]:
        prompts = self._prompts(questions)
        pad = self.model.tokenizer.pad_token_id
        items = [{"index": i, "image": i, "prompt": p} for i, p in enumerate(prompts)]
        batch = collate_prompts(items, pad)
        texts, scores = self.model.generate(
            feats,
            batch["input_ids"].to(self.device),
            batch["attention_mask"].to(self.device),
            self.recipe.max_new_tokens,
        )
        tops: list[list[tuple[str, float]]] = [[] for _ in questions]
        if self.answers and top_k > 0:
            logp = self.candidate_logprobs(feats, prompts, self.answers)
            probs = logp.softmax(-1)
            best = probs.topk(min(top_k, probs.shape[1]), dim=-1)
            tops = [
                [(self.answers[j], round(float(p), 6)) for p, j in zip(vals, idx.tolist())]
                for vals, idx in zip(best.values, best.indices)
            ]
        return [Answer(t, round(s, 6), top) for t, s, top in zip(texts, scores, tops)]

    @torch.no_grad()
    def candidate_logprobs(
        self, feats: torch.Tensor, prompts: list[list[int]], candidates: Sequence[str]
    ) -> torch.Tensor:
        """``(B, C)`` log-probability of each candidate answer (all its tokens and EOS) per sample."""
        tok = self.model.tokenizer
        targets = [ids + [tok.eos_token_id] for ids in tok([" " + c for c in candidates])["input_ids"]]
        items = [
            {"index": 0, "image": b, "prompt": p, "target": t} for b, p in enumerate(prompts) for t in targets
        ]
        batch = collate_train(items, tok.pad_token_id)
        logp = self.model.sequence_logprobs(
            feats[batch["image"].to(feats.device)],
            batch["input_ids"].to(self.device),
            batch["attention_mask"].to(self.device),
            batch["labels"].to(self.device),
        )
        return logp.view(len(prompts), len(candidates))

    def facts(self) -> dict:
        """What the model is: backbones, adapter, parameter counts, its recorded accuracy."""
        return dict(self.info)


def run_answers(run: Path, recipe) -> list[str] | None:
    """The answer set a run was trained on: its ``answers.json``, else read from its training data."""
    saved = read_json(run / ANSWERS_FILE)
    if saved is not None:
        return saved.get("answers")
    from adaptkit.data.formats import load_vqa

    try:
        data = load_vqa(recipe.data.train, "skip")
    except (DataError, FileNotFoundError, OSError) as err:
        log.warning("no answer set for %s (training data unreadable: %s); top answers disabled", run, err)
        return None
    return answer_set([s.answer for s in data.samples])


def describe(recipe, model, run: Path, export_info: dict | None = None) -> dict:
    """The facts the demo shows and ``adaptkit predict --json`` prints."""
    from adaptkit.model import count_parameters

    summary = read_json(run / "summary.json") or {}
    params = (export_info or {}).get("parameters") or summary.get("parameters") or {}
    metrics = (export_info or {}).get("metrics") or {}
    if export_info:
        lora = "merged into the LM"
    elif recipe.lora.enabled:
        lora = f"r={recipe.lora.r} on {', '.join(recipe.lora.target_modules)}"
    else:
        lora = "off"
    evaluation = metrics.get("eval") or read_json(run / "eval.json") or summary.get("eval") or {}
    return {
        "source": str(run),
        "kind": "export" if export_info else "run",
        "vision": f"{recipe.vision.family}:{recipe.vision.name} (frozen)",
        "adapter": f"{recipe.adapter.kind}, {recipe.adapter.num_queries} soft tokens",
        "language": (export_info or {}).get("language", {}).get("base", recipe.language.name),
        "lora": lora,
        "trainable_parameters": params.get("trainable"),
        "total_parameters": params.get("total") or count_parameters(model),
        "eval_accuracy": evaluation.get("accuracy"),
        "eval_samples": evaluation.get("n"),
        "eval_data": evaluation.get("data"),
        "prompt_template": recipe.data.prompt_template,
    }


def load_for_inference(path: str | Path, device: str | torch.device | None = None, verify: bool = True):
    """A :class:`Predictor` for a run directory (``adaptkit train``) or an export (``adaptkit export``).

    Args:
        verify: for an export, check every file's sha256 against its manifest first.
    """
    from adaptkit.export import EXPORT_FILE, read_manifest
    from adaptkit.runs import load_run

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root = Path(path)
    manifest = read_manifest(root, verify=verify) if (root / EXPORT_FILE).is_file() else None
    recipe, model = load_run(root, device)
    answers = manifest["answers"] if manifest else run_answers(root, recipe)
    info = describe(recipe, model, root, manifest)
    return Predictor(model, recipe, answers, info, device)
