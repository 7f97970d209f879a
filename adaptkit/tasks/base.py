"""The interface of a task: everything about *what* is learned that the rest of adaptkit asks for.

The training loop, ``adaptkit eval``, ``export``, ``predict``, ``check-quant`` and the demo hold no
task-specific code; they call these methods on ``get_task(recipe)`` (``adaptkit.tasks``):

================================  ===========================================================
data formats                      :meth:`Task.load` (a data spec -> samples, skipped lines)
a sample -> a batch               :meth:`Task.dataset` (tokenized, over feature rows), :meth:`Task.collate`
objectives                        :meth:`Task.setup_objectives`, :meth:`Task.loss`
metric                            :meth:`Task.evaluate`, :meth:`Task.format_metrics`
run files                         :meth:`Task.save_run_files` (e.g. VQA's answer set)
what the predictor returns        :meth:`Task.predictor` (a :class:`adaptkit.predictor.Predictor`)
the demo                          :attr:`Task.demo` (labels), :meth:`Task.examples`
teacher-forced texts              :meth:`Task.text_pairs` (check-quant, export's verification)
================================  ===========================================================

Adding one: ``docs/extending.md``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from adaptkit.data.records import DataError

if TYPE_CHECKING:
    from adaptkit.config import Recipe
    from adaptkit.data.formats import LoadedData
    from adaptkit.predictor import Predictor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSpec:
    """What the Gradio demo shows for a task: its text box and its output labels."""

    text_label: str
    text_placeholder: str
    output_label: str
    ranked_label: str
    intro: str
    #: False: an empty text box is a valid request (retrieval: rank the run's classes; caption: its prompt)
    text_required: bool = True
    #: lines of the text box (retrieval: one candidate text per line)
    text_lines: int = 1


class Task(ABC):
    """A task (see the module docstring). One instance per recipe: ``task = TASKS[name](recipe)``.

    Datasets a task builds are indexable; item ``i`` is a dict with at least ``index`` (``i``) and
    ``image`` (its feature row), and the dataset has ``samples`` (the loaded samples, in order) and
    ``image_rows`` (each sample's feature row), which the samplers use to pack and group.
    """

    name: ClassVar[str]
    demo: ClassVar[DemoSpec]
    #: the field ``data.prompt_template`` must contain (``{question}`` for VQA; None: a fixed prompt).
    prompt_field: ClassVar[str | None] = None

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    @classmethod
    def config_problem(cls, recipe: Recipe) -> str | None:
        """What is wrong with a recipe for this task (``load_recipe`` raises it, naming the recipe)."""
        return None

    # ---- data --------------------------------------------------------------------------------------

    @abstractmethod
    def load(self, spec: str, on_bad_sample: str = "error") -> LoadedData:
        """Read a data spec (a file, or a named embedded split) into samples; bad lines raise
        ``DataError`` naming file and line, or are skipped and listed with ``on_bad_sample="skip"``."""

    @abstractmethod
    def dataset(self, samples: Sequence, image_rows: dict[str, int], tokenizer):
        """The tokenized dataset of ``samples`` whose images are rows ``image_rows[path]`` of a feature
        source (samples whose image has no row are dropped)."""

    @property
    def cut_texts_to(self) -> int | None:
        """The LM tokens a dataset cuts each sample's text to (``data.long_text=truncate``), else None."""
        data = self.recipe.data
        return data.max_text_tokens if data.long_text == "truncate" else None

    def text_lengths(self, samples: Sequence, tokenizer) -> list[int]:
        """Each sample's LM tokens (its prompt, target and EOS, as :meth:`text_pairs` renders them), for
        ``data.max_text_tokens``; one pair per sample (tasks with several texts per sample override it)."""
        pairs = self.text_pairs(samples, tokenizer)
        prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"] if pairs else []
        targets = tokenizer([t for _, t in pairs], add_special_tokens=False)["input_ids"] if pairs else []
        return [len(p) + len(t) + 1 for p, t in zip(prompts, targets)]

    def lengths(self, dataset) -> list[int]:
        """Each sample's LM token count (length grouping and packing sort by it)."""
        return [len(dataset[i]["prompt"]) + len(dataset[i]["target"]) for i in range(len(dataset))]

    def texts(self, dataset) -> list[tuple[int, ...]]:
        """Each sample's LM token ids (prompt + target), or [] when the task's samples have no LM text."""
        out = []
        for i in range(len(dataset)):
            item = dataset[i]
            if "prompt" not in item:
                return []
            out.append((*item["prompt"], *item["target"]))
        return out

    # ---- training ----------------------------------------------------------------------------------

    @abstractmethod
    def collate(self, pad_id: int, pack: int = 1) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """The training collate function (``pack`` > 1: consecutive samples of one image share a row)."""

    @abstractmethod
    def setup_objectives(self, model, dataset) -> str:
        """Give ``model`` the recipe's objectives for this task (and their heads, labels in ``dataset``);
        returns a line for the training log."""

    @abstractmethod
    def loss(self, model, features: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a batch (``model`` may be wrapped by Accelerate: call it, do not reach in)."""

    # ---- evaluation --------------------------------------------------------------------------------

    @abstractmethod
    def evaluate(
        self, model, dataset, features, batch_size: int | None = None, progress: bool = True, accelerator=None
    ) -> tuple[dict, list[dict]]:
        """``(metrics, per-sample records)`` on ``dataset``; with a multi-process ``accelerator`` the work
        is sharded and every process returns the same metrics. ``metrics`` has ``n`` and ``seconds``."""

    @abstractmethod
    def format_metrics(self, metrics: dict) -> str:
        """One human-readable line of ``metrics`` (``adaptkit eval`` without ``--json``)."""

    #: the metric the training log and README tables lead with.
    headline_metric: ClassVar[str] = "accuracy"

    # ---- run directory, inference, demo -----------------------------------------------------------

    def save_run_files(self, run_dir: Path, dataset) -> None:  # noqa: B027 (optional hook)
        """Write the task's files into a finished run directory (nothing by default)."""

    #: whether ``adaptkit export`` verifies an export with :meth:`compare_export` instead of comparing the
    #: merged LM's greedy answers and logits with the unmerged one's.
    compares_exports: ClassVar[bool] = False

    def compare_export(self, trained, exported, samples) -> dict:
        """The export's verification report (``passed``, ``samples``, ``answers_identical``,
        ``max_abs_logit_diff``, ``tolerance``) from the task's outputs of both models on held samples."""
        raise NotImplementedError(f"task {self.name} verifies exports through the LM")

    def export_info(self, run_dir: Path) -> dict:
        """What an export's manifest records for the task (read back by :meth:`predictor`)."""
        return {}

    @abstractmethod
    def predictor(self, model, run_dir: Path, manifest: dict | None, info: dict, device) -> Predictor:
        """The predictor of a loaded model; ``manifest`` is the export manifest (None for a run)."""

    def examples(self, count: int) -> list[tuple[str, str]]:
        """Up to ``count`` ``(image path, text)`` pairs from the eval data (the demo's examples)."""
        return []

    @abstractmethod
    def text_pairs(self, samples: Sequence, tokenizer=None) -> list[tuple[str, str]]:
        """``(prompt, target)`` texts of samples, as the LM is trained on them (teacher-forced checks);
        ``tokenizer``: the LM's, for prompts rendered with its chat template."""


def eval_examples(
    load: Callable[[], Sequence], count: int, text: Callable = lambda s: ""
) -> list[tuple[str, str]]:
    """Up to ``count`` ``(image path, text(sample))`` pairs, one per distinct image file that exists, from
    ``load()`` (a task's eval samples): the demo's examples. None, with a warning, when the data cannot
    be read."""
    try:
        samples = load()
    except (DataError, OSError) as err:
        log.warning("no examples: %s", err)
        return []
    rows, seen = [], set()
    for sample in samples:
        if sample.image in seen or not Path(sample.image).is_file():
            continue
        seen.add(sample.image)
        rows.append((sample.image, text(sample)))
        if len(rows) == count:
            break
    return rows
