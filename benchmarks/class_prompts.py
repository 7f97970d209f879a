"""Classification by class prompts, with the prompt the run was trained with and with prompts it never saw
(zero-shot wording): how much does a retrieval run's classification depend on the exact phrasing?

For a retrieval run (or its export) and a caption data spec whose samples carry labels, every image is
classified by the most similar of the class prompts ``TEMPLATE.format(label=...)`` over the spec's labels,
once per template. Images are embedded once (through the run's predictor: frozen backbone, adapter,
projection); each template costs one text-encoder pass over the classes. The default templates are
``data.class_template`` of the run plus wordings not among the training captions' five phrasings
(``adaptkit/data/captions.py`` ``PHRASINGS``).

    python benchmarks/class_prompts.py runs/easyvqa_retrieval --data easyvqa-captions:test
    python benchmarks/class_prompts.py runs/easyvqa_retrieval --data data/ood_vqa/captions.jsonl \\
        --template "a photo of a {label}" --template "{label}" --json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from adaptkit.contrastive import similarity
from adaptkit.data.captions import load_captions
from adaptkit.inference import load_for_inference

UNSEEN = (
    "{label}",
    "a photo of a {label}",
    "a drawing of a {label}",
    "this shape is a {label}",
    "an illustration showing one {label} on a background",
)


def classify(predictor, data: str, templates: list[str], batch_size: int = 64) -> dict:
    """Accuracy per template (and the images, classes and seconds) of ``predictor`` on ``data``."""
    samples = [s for s in load_captions(data, "skip").samples if s.label is not None]
    if not samples:
        raise SystemExit(f"{data}: no labelled samples (caption data needs a 'label' per image)")
    images = list(dict.fromkeys(s.image for s in samples))
    label_of = {s.image: s.label for s in samples}
    classes = sorted(set(label_of.values()))
    start = time.perf_counter()
    embeds = torch.cat(
        [predictor.embed_images(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )
    encode_s = time.perf_counter() - start
    refs = torch.tensor([classes.index(label_of[i]) for i in images])
    results = {}
    for template in templates:
        texts = [template.format(label=c) for c in classes]
        predicted = similarity(embeds, predictor.embed_texts(texts)).argmax(1).cpu()
        results[template] = round(float((predicted == refs).float().mean()), 6)
    return {
        "data": data,
        "images": len(images),
        "classes": len(classes),
        "accuracy": results,
        "embed_images_s": round(encode_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a retrieval run directory or its export")
    parser.add_argument("--data", required=True, help="a caption data spec with labels")
    parser.add_argument("--template", action="append", help="a class prompt with {label} (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    predictor = load_for_inference(args.run, args.device)
    if not hasattr(predictor, "embed_texts"):
        raise SystemExit(f"{args.run} is not a retrieval run (its predictor does not embed texts)")
    trained = predictor.recipe.data.class_template
    templates = args.template or [trained, *UNSEEN]
    bad = [t for t in templates if "{label}" not in t]
    if bad:
        raise SystemExit(f"--template needs '{{label}}' in it: {bad}")
    report = classify(predictor, args.data, templates)
    report["trained_template"] = trained
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['images']} images, {report['classes']} classes of {args.data}")
    for template, accuracy in report["accuracy"].items():
        mark = "  (the run's data.class_template)" if template == trained else ""
        print(f"  {accuracy:8.2%}  {template!r}{mark}")


if __name__ == "__main__":
    main()
