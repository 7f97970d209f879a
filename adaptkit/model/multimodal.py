"""MultimodalModel: frozen vision backbone → trainable fusion adapter → frozen LM with LoRA.

The data path, one step per part: :meth:`MultimodalModel.encode_images` (the frozen backbone), the
adapter (``adaptkit.adapters``) reading the features and, when text-conditioned, the prompt, the fusion
(``fusion.py``: soft tokens in the sequence or cross-attention blocks, and which decoder layers run), the
LM's logits at the positions whose next token is an answer token, and the recipe's objectives
(``adaptkit.objectives``) on them. Decoding lives in ``generation.py``; saving and loading the trained
parts in ``trainables.py``.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from torch import nn

from adaptkit.backbones.vision import VisionBackbone
from adaptkit.model import generation
from adaptkit.model.batch import Batch, Outputs
from adaptkit.model.decoder import LMInput
from adaptkit.model.fusion import Fusion, make_fusion
from adaptkit.model.packing import packed_attention
from adaptkit.objectives import IGNORE, Objectives


class MultimodalModel(nn.Module):
    """The whole model. ``vision`` and the LM's base weights are frozen; ``adapter``, LoRA and the
    objectives' heads train.

    Args:
        vision: the frozen vision backbone.
        adapter: a fusion adapter (``adaptkit.adapters.base.FusionAdapter``).
        lm: the causal LM, inside peft's wrapper when LoRA is on.
        tokenizer: the LM's tokenizer.
        entry_layer: the first LM decoder layer whose input depends on the image
            (``FusionAdapter.entry_layer``; 0: the LM's input).
    """

    def __init__(
        self, vision: VisionBackbone, adapter: nn.Module, lm: nn.Module, tokenizer, entry_layer: int = 0
    ) -> None:
        super().__init__()
        self.vision = vision
        self.adapter = adapter
        self.lm = lm
        self.tokenizer = tokenizer
        #: how the adapter's output reaches the LM and which decoder layers each pass runs.
        self.fusion: Fusion = make_fusion(self.base_lm, adapter, tokenizer, entry_layer)
        # False runs the LM without its LoRA branches (adapter-only phase before lora.start_step).
        self.lora_active = True
        self.objectives = Objectives()
        #: the frozen text encoder of the image-text objectives (``adaptkit.backbones.text``), or None.
        self.text_encoder: nn.Module | None = None
        #: the storage dtype the run's features went through (recipe key ``feature_dtype``); fresh features
        #: are rounded through it too, so predict, export and the demo see what training saw.
        self.feature_dtype = torch.float32

    @property
    def base_lm(self) -> nn.Module:
        """The transformers causal LM (inside peft's wrapper when LoRA is on)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    @property
    def entry_layer(self) -> int:
        """The first LM decoder layer whose input depends on the image."""
        return self.fusion.entry

    @property
    def loss_parts(self) -> dict[str, torch.Tensor]:
        """Each objective's value (detached) in the last training forward pass."""
        return self.objectives.parts

    # ---- the image ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images: list) -> torch.Tensor:
        """Frozen-backbone features ``(B, T, D_v)`` of decoded RGB images (``adaptkit.data.images``), on the
        LM's device, float32 rounded through :attr:`feature_dtype`."""
        from adaptkit.data.encoding import encode_images

        device = self.base_lm.get_input_embeddings().weight.device
        return encode_images(self.vision, images, device, self.feature_dtype)

    def read_image(self, features: torch.Tensor, input_ids: torch.Tensor, read: torch.Tensor):
        """The LM's input embedding module, the text's embeddings and the adapter's output for it (a
        text-conditioned adapter reads the prompt tokens ``read`` marks, never the answer)."""
        embedding = self.base_lm.get_input_embeddings()
        text = embedding(input_ids)
        return embedding, text, self.adapter(features.to(text.device), text, read)

    def image_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """What the adapter makes of images with no text to read: ``(B, tokens, D_lm)``."""
        device = self.base_lm.get_input_embeddings().weight.device
        return self.adapter(features.to(device))

    def lm_input(
        self, features, input_ids, attention_mask, prompt_mask=None, lookup: bool = False
    ) -> LMInput:
        """The LM's input for right-padded rows (see ``Fusion.lm_input``); ``prompt_mask`` marks what a
        text-conditioned adapter reads (default: ``attention_mask``)."""
        read = attention_mask if prompt_mask is None else prompt_mask
        embedding, text, out = self.read_image(features, input_ids, read)
        return self.fusion.lm_input(embedding, text, out, attention_mask, input_ids, lookup=lookup)

    # ---- training and scoring -----------------------------------------------------------------------

    def forward(self, batch: Batch) -> Outputs:
        """The outputs of a batch and its loss under the recipe's objectives (``self.objectives``). The LM
        runs only when the batch has ``labels``, and only up to the logits of the answer tokens."""
        if batch.text_ids is not None:
            batch = replace(batch, text_states=self.text_encoder.encode(batch.text_ids, batch.text_mask))
        if batch.labels is None:
            out = Outputs(image=self.image_tokens(batch.features))
        else:
            logits, selected, image = self.answer_logits(batch)
            out = Outputs(image=image, logits=logits, targets=batch.labels[selected])
        # Inside forward, so that DDP sees the objectives' heads used and syncs their gradients.
        out.loss = self.objectives(out.for_objectives(batch))
        return out

    def answer_logits(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits at answer positions only, a mask of where those positions are in ``labels``, and the
        adapter's output. Plain rows or packed ones (``segment_ids``, ``positions``)."""
        labels, attention_mask = batch.labels, batch.attention_mask
        prompt_mask = attention_mask * (labels == IGNORE)
        embedding, text, out = self.read_image(batch.features, batch.input_ids, prompt_mask)
        inp = self.fusion.lm_input(embedding, text, out, attention_mask, batch.input_ids, batch.segment_ids)
        if batch.segment_ids is None:
            mask, position_ids = inp.mask, (inp.mask.cumsum(-1) - 1).clamp(min=0)
        else:
            mask, position_ids = packed_attention(
                batch.segment_ids, batch.positions, inp.n_lead, inp.embeds.dtype, self.base_lm.config
            )
        selected = labels != IGNORE
        # hidden[:, t] predicts token t+1; text token j sits at position n_lead + j. Without a lead
        # (cross-attention from layer 0) nothing predicts text token 0, which is always prompt.
        rows, cols = selected.nonzero(as_tuple=True)
        cols = cols + inp.n_lead - 1 if inp.n_lead else (cols - 1).clamp(min=0)
        skip_lora = not self.lora_active and hasattr(self.lm, "disable_adapter")
        with self.lm.disable_adapter() if skip_lora else contextlib.nullcontext():
            hidden = self.fusion.run.at(inp, mask, position_ids, rows, cols)
        return self.base_lm.get_output_embeddings()(hidden), selected, out

    @torch.no_grad()
    def sequence_logprobs(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Per-row sum of the answer tokens' log-probabilities (right-padded rows, as for training)."""
        logits, selected, _ = self.answer_logits(Batch(features, input_ids, attention_mask, labels))
        token_logp = logits.float().log_softmax(-1).gather(-1, labels[selected].unsqueeze(-1)).squeeze(-1)
        rows = selected.nonzero()[:, 0]
        return torch.zeros(labels.shape[0], device=token_logp.device).index_add_(0, rows, token_logp)

    @torch.no_grad()
    def logits(
        self, features, input_ids, attention_mask, prompt_mask=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM's logits at every position of right-padded rows through the whole model, ``(B, S, V)``,
        and the sequence's keep-mask ``(B, S)`` (the lead included): what export verification compares."""
        inp = self.lm_input(features, input_ids, attention_mask, prompt_mask)
        return self.fusion.run.everywhere(inp), inp.mask

    # ---- generation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int = 5,
    ) -> tuple[list[str], list[float]]:
        """Greedy answers for left-padded prompts, with each answer's probability under the model."""
        tokens, chosen = self.greedy(features, input_ids, attention_mask, max_new_tokens)
        return generation.decode(self.tokenizer, tokens, chosen)

    @torch.no_grad()
    def greedy(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int = 5,
        stop_at_eos: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy tokens and their log-probabilities (:func:`adaptkit.model.generation.greedy`)."""
        return generation.greedy(self, features, input_ids, attention_mask, max_new_tokens, stop_at_eos)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]
