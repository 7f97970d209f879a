"""Tokenized VQA samples and the two batch layouts: training (right-padded) and generation (left-padded).

Text is ``format_prompt(prompt_template, question)``, then for training ``" " + answer`` and the EOS
token. Prompts and answers are tokenized separately so the loss mask falls exactly on answer tokens.
All tokenization happens once, when the dataset is built.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from adaptkit.data.formats import VQASample


def format_prompt(template: str, question: str) -> str:
    """The LM's prompt for a question: ``template`` with ``{question}`` filled in, the question's
    whitespace normalized (ends stripped, runs of spaces, tabs and newlines made one space), so that
    "what is the red shape? " asks what training's "what is the red shape?" asked."""
    return template.format(question=" ".join(question.split()))


def question_prompt(
    template: str, question: str, context: Sequence[tuple[str, str]] = (), tokenizer=None, chat: bool = False
) -> str:
    """The prompt of a question after the earlier turns ``context`` (``(question, answer)`` pairs).

    ``chat``: the LM tokenizer's chat template renders the turns (user: the formatted question, assistant:
    its answer) and opens the assistant's turn (``data.chat_template``). Otherwise the turns are joined as
    plain text: each earlier question's prompt followed by its answer, then this question's prompt.
    """
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("data.chat_template=true, but the LM's tokenizer has no chat template")
        messages = []
        for q, a in context:
            messages += [
                {"role": "user", "content": format_prompt(template, q)},
                {"role": "assistant", "content": a},
            ]
        messages.append({"role": "user", "content": format_prompt(template, question)})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return " ".join(
        [f"{format_prompt(template, q)} {a.strip()}" for q, a in context]
        + [format_prompt(template, question)]
    )


def answer_text(answer: str, chat: bool = False) -> str:
    """The target text of an answer: after a space in a plain prompt, right after a chat template's
    opened assistant turn (then EOS, which closes the turn for chat-tuned LMs such as SmolLM2)."""
    return answer.strip() if chat else " " + answer.strip()


def fit(prompt: list[int], target: list[int], max_tokens: int | None) -> tuple[list[int], list[int]]:
    """``prompt + target`` cut to ``max_tokens`` (``data.long_text=truncate``): the prompt from its start,
    down to one token, then the target from its end, its last token (EOS) kept."""
    if max_tokens is None or len(prompt) + len(target) <= max_tokens:
        return prompt, target
    keep = max(1, max_tokens - len(target))
    prompt = prompt[len(prompt) - keep :]
    room = max_tokens - len(prompt)
    if len(target) > room:
        target = target[: max(0, room - 1)] + target[-1:]
    return prompt, target


_INTS: list[int] = []


def share_ints(rows: list[list[int]]) -> list[list[int]]:
    """The same token-id lists, their ints taken from one shared table. CPython makes a new 28-byte object
    for every int above 256 a tokenizer returns; shared, an id costs its 8-byte slot in the list. On short
    VQA questions this is 40% of a tokenized question's memory (tracemalloc: 479 -> 284 bytes), which is
    what grows with a dataset once its features stay on disk (docs/benchmarks.md, "Feature store at
    scale")."""
    top = max((max(r) for r in rows if r), default=-1)
    if top >= len(_INTS):
        _INTS.extend(range(len(_INTS), top + 1))
    table = _INTS
    return [[table[t] for t in r] for r in rows]


class VQADataset(Dataset):
    """Pre-tokenized samples whose images are rows of a feature source.

    Args:
        samples: the questions; samples whose image is not in ``image_rows`` are dropped.
        image_rows: image path → feature row.
        tokenizer: the LM's tokenizer.
        prompt_template: a format string with ``{question}``.
        chat: render prompts with the tokenizer's chat template (:func:`question_prompt`).
        max_tokens: cut each prompt + target to this many tokens (``data.long_text=truncate``).
    """

    def __init__(
        self,
        samples: Sequence[VQASample],
        image_rows: dict[str, int],
        tokenizer,
        prompt_template: str,
        chat: bool = False,
        max_tokens: int | None = None,
    ) -> None:
        self.samples = [s for s in samples if s.image in image_rows]
        # Index of each sample's answer in an answer vocabulary (set_answer_vocab), for objectives.classify.
        self.answer_class: list[int] | None = None
        self.image_rows = [image_rows[s.image] for s in self.samples]
        prompts = [
            question_prompt(prompt_template, s.question, s.context, tokenizer, chat) for s in self.samples
        ]
        answers = [answer_text(s.answer, chat) for s in self.samples]
        self.prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
        eos = [tokenizer.eos_token_id]
        self.target_ids = (
            [ids + eos for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]]
            if answers
            else []
        )
        if max_tokens is not None:
            fitted = [fit(p, t, max_tokens) for p, t in zip(self.prompt_ids, self.target_ids)]
            self.prompt_ids, self.target_ids = [p for p, _ in fitted], [t for _, t in fitted]
        self.prompt_ids, self.target_ids = share_ints(self.prompt_ids), share_ints(self.target_ids)

    def set_answer_vocab(self, vocab: Sequence[str]) -> int:
        """Label each sample with its answer's index in ``vocab`` (-100 when absent); returns how many
        samples have a label."""
        index = {a: i for i, a in enumerate(vocab)}
        self.answer_class = [index.get(s.answer.strip(), -100) for s in self.samples]
        return sum(c != -100 for c in self.answer_class)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        item = {
            "index": i,
            "image": self.image_rows[i],
            "prompt": self.prompt_ids[i],
            "target": self.target_ids[i],
        }
        if self.answer_class is not None:
            item["answer_class"] = self.answer_class[i]
        return item


