"""Greedy decoding for a :class:`~adaptkit.model.multimodal.MultimodalModel`: through transformers'
``generate`` on the whole model, or, with soft tokens at layer k > 0, from cached prompt states.

With ``adapter.inject_layer`` k a prompt's states entering layer k and its keys/values in the layers below
k depend on its text alone, so they are looked up per distinct text (:class:`PromptCache`), the prompt
runs through layers k.. only, and every new token then runs through all layers against those keys.
Same arithmetic as the full pass (tests/test_injection.py); on easy-VQA's test split, whose 9,673
questions share 107 prompts, two thirds of the prompt work disappears.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from adaptkit.model.lower_states import LowerStateCache, cache_kwarg, decoder_slice


class PromptCache:
    """The generation cache of prompts' lower-layer states and keys/values, made on first use and again
    when the LM's device or dtype changes; least recently used entries go beyond ``max_mb`` (0: always
    generate through the whole model)."""

    def __init__(self, max_mb: float = 256.0) -> None:
        self.max_mb = max_mb
        self.cache: LowerStateCache | None = None
        self._on: tuple | None = None  # the LM's (device, dtype) the decision was made for

    def get(self, model) -> LowerStateCache | None:
        """The cache for ``model``'s LM as it is now; None where its cache layers are not plain
        full-attention layers (sliding windows), which then generate through the full forward pass."""
        embedding = model.base_lm.get_input_embeddings()
        where = (embedding.weight.device, embedding.weight.dtype)
        if self._on == where:
            return self.cache
        self.cache = None
        layers = DynamicCache(config=model.base_lm.config).layers
        if all(type(layer) is DynamicLayer for layer in layers):
            self.cache = model.injection.lower_state_cache(
                model.base_lm.get_decoder(), embedding, model.adapter.num_tokens, self.max_mb, keep_kv=True
            )
        self._on = where
        return self.cache


@torch.no_grad()
def greedy(model, features, input_ids, attention_mask, max_new_tokens: int = 5, stop_at_eos: bool = True):
    """Greedy tokens ``(B, T)`` for left-padded prompts and each token's log-probability ``(B, T)``.

    Decoding stops once every row has produced EOS (unless ``stop_at_eos`` is false), so
    ``T <= max_new_tokens``; a row that finished earlier carries the pad token after its EOS (as
    transformers' ``generate`` does).
    """
    use_cache = model.injection is not None and model.prompt_cache.max_mb > 0
    cache = model.prompt_cache.get(model) if use_cache else None
    if cache is not None:
        return greedy_injected(model, cache, features, input_ids, attention_mask, max_new_tokens, stop_at_eos)
    return greedy_full(model, features, input_ids, attention_mask, max_new_tokens, stop_at_eos)


def greedy_full(model, features, input_ids, attention_mask, max_new_tokens: int, stop_at_eos: bool = True):
    """:func:`greedy` through transformers' ``generate`` on the whole model."""
    embeds, mask = model.embed(features, input_ids, attention_mask)
    tokenizer = model.tokenizer
    out = model.lm.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id if stop_at_eos else None,
        output_scores=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[:, -len(out.scores) :]
    logprobs = torch.stack([s.float().log_softmax(-1) for s in out.scores], dim=1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _prompt_from_cache(model, cache: LowerStateCache, features, input_ids, attention_mask):
    """The prompts' hidden states entering layer k (sink, soft tokens, cached text states) and the keys
    and values of the layers below k, ``(k, 2, B, kv_heads, T, head_dim)``, for left-padded prompts."""
    embedding, text, soft = model.text_and_soft(features, input_ids, attention_mask)
    rows, width = input_ids.shape
    lengths = attention_mask.sum(-1).tolist()
    texts = [tuple(ids[width - n :]) for ids, n in zip(input_ids.tolist(), lengths)]  # left-padded
    entries = cache.entries(texts, embedding)
    n_lead = cache.lead.shape[0]
    total = n_lead + width
    hidden = text.new_zeros(rows, total, text.shape[-1])
    hidden[:, 0] = cache.lead[0].to(text.dtype)  # the sink token's state; soft tokens follow
    hidden[:, 1:n_lead] = soft
    lead_kv = cache.lead_kv
    kv = lead_kv.new_zeros(*lead_kv.shape[:2], rows, lead_kv.shape[2], total, lead_kv.shape[-1])
    kv[..., :n_lead, :] = lead_kv[:, :, None]
    for row, (n, (states, text_kv)) in enumerate(zip(lengths, entries)):
        hidden[row, total - n :] = states.to(text.dtype)
        kv[:, :, row, :, total - n :] = text_kv
    mask = torch.cat([attention_mask.new_ones(rows, n_lead), attention_mask], dim=1)
    return hidden, kv, mask


def greedy_injected(
    model, cache: LowerStateCache, features, input_ids, attention_mask, max_new_tokens: int, stop_at_eos: bool
):
    """:func:`greedy` with soft tokens at layer k and the prompts' lower layers from ``cache``."""
    hidden, kv, mask = _prompt_from_cache(model, cache, features, input_ids, attention_mask)
    rows, k = input_ids.shape[0], model.inject_layer
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    past = DynamicCache(config=model.base_lm.config)
    decoder = model.base_lm.get_decoder()
    with decoder_slice(decoder, k, None, final_norm=True):
        last = decoder(
            inputs_embeds=hidden,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **cache_kwarg(decoder, past),
        ).last_hidden_state[:, -1]
    for layer in range(k):
        past.layers[layer].update(kv[layer, 0], kv[layer, 1])
    logits = model.base_lm.get_output_embeddings()(last)
    eos, pad = model.tokenizer.eos_token_id, model.tokenizer.pad_token_id
    done = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    tokens, chosen = [], []
    for step in range(max_new_tokens):
        logp = logits.float().log_softmax(-1)
        token = torch.where(done, torch.full_like(done, pad, dtype=torch.long), logp.argmax(-1))
        tokens.append(token)
        chosen.append(logp.gather(-1, token[:, None])[:, 0])
        if stop_at_eos:
            done |= token == eos
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        out = model.base_lm(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=positions[:, -1:] + step + 1,
            use_cache=True,
            **cache_kwarg(model.base_lm, past),
        )
        logits = out.logits[:, -1]
    return torch.stack(tokens, dim=1), torch.stack(chosen, dim=1)


def decode(model, tokens: torch.Tensor, chosen: torch.Tensor) -> tuple[list[str], list[float]]:
    """Texts of greedy ``tokens`` and each text's probability (its tokens up to and including EOS)."""
    eos = model.tokenizer.eos_token_id
    after_eos = (tokens == eos).long().cumsum(-1) - (tokens == eos).long()
    scores = (chosen * (after_eos == 0)).sum(-1).exp().tolist()
    texts = model.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return [t.strip() for t in texts], scores
