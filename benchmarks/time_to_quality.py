"""Accuracy against wall-clock minutes for one or more training runs, as a PNG.

Each run contributes its in-training evaluations (``metrics.jsonl``: subset accuracy at ``wall_s``
seconds since ``adaptkit train`` started, model loading and feature caching included) and, when
``adaptkit eval RUN --data easyvqa:test`` has been run, the full-split accuracy (``eval.json``) as a
star at the training command's total time.

    python benchmarks/time_to_quality.py runs/a runs/b --out docs/time_to_quality.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adaptkit.plots import read_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--label", action="append", default=None, help="legend label per run (in order)")
    parser.add_argument("--out", default="time_to_quality.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    table = []
    for i, run in enumerate(map(Path, args.runs)):
        label = args.label[i] if args.label and i < len(args.label) else run.name
        _, evals = read_metrics(run)
        xs = [r["wall_s"] / 60 for r in evals if "wall_s" in r]
        ys = [100 * r["eval_accuracy"] for r in evals if "wall_s" in r]
        (line,) = ax.plot(xs, ys, "o-", lw=1.2, ms=4, label=f"{label} (subset evals)")
        summary = json.loads((run / "summary.json").read_text())
        final = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
        minutes = summary["total_seconds"] / 60
        full = final.get("limit") in (None, 0) and final.get("n")
        if full:
            acc = 100 * final["accuracy"]
            ax.plot([minutes], [acc], "*", ms=13, color=line.get_color(), label=f"{label}: full split")
            ax.annotate(f"{acc:.2f}%", (minutes, acc), textcoords="offset points", xytext=(6, -12))
        table.append(
            {
                "run": str(run),
                "train_minutes": round(minutes, 2),
                "full_split": final["accuracy"] if full else None,
            }
        )
    ax.axvline(15, color="grey", ls="--", lw=0.8)
    ax.set(
        xlabel="wall minutes of `adaptkit train` (loading + feature caching included)", ylabel="exact match %"
    )
    ax.set_title("easy-VQA accuracy vs wall time, 2-core CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(json.dumps({"out": args.out, "runs": table}))


if __name__ == "__main__":
    main()