def answer_vocab(answers: Sequence[str], max_answers: int) -> list[str]:
    """The ``max_answers`` most frequent answers (ties by text), the classes of objectives.classify."""
    counts = Counter(a.strip() for a in answers)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [a for a, _ in ranked[:max_answers]]


def collate_train(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + target`` with labels on target tokens only (``-100`` elsewhere)."""
    seqs = [it["prompt"] + it["target"] for it in items]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (it, seq) in enumerate(zip(items, seqs)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, len(it["prompt"]) : len(seq)] = torch.tensor(it["target"])
    batch = {
        "image": torch.tensor([it["image"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
    }
    if "answer_class" in items[0]:
        batch["answer_class"] = torch.tensor([it["answer_class"] for it in items])
    return batch


def pack_runs(
    images: Sequence[int], pack: int, lengths: Sequence[int] | None = None, max_tokens: int = 0
) -> list[list[int]]:
    """Positions grouped into runs of consecutive equal ``images``, at most ``pack`` long and, with
    ``lengths`` and ``max_tokens`` > 0, of at most ``max_tokens`` text tokens (a longer text alone): the
    rows of a packed batch."""
    runs: list[list[int]] = []
    used: list[int] = []
    for k, image in enumerate(images):
        n = lengths[k] if lengths is not None else 0
        same = bool(runs) and images[runs[-1][0]] == image and len(runs[-1]) < pack
        if same and (not max_tokens or used[-1] + n <= max_tokens):
            runs[-1].append(k)
            used[-1] += n
        else:
            runs.append([k])
            used.append(n)
    return runs


def collate_packed(items: list[dict], pad_id: int, pack: int, max_tokens: int = 0) -> dict[str, torch.Tensor]:
    """Questions about one image in one right-padded sequence each, behind one copy of its soft tokens.

    Consecutive items with the same image (as ``ImagePackedBatches`` orders them) form a sequence of
    at most ``pack`` segments, each ``prompt + target``. ``segment_ids`` numbers the segments of each
    row from 1 (0 is padding) and ``positions`` restarts at 0 in every segment, so the model can give
    every question exactly the positions and the attention (image tokens + itself) it would have in a
    sequence of its own: the loss equals the unpacked batch's. ``image`` has one row per sequence,
    ``index`` one per question. With ``max_tokens`` > 0 a row takes no question that would bring its
    text past that many tokens.
    """
    lengths = [len(it["prompt"]) + len(it["target"]) for it in items]
    runs = pack_runs([it["image"] for it in items], pack, lengths, max_tokens)
    rows = [[items[k] for k in run] for run in runs]
    width = max(sum(len(it["prompt"]) + len(it["target"]) for it in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, -100, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for seg, it in enumerate(row, start=1):
            seq = it["prompt"] + it["target"]
            end = start + len(seq)
            input_ids[r, start:end] = torch.tensor(seq)
            labels[r, start + len(it["prompt"]) : end] = torch.tensor(it["target"])
            segment_ids[r, start:end] = seg
            positions[r, start:end] = torch.arange(len(seq))
            start = end
        mask[r, :start] = 1
    return {
        "image": torch.tensor([row[0]["image"] for row in rows]),
        "index": torch.tensor([it["index"] for it in items]),
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "segment_ids": segment_ids,
        "positions": positions,
    }


def collate_prompts(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation, so every row's next token is at the last position."""
    width = max(len(it["prompt"]) for it in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["prompt"])
        input_ids[row, width - n :] = torch.tensor(it["prompt"])
        mask[row, width - n :] = 1
    return {
        "image": torch.tensor([it["image"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
        "input_ids": input_ids,
        "attention_mask": mask,
    }
