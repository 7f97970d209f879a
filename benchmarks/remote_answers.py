"""Answer a VQA file with an ``adaptkit export --format hf-remote-code`` folder and transformers alone: the
way a user without adaptkit runs it. adaptkit is not importable here (an import hook refuses it).

    python -I benchmarks/remote_answers.py EXPORT_DIR QUESTIONS.jsonl OUT.jsonl [--batch-size 64]
        [--max-new-tokens 5]

QUESTIONS.jsonl: one ``{"image": path, "question": text}`` per line. OUT.jsonl: the same lines with
``prediction``. Prompts go through the processor's chat template; rows are left-padded batches.
"""

from __future__ import annotations

import argparse
import importlib.abc
import json
import sys
import time


class _NoAdaptkit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "adaptkit" or name.startswith("adaptkit."):
            raise ImportError("this script runs without adaptkit")
        return None


sys.meta_path.insert(0, _NoAdaptkit())


def load(auto, export: str, rows: str) -> tuple:
    """The folder's model (through the Auto class ``auto``, in eval mode) and processor, and a JSONL file's
    rows."""
    from transformers import AutoProcessor

    model = auto.from_pretrained(export, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
    with open(rows) as handle:
        return model, processor, [json.loads(line) for line in handle]


def main() -> None:
    import torch
    from PIL import Image
    from tqdm.auto import tqdm
    from transformers import AutoModelForImageTextToText

    parser = argparse.ArgumentParser()
    parser.add_argument("export")
    parser.add_argument("questions")
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=5)
    args = parser.parse_args()
    model, processor, rows = load(AutoModelForImageTextToText, args.export, args.questions)
    started = time.perf_counter()
    with open(args.out, "w") as out, torch.inference_mode():
        for i in tqdm(range(0, len(rows), args.batch_size), desc="answering", unit="batch"):
            batch = rows[i : i + args.batch_size]
            texts = [
                processor.apply_chat_template(
                    [
                        {
                            "role": "user",
                            "content": [{"type": "image"}, {"type": "text", "text": r["question"]}],
                        }
                    ],
                    add_generation_prompt=True,
                )
                for r in batch
            ]
            images = [Image.open(r["image"]).convert("RGB") for r in batch]
            inputs = processor(images=images, text=texts)
            ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            answers = processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for row, answer in zip(batch, answers):
                out.write(json.dumps({**row, "prediction": answer.strip()}) + "\n")
    print(f"{len(rows)} questions in {time.perf_counter() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
