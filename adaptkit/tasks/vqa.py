"""Visual question answering: a question about an image, a short generated answer.

- data: easy-VQA's embedded splits (``easyvqa:train``, ``easyvqa:test``) and VQA JSONL files
  (``{"image", "question", "answer"}`` per line; ``adaptkit.data.formats``);
- a sample: the prompt ``data.prompt_template`` with the question filled in, the target ``" " + answer``
  and EOS; packing puts up to ``pack_questions`` questions about one image into one LM sequence;
- objectives: ``lm`` (answer tokens) and ``classify`` (an answer head on the soft tokens);
- metric: exact match after normalization (``adaptkit.metrics.VQAExactMatch``: also yes/no and other);
- run file: ``answers.json``, the training answers that ``predict`` and the demo rank (BLIP's ranking
  mode over a closed answer set);
- predictor: :class:`VQAPredictor` (``answer``, ``answer_batch``, ``candidate_logprobs``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptkit.artifacts import read_list, write_json
from adaptkit.data.collate import (
    VQADataset,
    answer_text,
    answer_vocab,
    collate_prompts,
    collate_train,
    question_prompt,
)
from adaptkit.data.formats import DataError, load_vqa
from adaptkit.objectives import AnswerHead, Objectives
from adaptkit.predictor import ImageInput, Predictor
from adaptkit.tasks.base import DemoSpec, eval_examples
from adaptkit.tasks.generative import GenerativeTask

log = logging.getLogger(__name__)

ANSWERS_FILE = "answers.json"
MAX_ANSWER_SET = 200  # larger answer vocabularies are open-ended: no ranking of candidates


def answer_set(answers: Sequence[str]) -> list[str] | None:
    """Distinct answers, most frequent first (None when there are more than ``MAX_ANSWER_SET``)."""
    ranked = answer_vocab(answers, MAX_ANSWER_SET + 1)
    return ranked if 0 < len(ranked) <= MAX_ANSWER_SET else None


class VQATask(GenerativeTask):
    """Generative VQA (see the module docstring)."""

    name = "vqa"
    prompt_field = "question"
    demo = DemoSpec(
        text_label="Question",
        text_placeholder="What shape is in the image?",
        output_label="Answer",
        ranked_label="Top answers",
        intro="Ask a question about an image. A frozen vision backbone encodes it, the trained adapter "
        "turns it into soft tokens for the language model, which answers.",
    )

    def load(self, spec: str, on_bad_sample: str = "error"):
        return load_vqa(spec, on_bad_sample)

    def dataset(self, samples, image_rows, tokenizer) -> VQADataset:
        data = self.recipe.data
        return VQADataset(
            samples, image_rows, tokenizer, data.prompt_template, data.chat_template, self.cut_texts_to
        )

    def text_pairs(self, samples, tokenizer=None) -> list[tuple[str, str]]:
        data = self.recipe.data
        return [
            (
                question_prompt(data.prompt_template, s.question, s.context, tokenizer, data.chat_template),
                answer_text(s.answer, data.chat_template),
            )
            for s in samples
        ]

    def setup_objectives(self, model, dataset) -> str:
        cfg = self.recipe.objectives
        if cfg.classify <= 0:
            return super().setup_objectives(model, dataset)
        vocab = answer_vocab([s.answer for s in dataset.samples], cfg.classify_max_answers)
        labelled = dataset.set_answer_vocab(vocab)
        embeddings = model.base_lm.get_input_embeddings()
        model.objectives = Objectives({"lm": cfg.lm, "classify": cfg.classify})
        head = AnswerHead(embeddings.embedding_dim, len(vocab)).to(embeddings.weight.device)
        model.objectives.add_head("classify", head)
        return (
            f"objectives: {cfg.lm:.3g} x LM loss + {cfg.classify:.3g} x answer classification over "
            f"{len(vocab)} answers ({labelled} of {len(dataset)} samples labelled)"
        )

    def evaluate(self, model, dataset, features, batch_size=None, progress=True, accelerator=None):
        from adaptkit.metrics import VQAAccuracy, VQAExactMatch

        answers, scores, seconds = self.generate(model, dataset, features, batch_size, progress, accelerator)
        refs = [s.answer for s in dataset.samples]
        metrics = VQAExactMatch().compute(predictions=answers, references=refs)
        if any(
            s.answers for s in dataset.samples
        ):  # annotators' answers (VQAv2 style): the official accuracy
            every = [list(s.answers) or [s.answer] for s in dataset.samples]
            metrics["vqa_accuracy"] = VQAAccuracy().compute(predictions=answers, references=every)[
                "vqa_accuracy"
            ]
        metrics["seconds"] = seconds
        records = [
            {
                "origin": s.origin,
                "question": s.question,
                "answer": s.answer,
                "prediction": a,
                "score": round(p, 5),
            }
            for s, a, p in zip(dataset.samples, answers, scores)
        ]
        return metrics, records

    def format_metrics(self, metrics: dict) -> str:
        official = f", VQA accuracy {metrics['vqa_accuracy']:.4f}" if "vqa_accuracy" in metrics else ""
        return (
            f"accuracy {metrics['accuracy']:.4f} on {metrics['n']} samples "
            f"(yes/no {metrics['accuracy_yes_no']}, other {metrics['accuracy_other']}){official} "
            f"in {metrics['seconds']} s"
        )

    def save_run_files(self, run_dir: Path, dataset) -> None:
        write_json(run_dir / ANSWERS_FILE, {"answers": answer_set([s.answer for s in dataset.samples])})

    def run_answers(self, run_dir: Path) -> list[str] | None:
        """The answer set a run was trained on: its ``answers.json``, else read from its training data."""
        if (run_dir / ANSWERS_FILE).exists():
            return read_list(run_dir / ANSWERS_FILE, "answers")
        try:
            data = load_vqa(self.recipe.data.train, "skip")
        except (DataError, FileNotFoundError, OSError) as err:
            log.warning("no answer set for %s (training data unreadable: %s); top answers off", run_dir, err)
            return None
        return answer_set([s.answer for s in data.samples])

    def export_info(self, run_dir: Path) -> dict:
        return {"answers": self.run_answers(run_dir)}

    def predictor(self, model, run_dir: Path, manifest: dict | None, info: dict, device) -> VQAPredictor:
        answers = manifest["answers"] if manifest else self.run_answers(run_dir)
        return VQAPredictor(model, self.recipe, self, info, device, answers)

    def examples(self, count: int) -> list[tuple[str, str]]:
        def load():
            return load_vqa(self.recipe.data.eval, "skip").samples

        return eval_examples(load, count, lambda s: s.question)


@dataclass
class Answer:
    """One answer: the greedy text, its probability, and the top answers of the answer set."""

    text: str
    score: float
    top: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"answer": self.text, "score": self.score, "top": [[a, p] for a, p in self.top]}


class VQAPredictor(Predictor):
    """Answers questions about images::

        predictor = load_for_inference("runs/easyvqa")          # or an `adaptkit export` folder
        result = predictor.answer("shape.png", "What color is the shape?")
        result.text, result.score, result.top                   # "red", 0.998, [("red", 0.998), ...]

    ``score`` is the probability the model gives its greedy answer (every token up to EOS). ``top`` ranks
    the answers seen in training by their likelihood under the model, normalised over that set; it is
    empty when the run has no answer set (more than ``MAX_ANSWER_SET`` distinct training answers, or
    training data no longer readable).
    """

    def __init__(self, model, recipe, task, info: dict, device, answers: list[str] | None) -> None:
        super().__init__(model, recipe, task, info, device)
        self.answers = answers

    @property
    def template(self) -> str:
        return self.recipe.data.prompt_template

    def predict(self, image: ImageInput, text: str | None = None, top_k: int = 5) -> Answer:
        return self.answer(image, text or "", top_k=top_k)

    def _prompts(self, questions: Sequence[str]) -> list[list[int]]:
        chat, tok = self.recipe.data.chat_template, self.model.tokenizer
        texts = [question_prompt(self.template, q, (), tok, chat) for q in questions]
        return self.model.tokenizer(texts, add_special_tokens=False)["input_ids"]

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
        texts = [answer_text(c, self.recipe.data.chat_template) for c in candidates]
        targets = [ids + [tok.eos_token_id] for ids in tok(texts, add_special_tokens=False)["input_ids"]]
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
