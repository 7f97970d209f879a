"""A run through ``--format hf-remote-code`` on a full test split: every answer of the stock Auto class
(loaded in a process where adaptkit cannot be imported) against ``adaptkit eval``'s.

    python benchmarks/hf_remote_code_easyvqa.py RUN --out EXPORT_DIR [--data easyvqa:test]

Exports RUN to EXPORT_DIR (unless it exists), runs ``adaptkit eval RUN --data DATA`` (unless RUN's
``eval_predictions.jsonl`` is of DATA already), then, under ``python -I``, answers every question with
``benchmarks/remote_answers.py`` (a VQA run), or ranks the class prompts and the data's captions for every
image with ``benchmarks/remote_rank.py`` (a retrieval run: ``--data`` of captions with labels, e.g.
``fashionmnist-captions:test``). Prints one JSON line: how many answers (predicted classes and best
captions) are identical, the accuracy of each side, and the first differences.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default="easyvqa:test")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    run, out = Path(args.run), Path(args.out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not out.exists():
        subprocess.run(
            ["adaptkit", "export", str(run), "--out", str(out), "--format", "hf-remote-code"], check=True
        )
    evaluated = (
        json.loads((run / "eval.json").read_text()).get("data") if (run / "eval.json").exists() else None
    )
    if evaluated != args.data:
        subprocess.run(["adaptkit", "eval", str(run), "--data", args.data, "--json"], check=True, env=env)
    from adaptkit.recipes import load_recipe
    from adaptkit.tasks import get_task

    recipe = load_recipe(run / "recipe.yaml")
    samples = get_task(recipe).load(args.data, recipe.data.on_bad_sample).samples
    ours = [json.loads(line) for line in (run / "eval_predictions.jsonl").open()]
    assert len(ours) == len(samples), "eval_predictions.jsonl is not of this data"
    clean_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    if recipe.task == "retrieval":
        found = _retrieval(recipe, samples, ours, out, args.batch_size, clean_env)
        print(json.dumps({"data": args.data, **found}))
        return
    questions = out.with_name(out.name + "-questions.jsonl")
    answers = out.with_name(out.name + "-answers.jsonl")
    with questions.open("w") as handle:
        for s in samples:
            handle.write(
                json.dumps({"image": str(s.image), "question": s.question, "answer": s.answer}) + "\n"
            )
    script = Path(__file__).with_name("remote_answers.py")
    cmd = [sys.executable, "-I", str(script), str(out), str(questions), str(answers)]
    subprocess.run(
        cmd + ["--batch-size", str(args.batch_size), "--max-new-tokens", str(recipe.max_new_tokens)],
        check=True,
        env=clean_env,
    )
    theirs = [json.loads(line) for line in answers.open()]
    differ = [
        (o["question"], o["prediction"], t["prediction"])
        for o, t in zip(ours, theirs)
        if o["prediction"] != t["prediction"]
    ]
    print(
        json.dumps(
            {
                "data": args.data,
                "questions": len(ours),
                "answers_identical": len(ours) - len(differ),
                "accuracy_adaptkit": sum(o["prediction"] == o["answer"] for o in ours) / len(ours),
                "accuracy_remote_code": sum(t["prediction"] == t["answer"] for t in theirs) / len(theirs),
                "first_differences": differ[:10],
            }
        )
    )


def _retrieval(recipe, samples, ours: list[dict], out: Path, batch_size: int, env: dict) -> dict:
    """Every image's predicted class and best caption through the export, against ``adaptkit eval``'s."""
    from adaptkit.tasks import get_task

    image_of = {s.origin: str(s.image) for s in samples}
    classes = sorted({s.label for s in samples})
    texts = list(dict.fromkeys(" ".join(c.split()) for s in samples for c in s.captions))
    images = out.with_name(out.name + "-images.jsonl")
    prompts = out.with_name(out.name + "-texts.json")
    ranked = out.with_name(out.name + "-ranked.jsonl")
    with images.open("w") as handle:
        for o in ours:
            handle.write(json.dumps({"image": image_of[o["origin"]], "label": o["label"]}) + "\n")
    class_prompts = get_task(recipe).class_prompts(classes)  # as the evaluation words them
    prompts.write_text(json.dumps({"classes": class_prompts, "texts": texts}))
    script = Path(__file__).with_name("remote_rank.py")
    cmd = [sys.executable, "-I", str(script), str(out), str(images), str(prompts), str(ranked)]
    subprocess.run(cmd + ["--batch-size", str(batch_size)], check=True, env=env)
    theirs = [json.loads(line) for line in ranked.open()]
    assert len(theirs) == len(ours)
    class_differ = [
        (o["origin"], o["predicted_class"], classes[t["predicted_class"]])
        for o, t in zip(ours, theirs)
        if o["predicted_class"] != classes[t["predicted_class"]]
    ]
    text_differ = sum(o["best_text"] != t["best_text"] for o, t in zip(ours, theirs))
    return {
        "images": len(ours),
        "classes_identical": len(ours) - len(class_differ),
        "best_caption_identical": len(ours) - text_differ,
        "accuracy_adaptkit": sum(o["predicted_class"] == o["label"] for o in ours) / len(ours),
        "accuracy_remote_code": sum(classes[t["predicted_class"]] == t["label"] for t in theirs) / len(ours),
        "first_differences": class_differ[:10],
    }


if __name__ == "__main__":
    main()
