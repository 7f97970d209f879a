"""(image, caption) pairs of caption data: the dataset of the retrieval and caption tasks.

Every caption of an image is one pair; a pair's *group* is the image's label when the data has one, else the
image itself (pairs of one group are positives of each other in the image-text objectives). With an LM
prompt, each pair also carries the prompt and the caption as an LM target (captioning, BLIP-2's ITG).
"""

from __future__ import annotations

import torch

from adaptkit.backbones.text import TextBank
from adaptkit.data.collate import collate_train, fit


def caption_lengths(samples, tokenizer, prompt: str) -> list[int]:
    """Each caption sample's LM tokens: the prompt, its longest caption and EOS."""
    prompt_len = len(tokenizer([prompt], add_special_tokens=False)["input_ids"][0])
    texts = [" " + " ".join(c.split()) for s in samples for c in s.captions]
    ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    return [prompt_len + max((len(next(ids)) for _ in s.captions), default=0) + 1 for s in samples]


class PairDataset(torch.utils.data.Dataset):
    """Every (image, caption) pair of caption samples whose image has a feature row.

    Attributes:
        samples: the pairs' samples (one entry per pair; a sample with k captions appears k times).
        image_rows: each pair's feature row.
        texts: the distinct captions; ``text_ids[k]`` is pair k's.
        groups: each pair's group id (``group_names[g]``: the label, or the image path).
    """

    def __init__(
        self,
        samples,
        image_rows: dict[str, int],
        tokenizer=None,
        prompt: str | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self.samples, self.image_rows, self.text_ids, self.groups = [], [], [], []
        self.texts: list[str] = []
        self.group_names: list[str] = []
        text_index: dict[str, int] = {}
        group_index: dict[str, int] = {}
        captions = []
        for sample in samples:
            if sample.image not in image_rows:
                continue
            group = sample.label if sample.label is not None else sample.image
            gid = group_index.setdefault(group, len(group_index))
            for caption in sample.captions:
                text = " ".join(caption.split())
                self.text_ids.append(text_index.setdefault(text, len(text_index)))
                self.samples.append(sample)
                self.image_rows.append(image_rows[sample.image])
                self.groups.append(gid)
                captions.append(text)
        self.texts = list(text_index)
        self.group_names = list(group_index)
        self.bank: TextBank | None = None
        self.prompt_ids = self.target_ids = None
        if tokenizer is not None and prompt is not None and captions:  # image-grounded generation (lm > 0)
            self.prompt_ids = tokenizer([prompt], add_special_tokens=False)["input_ids"][0]
            eos = [tokenizer.eos_token_id]
            targets = tokenizer([" " + c for c in captions], add_special_tokens=False)["input_ids"]
            # The prompt is one for every pair: with max_tokens the captions alone are cut to fit beside it.
            room = None if max_tokens is None else max_tokens - len(self.prompt_ids)
            self.target_ids = [fit([], ids + eos, room)[1] for ids in targets]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        item = {"index": i, "image": self.image_rows[i], "text": self.text_ids[i], "group": self.groups[i]}
        if self.target_ids is not None:
            item["prompt"], item["target"] = self.prompt_ids, self.target_ids[i]
        return item

    def text_bank(self, encoder, progress: bool = True) -> TextBank:
        """The encoder's states of :attr:`texts`: computed on first use for a frozen encoder, afresh on
        every call for one whose LoRA trains."""
        if encoder.trainable:
            return TextBank(encoder, self.texts, progress)
        if self.bank is None:
            self.bank = TextBank(encoder, self.texts, progress)
        return self.bank

    def prepare_texts(self, encoder) -> None:
        """Encode a frozen encoder's texts now (at set-up, not in the first step); nothing to do when its
        LoRA trains (each batch's texts are encoded in the forward pass)."""
        if not encoder.trainable:
            self.text_bank(encoder)

    def text_inputs(self, encoder, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's text arguments for texts ``rows``: a frozen encoder's states from the bank
        (``text_states``, ``text_mask``), or, when its LoRA trains, the tokens it encodes inside the
        model's forward (``text_ids``, ``text_mask``)."""
        if encoder.trainable:
            ids, mask = encoder.tokenize([self.texts[i] for i in rows.tolist()])
            return {"text_ids": ids, "text_mask": mask}
        states, mask = self.text_bank(encoder).lookup(rows)
        return {"text_states": states, "text_mask": mask}


def collate_pairs(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Image rows, text rows and groups of pairs; with LM targets, also ``collate_train``'s LM batch."""
    if "target" in items[0]:
        batch = collate_train(items, pad_id)
    else:
        batch = {
            "image": torch.tensor([it["image"] for it in items]),
            "index": torch.tensor([it["index"] for it in items]),
        }
    batch["text"] = torch.tensor([it["text"] for it in items])
    batch["group"] = torch.tensor([it["group"] for it in items])
    return batch
