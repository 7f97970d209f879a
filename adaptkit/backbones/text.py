"""The text encoder: any Hugging Face encoder (BERT, MiniLM, ...), read for contrastive objectives.

``text_encoder.name`` is a hub id, a local folder, or ``embedded:minilm`` (the packaged
all-MiniLM-L6-v2). The encoder is frozen; what trains on top of it (a projection into the shared
embedding space, the matching head) lives in ``adaptkit.contrastive``. Because it is frozen, a text's
token states never change: :class:`TextBank` computes them once per distinct text, in fixed batches of
one text each (so a text's states never depend on which texts share its batch), and training looks
them up by row, the way image features come from the feature bank.

With ``text_encoder.lora_r`` > 0 the encoder gets LoRA through peft (its base weights stay frozen): its
states then change as it trains, so training encodes each batch's texts (:meth:`TextEncoder.encode`, with
gradients) and evaluation encodes its texts afresh. The LoRA weights are saved with the run
(``text_lora.safetensors``) and merged into the encoder an export carries.
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
    """A frozen Hugging Face encoder (optionally with LoRA) returning token states ``(B, L, D)`` and their
    mask.

    Args:
        cfg: the recipe's ``text_encoder`` section (``name``, ``max_length``, ``lora_*``).
        device: where the encoder lives.
    """

    def __init__(self, cfg: TextEncoderConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = resolve_text_encoder_path(cfg.name)
        self.name = cfg.name
        self.max_length = cfg.max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = freeze(AutoModel.from_pretrained(path).to(device))
        self.dim = int(model.config.hidden_size)
        #: True when LoRA trains inside the encoder (its states change as it trains).
        self.trainable = cfg.lora_r > 0
        if self.trainable:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=0.0,
                target_modules=list(cfg.lora_target_modules),
            )
            try:
                model = get_peft_model(model, lora)
            except ValueError as err:
                names = sorted(
                    {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
                )
                raise ValueError(
                    f"text_encoder.lora_target_modules={list(cfg.lora_target_modules)} do not fit {cfg.name} "
                    f"({err}); its linear layers are named {names}"
                ) from None
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> TextEncoder:
        # The encoder stays in eval mode (no dropout), with LoRA too: a text's states depend on the weights
        # alone, as the frozen bank's do, in training and evaluation alike.
        super().train(mode)
        self.model.eval()
        return self

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask ``(B, L)`` of ``texts`` (cut to ``max_length``), on the device."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        return batch["input_ids"], batch["attention_mask"]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer token states ``(B, L, D)`` in float32; with gradients only when LoRA trains."""
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return states.float()

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-layer token states ``(B, L, D)`` (float32) and the attention mask ``(B, L)``."""
        ids, mask = self.tokenize(texts)
        return self.encode(ids, mask), mask

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The LoRA weights (empty without LoRA), for ``text_lora.safetensors``."""
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items() if "lora_" in k}

    def load_lora_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load :meth:`lora_state`'s weights; keys and shapes must match exactly."""
        expected = self.lora_state()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
            raise ValueError(f"{source} does not fit this recipe's text-encoder LoRA (keys or shapes differ)")
        self.model.load_state_dict(state, strict=False)

    def merged(self) -> nn.Module:
        """The transformers encoder with LoRA merged into its weights (the encoder itself without LoRA)."""
        return self.model.merge_and_unload() if self.trainable else self.model


class TextBank:
    """Frozen token states of a fixed list of texts, computed once, looked up by row.

    Rows are right-padded to the longest text; ``lookup(rows)`` trims the padding the selected texts
    do not need. Each text is encoded alone, so its states are the same in any run, batch or process.
    """

    def __init__(self, encoder: TextEncoder, texts: Sequence[str], progress: bool = True) -> None:
        self.texts = list(texts)
        states, lengths = [], []
        with torch.no_grad():
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
