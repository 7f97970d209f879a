"""Plots of a run's ``metrics.jsonl``: training loss and eval accuracy against wall-clock minutes."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """``(train_rows, eval_rows)`` from a run's metrics.jsonl (unreadable lines are skipped)."""
    train, evals = [], []
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "eval_accuracy" in row:
            evals.append(row)
        elif "loss" in row:  # other rows (replica digests, ...) are not curves
            train.append(row)
    return train, evals


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``curves.png`` (loss and eval accuracy vs wall minutes) into the run directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    train, evals = read_metrics(run)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        ax_loss.plot([r.get("wall_s", 0) / 60 for r in train], [r["loss"] for r in train], lw=1.2)
    ax_loss.set(xlabel="wall minutes", ylabel="training loss (answer tokens)", yscale="log", title="loss")
    if evals:
        ax_acc.plot(
            [r.get("wall_s", 0) / 60 for r in evals], [100 * r["eval_accuracy"] for r in evals], "o-", lw=1.2
        )
        n = evals[-1].get("eval_n", "?")
        ax_acc.set_title(f"eval accuracy ({n} samples)")
    ax_acc.set(xlabel="wall minutes", ylabel="exact match %")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(run.name, fontsize=10)
    fig.tight_layout()
    target = Path(out) if out else run / "curves.png"
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target
