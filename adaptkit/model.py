"""MultimodalModel: frozen vision backbone → trainable fusion adapter → frozen LM with LoRA.

The adapter's soft tokens are prepended to the prompt's embeddings. Training computes LM logits only
at positions whose next token is an answer token (never the full-vocabulary logits of the prompt).
Only trainable pieces are saved: the adapter as safetensors, LoRA in peft's own format.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit.adapters import build_adapter
from adaptkit.backbones.language import load_language_model
from adaptkit.backbones.vision import VisionBackbone, build_vision_backbone
from adaptkit.config import Recipe
from adaptkit.data.feature_cache import tensor_digest

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
LORA_DIR = "lora"


class MultimodalModel(nn.Module):
    """The whole model. ``vision`` and the LM's base weights are frozen; ``adapter`` and LoRA train."""

    def __init__(self, vision: VisionBackbone, adapter: nn.Module, lm: nn.Module, tokenizer) -> None:
        super().__init__()
        self.vision = vision
        self.adapter = adapter
        self.lm = lm
        self.tokenizer = tokenizer
        # False runs the LM without its LoRA branches (adapter-only phase before lora.start_step).
        self.lora_active = True

    @property
    def base_lm(self) -> nn.Module:
        """The transformers causal LM (inside peft's wrapper when LoRA is on)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def embed(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepend the adapter's soft tokens to the text embeddings; returns ``(embeds, mask)``.

        ``prompt_mask`` marks the tokens a text-conditioned adapter may read (never the answer);
        it defaults to ``attention_mask`` (generation, where the input is all prompt).
        """
        text = self.base_lm.get_input_embeddings()(input_ids)
        read = attention_mask if prompt_mask is None else prompt_mask
        soft = self.adapter(features.to(text.device), text, read).to(text.dtype)
        ones = torch.ones(soft.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        return torch.cat([soft, text], dim=1), torch.cat([ones, attention_mask], dim=1)

    def _answer_logits(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at answer positions only, and a mask of where those positions are in ``labels``."""
        prompt_mask = attention_mask * (labels == -100)
        embeds, mask = self.embed(features, input_ids, attention_mask, prompt_mask)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        skip_lora = not self.lora_active and hasattr(self.lm, "disable_adapter")
        with self.lm.disable_adapter() if skip_lora else contextlib.nullcontext():
            hidden = self.base_lm.get_decoder()(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
            ).last_hidden_state
        n_soft = embeds.shape[1] - input_ids.shape[1]
        # hidden[:, t] predicts token t+1; text token j sits at position n_soft + j.
        text_hidden = hidden[:, n_soft - 1 : -1]
        selected = labels != -100
        return self.base_lm.get_output_embeddings()(text_hidden[selected]), selected

    def forward(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Mean cross-entropy over answer tokens, with logits computed only where they are needed."""
        logits, selected = self._answer_logits(features, input_ids, attention_mask, labels)
        return F.cross_entropy(logits.float(), labels[selected])

    @torch.no_grad()
    def sequence_logprobs(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Per-row sum of the answer tokens' log-probabilities (right-padded rows, as for training)."""
        logits, selected = self._answer_logits(features, input_ids, attention_mask, labels)
        token_logp = logits.float().log_softmax(-1).gather(-1, labels[selected].unsqueeze(-1)).squeeze(-1)
        rows = selected.nonzero()[:, 0]
        return torch.zeros(labels.shape[0], device=token_logp.device).index_add_(0, rows, token_logp)

    @torch.no_grad()
    def generate(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int = 5,
    ) -> tuple[list[str], list[float]]:
        """Greedy answers for left-padded prompts, with each answer's probability under the model."""
        embeds, mask = self.embed(features, input_ids, attention_mask)
        out = self.lm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        tokens = out.sequences[:, -len(out.scores) :]
        logprobs = torch.stack([s.float().log_softmax(-1) for s in out.scores], dim=1)
        chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        eos = self.tokenizer.eos_token_id
        # Count each token up to and including the first EOS.
        after_eos = (tokens == eos).long().cumsum(-1) - (tokens == eos).long()
        scores = (chosen * (after_eos == 0)).sum(-1).exp().tolist()
        answers = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [a.strip() for a in answers], scores

    # ---- trainable state -------------------------------------------------------------------

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def save_trainables(self, directory: str | Path) -> None:
        """Write the adapter (safetensors) and LoRA (peft format) into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.adapter.state_dict().items()}
        save_file(state, str(directory / ADAPTER_FILE))
        if hasattr(self.lm, "save_pretrained") and hasattr(self.lm, "peft_config"):
            self.lm.save_pretrained(str(directory / LORA_DIR))

    def load_adapter(self, directory: str | Path) -> None:
        """Load adapter weights saved by :meth:`save_trainables` (strict: shapes and keys must match)."""
        from safetensors.torch import load_file

        path = Path(directory) / ADAPTER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; is {directory} a run directory of `adaptkit train`?")
        try:
            self.adapter.load_state_dict(load_file(str(path)), strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path} does not fit this recipe's adapter: {err}") from None


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameter count; 4-bit packed parameters count their unpacked elements."""
    total = 0
    for param in module.parameters():
        if trainable_only and not param.requires_grad:
            continue
        n = param.numel()
        if type(param).__name__ == "Params4bit":
            n *= 2
        total += n
    return total


def frozen_fingerprint(model: nn.Module) -> str:
    """A blake2b digest of every frozen parameter's bytes (to assert nothing frozen changed)."""
    return tensor_digest((n, p) for n, p in model.named_parameters() if not p.requires_grad)


def build_model(
    recipe: Recipe,
    device: torch.device | str = "cpu",
    lora_dir: str | Path | None = None,
    dequantize_lm: bool = False,
):
    """Build the model a recipe describes: frozen backbones, a fresh adapter, LoRA via peft.

    Args:
        lora_dir: load trained LoRA weights from this peft folder instead of initializing new ones.
        dequantize_lm: load the LM at the recipe's quantization, then dequantize it to float32 (the base
            `adaptkit export` merges a 4/8-bit run's LoRA into).
    """
    vision = build_vision_backbone(recipe.vision, device)
    lm, tokenizer = load_language_model(recipe.language, device)
    if dequantize_lm and recipe.language.quant != "none":
        lm = lm.dequantize().float()
    embeddings = lm.get_input_embeddings()
    output_std = embeddings.weight.float().std().item()
    adapter = build_adapter(recipe.adapter, vision.feature_dim, embeddings.embedding_dim, output_std).to(
        device
    )
    if lora_dir is not None:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(lora_dir), is_trainable=False)
    elif recipe.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=recipe.lora.r,
            lora_alpha=recipe.lora.alpha,
            lora_dropout=recipe.lora.dropout,
            target_modules=list(recipe.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        lm = get_peft_model(lm, lora)
    model = MultimodalModel(vision, adapter, lm, tokenizer)
    if recipe.activation_checkpointing:
        # Recompute each checkpointed LM layer's activations in the backward pass instead of keeping them:
        # activations, not the frozen weights, dominate a small LM's training memory.
        model.base_lm.activation_checkpointing_enable(every_n_layers=recipe.activation_checkpointing)
    log.info(
        "model: vision %s (frozen, D=%d), adapter %s, LM %s (%s, frozen%s)",
        vision.identity,
        vision.feature_dim,
        recipe.adapter.kind,
        recipe.language.name,
        recipe.language.quant,
        " + LoRA" if recipe.lora.enabled else "",
    )
    return model
