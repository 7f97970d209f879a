"""Image-text objectives and their heads: ITC, ITM and triplet (BLIP / BLIP-2 stage 1, VSE++).

The image side is what the fusion adapter made of the image (``outputs["soft"]``: ``(B, Q, D_lm)``
tokens, e.g. the Q-Former's queries); the text side is the frozen text encoder's token states
(``outputs["text_states"]``, ``outputs["text_mask"]``). ``outputs["groups"]`` gives every sample an id
of what its caption describes: two samples of one group are positives of each other (an image and any
caption of the same image, or of the same class), so duplicates in a batch are never pushed apart.

- :class:`EmbeddingHead` (``heads["embed"]``): projections of both sides into a shared space and a
  learnable temperature. An image is ``Q`` normalized query embeddings, a text one (mean-pooled states);
  their similarity is the best query's (BLIP-2).
- ``itc``: InfoNCE in both directions over the batch, negatives gathered from every process (with
  gradient), targets spread evenly over a row's positives.
- ``itm``: :class:`MatchingHead` (``heads["itm"]``) classifies (image, text) pairs as matched or not; each
  image gets a hard negative text and each text a hard negative image, sampled in proportion to their
  ITC similarity among the batch's non-positives (BLIP).
- ``triplet``: the hinge ``max(0, margin - s(i, t+) + s(i, t-))`` with the hardest in-batch negative, both
  directions (VSE++), on the cosine similarity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp: the temperature never falls below 0.01


class EmbeddingHead(nn.Module):
    """Image tokens and text states into one normalized embedding space, with a learnable temperature.

    Args:
        image_dim: width of the adapter's tokens (D_lm).
        text_dim: width of the text encoder's states.
        embed_dim: the shared space's width.
        temperature: the initial softmax temperature of ITC (BLIP-2: 0.07).
    """

    def __init__(
        self, image_dim: int, text_dim: int, embed_dim: int = 256, temperature: float = 0.07
    ) -> None:
        super().__init__()
        self.image_norm = nn.LayerNorm(image_dim)
        self.image_proj = nn.Linear(image_dim, embed_dim)
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def image_embeds(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, Q, E)`` normalized embeddings of each image token."""
        return F.normalize(self.image_proj(self.image_norm(tokens.float())), dim=-1)

    def text_embeds(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, E)`` normalized embedding of each text: its states mean-pooled over ``mask``."""
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return F.normalize(self.text_proj(pooled.float()), dim=-1)

    def scale(self) -> torch.Tensor:
        """The logit scale (1 / temperature), clamped to at most 100."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()


