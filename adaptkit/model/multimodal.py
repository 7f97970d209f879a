"""MultimodalModel: frozen vision backbone → trainable fusion adapter → frozen LM with LoRA.

The wiring only: the adapter's soft tokens (``adaptkit.adapters``) go in front of the prompt's
embeddings, or enter at decoder layer ``adapter.inject_layer`` (``injection.py``, with the lower-layer
states looked up per text: ``lower_states.py``); a cross-attention adapter's image tokens are read by its
blocks inside the LM (``cross_attention.py``); training computes LM logits only at positions whose next
token is an answer token and hands them to the recipe's objectives (``adaptkit.objectives``); decoding
lives in ``generation.py``. Only trainable pieces are saved: the adapter as safetensors, LoRA in peft's
own format.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from adaptkit.artifacts import ADAPTER_FILE, HEADS_FILE, LORA_DIR, TEXT_LORA_FILE
from adaptkit.backbones.vision import VisionBackbone
from adaptkit.model import generation, last_layer
from adaptkit.model.cross_attention import CrossAttentionWiring
from adaptkit.model.injection import LayerInjection, states_at_layer
from adaptkit.model.lower_states import LowerStateCache, decoder_slice
from adaptkit.model.packing import packed_attention
from adaptkit.objectives import IGNORE, Objectives

#: heads of ``Objectives`` saved with a run (used at inference): image-text embedding and matching.
SAVED_HEADS = ("embed", "itm")


class MultimodalModel(nn.Module):
    """The whole model. ``vision`` and the LM's base weights are frozen; ``adapter``, LoRA and the
    objectives' heads train.

    Args:
        vision: the frozen vision backbone.
        adapter: a fusion adapter (``adaptkit.adapters.base.FusionAdapter``).
        lm: the causal LM, inside peft's wrapper when LoRA is on.
        tokenizer: the LM's tokenizer.
        inject_layer: the adapter's entry layer (``FusionAdapter.entry_layer``): 0 puts soft tokens at the
            LM's input; k > 0 puts them at decoder layer k (the layers below see a fixed lead and the text);
            a cross-attention adapter's first block sits at k.
    """

    def __init__(
        self, vision: VisionBackbone, adapter: nn.Module, lm: nn.Module, tokenizer, inject_layer: int = 0
    ) -> None:
        super().__init__()
        fusion = getattr(adapter, "fusion", None)
        if fusion not in ("tokens", "cross_attention"):
            raise ValueError(
                f"{type(adapter).__name__}: fusion={fusion!r}; MultimodalModel wires 'tokens' and "
                "'cross_attention' (see adaptkit/adapters/base.py)"
            )
        self.vision = vision
        self.adapter = adapter
        self.lm = lm
        self.tokenizer = tokenizer
        self.inject_layer = inject_layer
        self.injection: LayerInjection | None = None
        if inject_layer:
            sink = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            self.injection = LayerInjection(self.base_lm.get_decoder().layers, inject_layer, sink)
        #: the hooks running a cross-attention adapter's blocks in the LM (None for soft-token adapters).
        self.cross_attention: CrossAttentionWiring | None = None
        if fusion == "cross_attention":
            self.cross_attention = CrossAttentionWiring(self.base_lm.get_decoder().layers, adapter.blocks)
        # Training with inject_layer: the text's states below it, by text (use_lower_state_cache).
        self.lower_states: LowerStateCache | None = None
        # Generation with inject_layer: prompts' lower states and keys/values by text (build_model sets
        # the recipe's lower_state_cache_mb; 0: generate through the whole model).
        self.prompt_cache = generation.PromptCache()
        # False runs the LM without its LoRA branches (adapter-only phase before lora.start_step).
        self.lora_active = True
        #: True: training's last LM layer runs only at answer positions where ``last_layer.supported``
        #: (exact; ~15% of that layer's arithmetic on easy-VQA's packed rows); False: every position.
        self.answer_only_last_layer = True
        self.objectives = Objectives()
        #: the frozen text encoder of the image-text objectives (``adaptkit.backbones.text``), or None.
        self.text_encoder: nn.Module | None = None

    @property
    def base_lm(self) -> nn.Module:
        """The transformers causal LM (inside peft's wrapper when LoRA is on)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    @property
    def loss_parts(self) -> dict[str, torch.Tensor]:
        """Each objective's value (detached) in the last training forward pass."""
        return self.objectives.parts

    # ---- the LM's input ----------------------------------------------------------------------------

    def text_and_soft(self, features, input_ids, read):
        """The LM's input embedding module, the text's embeddings and the adapter's soft tokens (the
        adapter reads the prompt tokens ``read`` marks). A cross-attention adapter's output goes to its
        blocks instead (``(B, 0, D)`` soft tokens)."""
        embedding = self.base_lm.get_input_embeddings()
        text = embedding(input_ids)
        out = self.adapter(features.to(text.device), text, read)
        if self.cross_attention is not None:
            self.cross_attention.set(out)
            return embedding, text, text.new_zeros(text.shape[0], 0, text.shape[-1])
        return embedding, text, out.to(text.dtype)

    def embed(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM's input, ``(embeds, mask)``: soft tokens (or, when injecting, the lead that layer k's
        hook fills with them) in front of the text embeddings.

        ``prompt_mask`` marks the tokens a text-conditioned adapter may read (never the answer);
        it defaults to ``attention_mask`` (generation, where the input is all prompt).
        """
        embeds, mask, _ = self._embed(features, input_ids, attention_mask, prompt_mask)
        return embeds, mask

    def _embed(self, features, input_ids, attention_mask, prompt_mask=None):
        read = attention_mask if prompt_mask is None else prompt_mask
        embedding, text, soft = self.text_and_soft(features, input_ids, read)
        lead = soft
        if self.injection is not None:
            lead = self.injection.lead(embedding, text.shape[0], soft.shape[1], text.device)
            self.injection.pending = soft
        ones = torch.ones(lead.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        return torch.cat([lead, text], dim=1), torch.cat([ones, attention_mask], dim=1), soft

    def use_lower_state_cache(self, max_mb: float) -> LowerStateCache:
        """From now on, training and scoring compute the layers below ``inject_layer`` once per distinct
        text (``LowerStateCache``) and run only the layers from ``inject_layer`` on each step; generation
        keeps its own cache (``prompt_cache``). Needs ``inject_layer`` > 0."""
        if self.injection is None:
            raise ValueError("the lower-state cache needs adapter.inject_layer > 0")
        embedding = self.base_lm.get_input_embeddings()
        decoder = self.base_lm.get_decoder()
        self.lower_states = self.injection.lower_state_cache(
            decoder, embedding, self.adapter.num_tokens, max_mb
        )
        return self.lower_states

    # ---- training and scoring -----------------------------------------------------------------------

    def answer_logits(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits at answer positions only, a mask of where those positions are in ``labels``, and the
        adapter's soft tokens. ``segment_ids`` and ``positions`` describe a packed batch
        (``collate_packed``: several questions about one image per row)."""
        prompt_mask = attention_mask * (labels == IGNORE)
        if self.lower_states is not None:
            embedding, text, soft = self.text_and_soft(features, input_ids, prompt_mask)
            embeds, mask = states_at_layer(
                self.lower_states, embedding, text, soft, input_ids, attention_mask, segment_ids
            )
        else:
            embeds, mask, soft = self._embed(features, input_ids, attention_mask, prompt_mask)
        n_soft = embeds.shape[1] - input_ids.shape[1]
        if segment_ids is None:
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        else:
            mask, position_ids = packed_attention(segment_ids, positions, n_soft, embeds.dtype)
        selected = labels != IGNORE
        # hidden[:, t] predicts token t+1; text token j sits at position n_soft + j. Without a lead
        # (cross-attention from layer 0) nothing predicts text token 0, which is always prompt.
        rows, cols = selected.nonzero(as_tuple=True)
        cols = cols + n_soft - 1 if n_soft else (cols - 1).clamp(min=0)
        skip_lora = not self.lora_active and hasattr(self.lm, "disable_adapter")
        with self.lm.disable_adapter() if skip_lora else contextlib.nullcontext():
            out = self._decode_at(embeds, mask, position_ids, rows, cols)
        return self.base_lm.get_output_embeddings()(out), selected, soft

    def _decode_at(self, embeds, mask, position_ids, rows, cols) -> torch.Tensor:
        """The decoder's final states at positions ``(rows, cols)`` (``(N, D)``), from layer
        ``inject_layer`` on when the lower states are looked up; the last layer at those positions alone
        where ``last_layer.supported`` (``answer_only_last_layer``)."""
        decoder = self.base_lm.get_decoder()
        start = self.inject_layer if self.lower_states is not None else 0
        last = decoder.layers[-1]
        exact = self.answer_only_last_layer and last_layer.supported(self.base_lm.config, last)
        stop = len(decoder.layers) - 1 if exact else None
        kwargs = dict(attention_mask=mask, position_ids=position_ids, use_cache=False)
        with decoder_slice(decoder, start, stop, final_norm=not exact):
            hidden = decoder(inputs_embeds=embeds, **kwargs).last_hidden_state
        if not exact:
            return hidden[rows, cols]
        allowed = last_layer.key_mask(mask, rows, cols)
        rotary = decoder.rotary_emb(hidden, position_ids=position_ids)
        return decoder.norm(last_layer.last_layer_at(last, hidden, rows, cols, allowed, rotary))

    def forward(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        answer_class: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        text_states: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The training loss of a batch: the recipe's weighted objectives (``self.objectives``) on what
        they need: the logits at answer tokens (computed only where they are needed, and only when the
        batch has ``labels``) and the adapter's image tokens.

        ``answer_class``: the samples' classes for ``objectives.classify``; ``segment_ids`` /
        ``positions``: a packed batch (``collate_packed``); ``text_states`` / ``text_mask`` / ``groups``:
        the frozen text encoder's states of each sample's text and what it describes, for the image-text
        objectives (``adaptkit.contrastive``); ``text_ids`` instead of ``text_states``: the texts' tokens,
        encoded here by a text encoder whose LoRA trains. Without ``labels`` the LM does not run at all.
        """
        if text_ids is not None:
            text_states = self.text_encoder.encode(text_ids, text_mask)
        outputs = {
            "answer_class": answer_class,
            "text_states": text_states,
            "text_mask": text_mask,
            "groups": groups,
        }
        if labels is None:
            outputs["soft"] = self.image_tokens(features)
            return self.objectives(outputs)
        logits, selected, soft = self.answer_logits(
            features, input_ids, attention_mask, labels, segment_ids, positions
        )
        if self.cross_attention is not None:  # what the adapter made of the image: the blocks' tokens
            soft = self.cross_attention.media
        outputs.update(logits=logits, targets=labels[selected], soft=soft)
        return self.objectives(outputs)

    def image_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """What the adapter makes of images with no text to read: ``(B, tokens, D_lm)`` (the soft tokens,
        or a cross-attention adapter's image tokens); the image side of the image-text objectives."""
        device = self.base_lm.get_input_embeddings().weight.device
        return self.adapter(features.to(device))

    @torch.no_grad()
    def sequence_logprobs(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Per-row sum of the answer tokens' log-probabilities (right-padded rows, as for training)."""
        logits, selected, _ = self.answer_logits(features, input_ids, attention_mask, labels)
        token_logp = logits.float().log_softmax(-1).gather(-1, labels[selected].unsqueeze(-1)).squeeze(-1)
        rows = selected.nonzero()[:, 0]
        return torch.zeros(labels.shape[0], device=token_logp.device).index_add_(0, rows, token_logp)

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
        return generation.decode(self, tokens, chosen)

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

    # ---- trainable state ----------------------------------------------------------------------------

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def saved_heads(self) -> dict[str, torch.Tensor]:
        """The state of the objectives' heads that inference uses (``SAVED_HEADS``: the image-text
        embedding and matching heads; VQA's answer head only trains the adapter and is not kept)."""
        return {
            f"{name}.{key}": value.detach().cpu().contiguous()
            for name, head in self.objectives.heads.items()
            if name in SAVED_HEADS
            for key, value in head.state_dict().items()
        }

    def save_trainables(self, directory: str | Path) -> None:
        """Write the adapter and the saved heads (safetensors) and LoRA (peft format) into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.adapter.state_dict().items()}
        save_file(state, str(directory / ADAPTER_FILE))
        heads = self.saved_heads()
        if heads:
            save_file(heads, str(directory / HEADS_FILE))
        if hasattr(self.lm, "save_pretrained") and hasattr(self.lm, "peft_config"):
            self.lm.save_pretrained(str(directory / LORA_DIR))
        if self.text_encoder is not None and self.text_encoder.trainable:
            save_file(self.text_encoder.lora_state(), str(directory / TEXT_LORA_FILE))

    def load_adapter(self, directory: str | Path, heads: bool = True) -> None:
        """Load adapter weights (and, with ``heads``, the saved heads) written by :meth:`save_trainables`
        (strict: shapes and keys must match)."""
        from safetensors.torch import load_file

        path = Path(directory) / ADAPTER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; is {directory} a run directory of `adaptkit train`?")
        try:
            self.adapter.load_state_dict(load_file(str(path)), strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path} does not fit this recipe's adapter: {err}") from None
        expected = self.saved_heads()
        if not expected or not heads:
            return
        path = Path(directory) / HEADS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; the recipe's image-text heads were not saved")
        state = load_file(str(path))
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
            raise ValueError(f"{path} does not fit this recipe's heads (keys or shapes differ)")
        for name, head in self.objectives.heads.items():
            if name in SAVED_HEADS:
                prefix = name + "."
                head.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        self.load_text_lora(directory)

    def load_text_lora(self, directory: str | Path) -> bool:
        """Load ``text_lora.safetensors`` into a text encoder whose LoRA trains (False: it has none)."""
        from safetensors.torch import load_file

        if self.text_encoder is None or not self.text_encoder.trainable:
            return False
        path = Path(directory) / TEXT_LORA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; the run's text-encoder LoRA was not saved")
        self.text_encoder.load_lora_state(load_file(str(path)), str(path))
        return True
