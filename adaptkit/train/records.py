"""What a run records as it trains: the log (``train.log`` and stderr), ``metrics.jsonl``,
``samples.jsonl`` and, with ``report_to``, Accelerate's trackers; and the logging window's averages."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from adaptkit.config.fields import walk
from adaptkit.train.resume import truncate_jsonl

log = logging.getLogger("adaptkit")
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record arrives (pytest and notebooks swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(run_dir: Path, main: bool) -> None:
    """The ``adaptkit`` logger writes to ``run_dir/train.log`` and stderr on the main process only."""
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    if not main:
        log.addHandler(logging.NullHandler())
        return
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for handler in (logging.FileHandler(run_dir / "train.log"), _CurrentStderr()):
        handler.setFormatter(fmt)
        log.addHandler(handler)


class Records:
    """``metrics.jsonl`` (and ``samples.jsonl`` with ``log_samples``) of the main process, mirrored to the
    recipe's trackers. A resumed run first cuts both files back to its checkpoint's step."""

    def __init__(self, accelerator, recipe, out: Path, resumed_step: int | None) -> None:
        self.accelerator = accelerator
        self.trackers = recipe.report_to != "none"
        main = accelerator.is_main_process
        if main and resumed_step is not None:
            truncate_jsonl(out / METRICS_FILE, resumed_step)
            truncate_jsonl(out / SAMPLES_FILE, resumed_step)
        mode = "a" if resumed_step is not None else "w"
        self.metrics = (out / METRICS_FILE).open(mode) if main else None
        self.samples = (out / SAMPLES_FILE).open(mode) if main and recipe.log_samples else None
        if self.trackers:
            hparams = {
                k: v if isinstance(v, int | float | str | bool) else str(v) for k, v, _ in walk(recipe)
            }
            accelerator.init_trackers("tensorboard", config=hparams)

    def record(self, obj: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(obj) + "\n")
            self.metrics.flush()
        if self.trackers:
            scalars = {k: v for k, v in obj.items() if k != "step" and isinstance(v, int | float)}
            self.accelerator.log(scalars, step=obj["step"])

    def sample_row(self, row: dict) -> None:
        if self.samples is not None:
            self.samples.write(json.dumps(row) + "\n")
            self.samples.flush()

    def close(self) -> None:
        for handle in (self.metrics, self.samples):
            if handle is not None:
                handle.close()


class Window:
    """Loss (and its objectives' parts) averaged over the micro-batches since the last logged step, and
    the training time they took (``restart`` after evaluations and checkpoints: samples/s counts
    training only)."""

    def __init__(self, loss: float = 0.0, n: int = 0, parts: dict[str, float] | None = None) -> None:
        self.loss, self.n, self.parts = loss, n, dict(parts or {})
        self.start = time.perf_counter()

    def add(self, loss: float, parts: dict) -> None:
        self.loss += loss
        self.n += 1
        for name, part in parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + part.float().item()

    def restart(self) -> None:
        self.start = time.perf_counter()

    def row(self, step: int, epoch: int, optimizer, samples_per_step: int, grad_accum: int) -> dict:
        """The metrics line of a logged step; resets the window."""
        elapsed = time.perf_counter() - self.start
        row = {
            "step": step,
            "epoch": epoch,
            "loss": round(self.loss / self.n, 6),
            **{f"loss_{k}": round(v / self.n, 6) for k, v in self.parts.items() if len(self.parts) > 1},
            "lr": optimizer.param_groups[0]["lr"],
            "lr_lora": optimizer.param_groups[-1]["lr"],
            "samples_per_s": round(self.n / grad_accum * samples_per_step / elapsed, 3),
        }
        self.loss, self.n, self.parts = 0.0, 0, {}
        self.restart()
        return row

    def state(self) -> dict:
        """What a checkpoint keeps of the window (a resumed run logs the same averages)."""
        return {"window_loss": self.loss, "window_n": self.n, "window_parts": self.parts}