def similarity(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """``(N_img, N_txt)`` cosine similarity of each image (its best query, ``(N_img, Q, E)``) and text."""
    return torch.einsum("iqe,te->iqt", images, texts).max(dim=1).values


class MatchingHead(nn.Module):
    """Is this text about this image? Text states attend to the image tokens (one pre-norm block), are
    mean-pooled over the text, and a linear layer gives two logits (no match, match).

    Args:
        image_dim: width of the adapter's tokens.
        text_dim: width of the text encoder's states.
        hidden: the block's width.
        heads: attention heads.
    """

    def __init__(self, image_dim: int, text_dim: int, hidden: int = 256, heads: int = 4) -> None:
        super().__init__()
        self.text_in = nn.Linear(text_dim, hidden)
        self.image_in = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, hidden))
        self.norm_attn = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.classifier = nn.Linear(hidden, 2)

    def forward(self, image_tokens: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor):
        """``(B, 2)`` logits for the pairs ``(image_tokens[b], text[b])``."""
        memory = self.image_in(image_tokens.float())
        x = self.text_in(text_states.float())
        q = self.norm_attn(x)
        x = x + self.attn(q, memory, memory, need_weights=False)[0]
        x = x + self.ffn(self.norm_ffn(x))
        weights = text_mask.unsqueeze(-1).to(x.dtype)
        return self.classifier((x * weights).sum(1) / weights.sum(1).clamp_min(1.0))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` of every process concatenated in rank order, gradients flowing back to each process's own
    rows (summed over the processes' losses), and the offset of this process's rows. One process:
    ``(x, 0)``.

    The gathered parts' gradients are made contiguous before ``all_gather``'s backward exchanges them:
    gloo's all-to-all reads a strided gradient (an einsum's, sliced by ``cat``'s backward) as if it were
    dense, and the text side's gradients came out wrong (tests/test_retrieval.py caught it).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = [_ContiguousGrad.apply(part) for part in all_gather(x.contiguous())]
    return torch.cat(parts), dist.get_rank() * x.shape[0]


def gather_labels(x: torch.Tensor) -> torch.Tensor:
    """``x`` (labels, no gradient) of every process concatenated in rank order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _embeddings(outputs: dict, heads: nn.ModuleDict) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's image and text embeddings (computed once per forward pass, shared by the objectives)."""
    if "image_embeds" not in outputs:
        head = heads["embed"]
        outputs["image_embeds"] = head.image_embeds(outputs["soft"])
        outputs["text_embeds"] = head.text_embeds(outputs["text_states"], outputs["text_mask"])
    return outputs["image_embeds"], outputs["text_embeds"]


def _soft_targets(positive: torch.Tensor) -> torch.Tensor:
    positive = positive.float()
    return positive / positive.sum(1, keepdim=True)


def itc_loss(outputs: dict, heads: nn.ModuleDict) -> torch.Tensor | None:
    """Image-text contrastive loss (InfoNCE, both directions averaged), negatives from all processes."""
    if outputs.get("text_states") is None:
        return None
    images, texts = _embeddings(outputs, heads)
    groups = outputs["groups"]
    all_images, _ = gather_with_grad(images)
    all_texts, _ = gather_with_grad(texts)
    all_groups = gather_labels(groups)
    scale = heads["embed"].scale()
    i2t = similarity(images, all_texts) * scale  # (B, N): local images against every text
    t2i = similarity(all_images, texts).t() * scale  # (B, N): local texts against every image
    targets = _soft_targets(groups[:, None] == all_groups[None, :])
    loss_i2t = -(F.log_softmax(i2t, dim=1) * targets).sum(1).mean()
    loss_t2i = -(F.log_softmax(t2i, dim=1) * targets).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def _hard_negatives(sim: torch.Tensor, negative: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row with a negative, one column drawn with probability ``softmax(sim)`` over its negatives
    (``torch.multinomial``: the global RNG, saved in checkpoints). Returns ``(rows, columns)``."""
    rows = negative.any(1).nonzero().squeeze(1)
    weights = sim[rows].detach().float().softmax(1) * negative[rows]
    weights = weights + negative[rows] * 1e-12  # underflow must not zero a row of negatives
    return rows, torch.multinomial(weights, 1).squeeze(1)


def itm_loss(outputs: dict, heads: nn.ModuleDict) -> torch.Tensor | None:
    """Image-text matching: cross-entropy over the batch's pairs (label 1) and, for every image and
    every text, one hard negative (label 0); None when the batch has no negatives at all."""
    if outputs.get("text_states") is None:
        return None
    images, texts = _embeddings(outputs, heads)
    groups = outputs["groups"]
    negative = groups[:, None] != groups[None, :]
    if not negative.any():
        return None
    soft, states, mask = outputs["soft"], outputs["text_states"], outputs["text_mask"]
    sim = similarity(images, texts)
    img_rows, neg_text = _hard_negatives(sim, negative)  # each image, a text it does not match
    txt_rows, neg_image = _hard_negatives(sim.t(), negative.t())  # each text, an image it does not match
    image_side = torch.cat([soft, soft[img_rows], soft[neg_image]])
    text_states = torch.cat([states, states[neg_text], states[txt_rows]])
    text_mask = torch.cat([mask, mask[neg_text], mask[txt_rows]])
    labels = torch.cat(
        [
            torch.ones(len(soft), dtype=torch.long),
            torch.zeros(len(img_rows) + len(txt_rows), dtype=torch.long),
        ]
    ).to(soft.device)
    return F.cross_entropy(heads["itm"](image_side, text_states, text_mask), labels)


def triplet_loss(outputs: dict, heads: nn.ModuleDict, margin: float | None = None) -> torch.Tensor | None:
    """Max-violation triplet loss on cosine similarity, both directions, over rows with a negative.

    The positive of row ``b`` is its own pair; the negative the most similar non-positive of the batch.
    ``margin`` defaults to ``outputs["triplet_margin"]`` (the recipe's ``objectives.triplet_margin``).
    """
    if outputs.get("text_states") is None:
        return None
    images, texts = _embeddings(outputs, heads)
    groups = outputs["groups"]
    margin = outputs.get("triplet_margin", 0.2) if margin is None else margin
    sim = similarity(images, texts)
    negative = groups[:, None] != groups[None, :]
    has = negative.any(1)
    if not has.any():
        return None
    positive = sim.diagonal()
    hardest_text = sim.masked_fill(~negative, float("-inf")).max(1).values
    hardest_image = sim.t().masked_fill(~negative.t(), float("-inf")).max(1).values
    loss = F.relu(margin - positive + hardest_text) + F.relu(margin - positive + hardest_image)
    return loss[has].mean()
