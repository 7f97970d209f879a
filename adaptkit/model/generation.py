"""Greedy decoding for a :class:`~adaptkit.model.multimodal.MultimodalModel`.

One loop for every fusion: the prompt pass fills a KV cache of every decoder layer and gives the first
token's logits, then each new token runs through the LM alone against that cache (with the image for
cross-attention blocks, which every new token reads again). The prompt pass runs through the whole model,
or, with the image entering at layer k > 0 and a prompt store (``Fusion.prompt_store``), looks each
prompt's states entering layer k and its keys/values below k up by text and runs only layers k.. on the
image: same arithmetic (tests/test_injection.py), and on easy-VQA's test split, whose 9,673 questions
share 107 prompts, two thirds of the prompt work disappears.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from adaptkit.model.decoder import IMAGE_KWARG, LMInput, cache_kwarg
from adaptkit.model.lower_states import LowerStateCache


def _stored_prompts(model, store: LowerStateCache, text, out, input_ids, attention_mask):
    """The prompts' states entering layer k (sink, soft tokens, stored text states) as an :class:`LMInput`
    and the keys and values of the layers below k, ``(k, 2, B, kv_heads, T, head_dim)``, for left-padded
    prompts."""
    fusion = model.fusion
    soft = fusion.in_sequence(out).to(text.dtype)
    rows, width = input_ids.shape
    lengths = attention_mask.sum(-1).tolist()
    texts = [tuple(ids[width - n :]) for ids, n in zip(input_ids.tolist(), lengths)]  # left-padded
    entries = store.entries(texts, model.base_lm.get_input_embeddings())
    n_lead = store.lead.shape[0]
    total = n_lead + width
    hidden = text.new_zeros(rows, total, text.shape[-1])
    hidden[:, 0] = store.lead[0].to(text.dtype)  # the sink token's state; soft tokens follow
    hidden[:, 1:n_lead] = soft
    lead_kv = store.lead_kv
    kv = lead_kv.new_zeros(*lead_kv.shape[:2], rows, lead_kv.shape[2], total, lead_kv.shape[-1])
    kv[..., :n_lead, :] = lead_kv[:, :, None]
    for row, (n, (states, text_kv)) in enumerate(zip(lengths, entries)):
        hidden[row, total - n :] = states.to(text.dtype)
        kv[:, :, row, :, total - n :] = text_kv
    mask = torch.cat([attention_mask.new_ones(rows, n_lead), attention_mask], dim=1)
    return LMInput(hidden, mask, n_lead, fusion.entry, fusion.carried(out, in_states=True)), kv


def prompt_pass(model, features, input_ids, attention_mask, past: DynamicCache):
    """Run left-padded prompts through the model into ``past``; returns the last position's logits, the
    full keep-mask, the position ids and the adapter's output."""
    fusion = model.fusion
    embedding, text, out = model.read_image(features, input_ids, attention_mask)
    store = fusion.prompt_store()
    if store is None:
        inp, kv = fusion.lm_input(embedding, text, out, attention_mask, input_ids, lookup=False), None
    else:
        inp, kv = _stored_prompts(model, store, text, out, input_ids, attention_mask)
    positions = (inp.mask.cumsum(-1) - 1).clamp(min=0)
    decoder = model.base_lm.get_decoder()
    hidden = fusion.run.layers(inp, inp.mask, positions, use_cache=True, **cache_kwarg(decoder, past))
    for layer in range(inp.start):  # the layers below the entry layer: the stored prompts' keys/values
        past.layers[layer].update(kv[layer, 0], kv[layer, 1])
    return model.base_lm.get_output_embeddings()(hidden[:, -1]), inp.mask, positions, out


@torch.no_grad()
def greedy(model, features, input_ids, attention_mask, max_new_tokens: int = 5, stop_at_eos: bool = True):
    """Greedy tokens ``(B, T)`` for left-padded prompts and each token's log-probability ``(B, T)``.

    Decoding stops once every row has produced EOS (unless ``stop_at_eos`` is false), so
    ``T <= max_new_tokens``; a row that finished earlier carries the pad token after its EOS (as
    transformers' ``generate`` does).
    """
    past = DynamicCache(config=model.base_lm.config)
    logits, mask, positions, out = prompt_pass(model, features, input_ids, attention_mask, past)
    image = model.fusion.step_image(out)
    step_kwargs = {} if image is None else {IMAGE_KWARG: image}
    rows = input_ids.shape[0]
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
        logits = model.base_lm(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=positions[:, -1:] + step + 1,
            use_cache=True,
            **cache_kwarg(model.base_lm, past),
            **step_kwargs,
        ).logits[:, -1]
    return torch.stack(tokens, dim=1), torch.stack(chosen, dim=1)


def decode(tokenizer, tokens: torch.Tensor, chosen: torch.Tensor) -> tuple[list[str], list[float]]:
    """Texts of greedy ``tokens`` and each text's probability (its tokens up to and including EOS)."""
    eos = tokenizer.eos_token_id
    after_eos = (tokens == eos).long().cumsum(-1) - (tokens == eos).long()
    scores = (chosen * (after_eos == 0)).sum(-1).exp().tolist()
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return [t.strip() for t in texts], scores
