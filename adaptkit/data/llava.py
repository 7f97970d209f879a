"""LLaVA conversation JSON (LLaVA-Instruct / LLaVA-1.5 mix format) as VQA samples.

A file is a JSON list of entries::

    {"id": "...", "image": "coco/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."},
                       {"from": "human", "value": "What is on its back?"}, {"from": "gpt", "value": "..."}]}

Every ``gpt`` turn becomes one sample: its ``human`` turn is the question, the turns before it are the
sample's context, so each answer is trained with the conversation that led to it (the loss LLaVA takes
on every assistant turn, one sample per turn). Set ``data.chat_template: true`` to render the turns with
the LM's chat template, as LLaVA does. ``image`` is relative to the file (or absolute; an ``images/``
folder beside the file is also tried).

``<image>`` placement: adaptkit gives the LM the image before the conversation (as soft tokens in front,
or at ``adapter.inject_layer``), which is where LLaVA's data puts it (the start or end of the first human
turn); the placeholder is removed from the text. An ``<image>`` anywhere else, more than one, or none in
the first turn is a bad entry (named ``file[index]``), as are roles that do not alternate human / gpt and
entries without an image.
"""

from __future__ import annotations

import json
from pathlib import Path

from adaptkit.data.records import DataError, LoadedData, VQASample, bad_sample, resolve_image

IMAGE_TOKEN = "<image>"


def _turns(entry: dict) -> tuple[list[tuple[str, str]] | None, str | None]:
    """The entry's (question, answer) turns, the placeholder removed, or the problem."""
    convo = entry.get("conversations")
    if not isinstance(convo, list) or len(convo) < 2:
        return None, "needs 'conversations', a list of human / gpt turns"
    roles = [t.get("from") if isinstance(t, dict) else None for t in convo]
    if any(r != ("human" if k % 2 == 0 else "gpt") for k, r in enumerate(roles)) or len(convo) % 2:
        return None, f"turns must alternate human, gpt, ... and end with gpt; got {roles}"
    values = [t.get("value") for t in convo]
    if not all(isinstance(v, str) and v.strip() for v in values):
        return None, "every turn needs a non-empty 'value'"
    first = values[0].strip()
    if sum(v.count(IMAGE_TOKEN) for v in values) != 1 or not (
        first.startswith(IMAGE_TOKEN) or first.endswith(IMAGE_TOKEN)
    ):
        return None, (
            f"needs exactly one {IMAGE_TOKEN}, at the start or end of the first human turn (adaptkit puts "
            "the image before the conversation)"
        )
    values[0] = first.replace(IMAGE_TOKEN, "").strip()
    if not values[0]:
        return None, f"the first human turn has no text besides {IMAGE_TOKEN}"
    return [(values[k], values[k + 1].strip()) for k in range(0, len(values), 2)], None


def load_llava(path: str | Path, on_bad_sample: str = "error") -> LoadedData:
    """VQA samples of a LLaVA conversation file, one per assistant turn (module docstring)."""
    file = Path(path)
    try:
        entries = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"data file {file} does not exist") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{file}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(entries, list):
        raise DataError(f"{file}: a LLaVA conversation file is a JSON list of entries")
    samples, skipped = [], []
    for i, entry in enumerate(entries):
        origin = f"{file}[{i}]"
        turns, problem = (None, "expected a JSON object") if not isinstance(entry, dict) else _turns(entry)
        image = None
        if problem is None:
            name = entry.get("image")
            if not isinstance(name, str) or not name.strip():
                problem = "has no 'image' (text-only conversations are not supported)"
            else:
                image, problem = resolve_image(file, name)
                if problem is not None:
                    image, problem = resolve_image(file, str(Path("images") / name))
        if problem is not None:
            bad_sample(skipped, origin, problem, on_bad_sample, "entry")
            continue
        for k, (question, answer) in enumerate(turns):
            samples.append(
                VQASample(str(image), question, answer, f"{origin} turn {k + 1}", (), tuple(turns[:k]))
            )
    if not samples:
        raise DataError(f"{file}: no usable conversations ({len(skipped)} skipped)")
    return LoadedData(samples, skipped)
