"""The frozen text encoder: any Hugging Face encoder (BERT, MiniLM, ...), read for contrastive objectives.

``text_encoder.name`` is a hub id, a local folder, or ``embedded:minilm`` (the packaged
all-MiniLM-L6-v2). The encoder is frozen; what trains on top of it (a projection into the shared
embedding space, the matching head) lives in ``adaptkit.objectives``. Because it is frozen, a text's
token states never change: :class:`TextBank` computes them once per distinct text, in fixed batches of
one text each (so a text's states never depend on which texts share its batch), and training looks
them up by row, the way image features come from the feature bank.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from adaptkit.backbones.language import freeze

if TYPE_CHECKING:
    from adaptkit.config import TextEncoderConfig

log = logging.getLogger(__name__)


def resolve_text_encoder_path(name: str) -> str:
    """Turn ``embedded:minilm`` into the packaged folder; hub ids and paths pass through."""
    if name.startswith("embedded:"):
        from adaptkit import assets

        which = name.split(":", 1)[1]
        if which != "minilm":
            raise ValueError(
                f"text_encoder.name: unknown embedded encoder '{which}' (known: embedded:minilm)"
            )
        return str(assets.minilm_dir())
    return name


class TextEncoder(nn.Module):
    """A frozen Hugging Face encoder returning token states ``(B, L, D)`` and their mask.

    Args:
        cfg: the recipe's ``text_encoder`` section (``name``, ``max_length``).
        device: where the encoder lives.
    """

    def __init__(self, cfg: TextEncoderConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = resolve_text_encoder_path(cfg.name)
        self.name = cfg.name
        self.max_length = cfg.max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = freeze(AutoModel.from_pretrained(path).to(device))
        self.dim = int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-layer token states ``(B, L, D)`` (float32) and the attention mask ``(B, L)``."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        states = self.model(**batch).last_hidden_state
        return states.float(), batch["attention_mask"]


class TextBank:
    """Frozen token states of a fixed list of texts, computed once, looked up by row.

    Rows are right-padded to the longest text; ``lookup(rows)`` trims the padding the selected texts
    do not need. Each text is encoded alone, so its states are the same in any run, batch or process.
    """

    def __init__(self, encoder: TextEncoder, texts: Sequence[str], progress: bool = True) -> None:
        self.texts = list(texts)
        states, lengths = [], []
        for text in tqdm(self.texts, desc="encoding texts", unit="text", disable=not progress):
            s, m = encoder([text])
            states.append(s[0])
            lengths.append(int(m.sum()))
        width = max(lengths, default=1)
        dim = encoder.dim
        self.states = torch.zeros(len(self.texts), width, dim, device=encoder.device)
        self.mask = torch.zeros(len(self.texts), width, dtype=torch.long, device=encoder.device)
        for i, (s, n) in enumerate(zip(states, lengths)):
            self.states[i, :n] = s[:n]
            self.mask[i, :n] = 1

    def __len__(self) -> int:
        return len(self.texts)

    def lookup(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """States ``(B, L, D)`` and mask ``(B, L)`` of texts ``rows``, L the longest among them."""
        rows = rows.to(self.states.device)
        mask = self.mask[rows]
        width = max(1, int(mask.sum(1).max()))
        return self.states[rows, :width], mask[:, :width]
