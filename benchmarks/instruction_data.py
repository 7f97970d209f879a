"""Instruction-style VQA data: easy-VQA's images and answers behind long contexts, no text repeated.

Users' data is not easy-VQA's 273 short questions repeated 38,575 times: LLaVA-style instruction data
puts every question behind its own context (a persona, a scene, constraints on the answer), so no text
repeats and a sample takes a few hundred LM tokens. This generator writes such a file (adaptkit's JSONL
VQA format) for benchmarks and scale tests: each sample is one easy-VQA question about its image with a
seeded random context of ``min_tokens``..``max_tokens`` LM tokens in front (lengths drawn uniformly; the
whole text, question and answer included, counted with the LM's tokenizer when ``--tokenizer`` is given,
else estimated at 1.3 tokens per word). The answer stays easy-VQA's, so accuracy stays meaningful.

    python benchmarks/instruction_data.py data/instruct_4k --questions 4000
    python benchmarks/instruction_data.py data/instruct_4k --questions 4000 --tokenizer embedded

Every context is built from sentence templates whose slots are filled independently (names, places,
numbers, tasks, styles), and the file is checked to have no repeated text.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = (
    "Amara", "Bastian", "Chiara", "Dmitri", "Eun-ji", "Farid", "Greta", "Hiroshi", "Ines", "Jonas",
    "Kavya", "Lucas", "Mei", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tomasz", "Ulla",
    "Valentina", "Wen", "Ximena", "Yusuf", "Zofia",
)  # fmt: skip
PLACES = (
    "a primary school in Lisbon", "a design studio in Osaka", "a print shop near the harbour",
    "a museum's education team", "a hospital's signage office", "a board-game company",
    "a children's library", "a textile workshop", "an accessibility lab", "a science centre",
    "a map-making cooperative", "a kindergarten in Tallinn", "a puzzle magazine", "a robotics club",
)  # fmt: skip
TASKS = (
    "sorting a box of printed cards", "checking the illustrations of a workbook",
    "labelling pictures for a screen reader", "preparing a quiz for a class of {n}-year-olds",
    "auditing {n} images from a scanned archive", "building a memory game with {n} pairs",
    "reviewing stickers before an order of {n} sheets", "cataloguing drawings for an exhibition",
    "testing a colour-blindness friendly palette", "writing alt text for a web page",
)  # fmt: skip
SCENES = (
    "The picture was exported at {n} pixels and may look slightly blurred.",
    "Earlier today {name} looked at {n} similar pictures and wrote down one word for each.",
    "The background is plain and carries no meaning, so it can be ignored.",
    "Some cards in the set were printed twice; this does not matter for the answer.",
    "{name} prefers answers that a child of {n} would understand.",
    "The image is one of {n} in the batch, and each has exactly one figure on it.",
    "The previous reviewer, {name}, left a note saying the lighting was fine.",
    "Nobody has edited this picture since it was drawn on day {n} of the project.",
    "There may be a thin border around the picture; it is not part of the figure.",
    "{name} will copy the answer into a spreadsheet cell, so extra words cause trouble.",
    "The team meets in room {n} to go through the answers together.",
    "A second opinion from {name} is expected later, so be as precise as you can.",
    "The figures were drawn with a simple tool that fills every shape with a single colour.",
    "If the figure touches the edge of the picture, it still counts as a whole figure.",
    "The set mixes squares, circles and triangles in many colours and sizes.",
)  # fmt: skip
STYLES = (
    "Reply with one word.", "Answer with a single lowercase word and nothing else.",
    "Give only the answer, no explanation.", "Keep the answer as short as possible.",
    "Do not repeat the question in your answer.", "Use the plain everyday word for the answer.",
)  # fmt: skip
OPENERS = (
    "You are assisting {name} from {place}, who is {task}.",
    "{name} works at {place} and is {task}.",
    "This request comes from {name} at {place}; they are {task}.",
    "Context: {name} ({place}) is {task} and needs your help with one picture.",
)  # fmt: skip


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        name=rng.choice(NAMES),
        place=rng.choice(PLACES),
        task=rng.choice(TASKS).format(n=rng.randint(3, 90)),
        n=rng.randint(2, 999),
    )


def _words(text: str) -> int:
    return len(text.split())


def make_context(rng: random.Random, budget: int, count) -> str:
    """A context of at most ``budget`` tokens by ``count`` (and at least the opener and a style
    instruction): scene sentences drawn in a shuffled order, each added while it fits."""
    opener, style = _fill(rng.choice(OPENERS), rng), rng.choice(STYLES)
    parts = [opener]
    misses = 0
    while misses < 10:  # ten sentences in a row that do not fit: the context is full
        scene = _fill(rng.choice(SCENES), rng)
        if scene not in parts and count(" ".join([*parts, scene, style])) <= budget:
            parts.append(scene)
            misses = 0
        else:
            misses += 1
    return " ".join([*parts, style])


def generate(samples, n: int, seed: int, min_tokens: int, max_tokens: int, count) -> list[dict]:
    """``n`` rows ``{"image", "question", "answer"}`` from easy-VQA ``samples``: each question behind a
    distinct context so that the whole text takes ``min_tokens``..``max_tokens`` tokens by ``count``."""
    rng = random.Random(seed)
    if n <= len(samples):
        picked = rng.sample(range(len(samples)), n)
    else:
        picked = [rng.randrange(len(samples)) for _ in range(n)]
    rows, seen = [], set()
    for i in picked:
        s = samples[i]
        tail = f" Question: {s.question}"
        target = rng.randint(min_tokens, max_tokens) - count(tail + " " + s.answer) - 1  # 1: EOS
        while True:
            question = make_context(rng, target, count) + tail
            if question not in seen:
                break
        seen.add(question)
        rows.append({"image": str(s.image), "question": question, "answer": s.answer})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write questions.jsonl into")
    parser.add_argument("--questions", type=int, default=4000)
    parser.add_argument("--source", default="easyvqa:train", help="easyvqa:train or easyvqa:test")
    parser.add_argument("--min-tokens", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenizer", default=None, help="count tokens with this LM's tokenizer (embedded: SmolLM2)"
    )
    args = parser.parse_args()
    from adaptkit.data.formats import load_easyvqa

    samples = load_easyvqa(args.source.split(":", 1)[1]).samples
    if args.tokenizer:
        from transformers import AutoTokenizer

        from adaptkit.backbones.language import resolve_lm_path

        name = "embedded:smollm2" if args.tokenizer == "embedded" else args.tokenizer
        tok = AutoTokenizer.from_pretrained(resolve_lm_path(name))

        def count(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])
    else:

        def count(text: str) -> int:
            return round(1.3 * _words(text))

    rows = generate(samples, args.questions, args.seed, args.min_tokens, args.max_tokens, count)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lengths = sorted(count(r["question"] + " " + r["answer"]) + 1 for r in rows)
    print(
        f"wrote {len(rows)} questions ({len({r['question'] for r in rows})} distinct texts, "
        f"{len({r['image'] for r in rows})} images) to {path}; tokens per text: min {lengths[0]}, "
        f"median {lengths[len(lengths) // 2]}, max {lengths[-1]}"
    )


if __name__ == "__main__":
    main()
