"""The image-text objectives (ITC, ITM, triplet) against values computed by hand on tiny tensors, and the
retrieval metrics against known values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adaptkit.contrastive import EmbeddingHead, MatchingHead, itc_loss, itm_loss, similarity, triplet_loss
from adaptkit.objectives import Objectives
from adaptkit.tasks.retrieval import first_correct_ranks


def _heads(itm: bool = False) -> nn.ModuleDict:
    torch.manual_seed(0)
    heads = nn.ModuleDict({"embed": EmbeddingHead(6, 5, embed_dim=4, temperature=0.5)})
    if itm:
        heads["itm"] = MatchingHead(6, 5, hidden=8, heads=2)
    return heads


def _outputs(groups: list[int]) -> dict:
    torch.manual_seed(1)
    b = len(groups)
    return {
        "soft": torch.randn(b, 3, 6, requires_grad=True),
        "text_states": torch.randn(b, 4, 5),
        "text_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]][:b]),
        "groups": torch.tensor(groups),
    }


@torch.no_grad()
def _by_hand_embeddings(heads, out):
    """Image query embeddings and text embeddings computed element by element from the heads' weights."""
    head = heads["embed"]
    images, texts = [], []
    for b in range(len(out["groups"])):
        queries = []
        for q in range(out["soft"].shape[1]):
            x = head.image_proj(head.image_norm(out["soft"][b, q]))
            queries.append(x / x.norm())
        images.append(queries)
        n = int(out["text_mask"][b].sum())
        pooled = sum(out["text_states"][b, k] for k in range(n)) / n
        t = head.text_proj(pooled)
        texts.append(t / t.norm())
    return images, texts


def _by_hand_sim(images, texts) -> list[list[float]]:
    return [[max(float(q @ t) for q in img) for t in texts] for img in images]


def test_itc_equals_a_hand_computed_infonce():
    heads, out = _heads(), _outputs([0, 1, 2])
    sim = _by_hand_sim(*_by_hand_embeddings(heads, out))
    scale = 1 / 0.5
    n = len(sim)

    def nll(row: list[float], target: int) -> float:
        logits = [scale * v for v in row]
        return -(logits[target] - math.log(sum(math.exp(v) for v in logits)))

    i2t = sum(nll(sim[i], i) for i in range(n)) / n
    t2i = sum(nll([sim[j][i] for j in range(n)], i) for i in range(n)) / n
    got = itc_loss(dict(out), heads)
    assert abs(float(got.detach()) - (i2t + t2i) / 2) < 1e-6


def test_itc_treats_captions_of_one_group_as_positives():
    """Rows 0 and 1 share a group: each row's target is spread over both."""
    heads, out = _heads(), _outputs([7, 7, 3])
    sim = _by_hand_sim(*_by_hand_embeddings(heads, out))
    scale, groups = 2.0, [7, 7, 3]

    def soft_nll(row: list[float], group: int) -> float:
        logits = [scale * v for v in row]
        lse = math.log(sum(math.exp(v) for v in logits))
        positives = [k for k, g in enumerate(groups) if g == group]
        return -sum((logits[k] - lse) / len(positives) for k in positives)

    i2t = sum(soft_nll(sim[i], groups[i]) for i in range(3)) / 3
    t2i = sum(soft_nll([sim[j][i] for j in range(3)], groups[i]) for i in range(3)) / 3
    assert abs(float(itc_loss(dict(out), heads).detach()) - (i2t + t2i) / 2) < 1e-6


def test_triplet_equals_the_hand_computed_max_violation_hinge():
    heads, out = _heads(), _outputs([0, 1, 1, 2])
    sim = _by_hand_sim(*_by_hand_embeddings(heads, out))
    groups, margin = [0, 1, 1, 2], 0.3
    total = 0.0
    for i in range(4):
        neg = [k for k in range(4) if groups[k] != groups[i]]
        hard_text = max(sim[i][k] for k in neg)
        hard_image = max(sim[k][i] for k in neg)
        total += max(0.0, margin - sim[i][i] + hard_text) + max(0.0, margin - sim[i][i] + hard_image)
    got = triplet_loss(dict(out), heads, margin=margin)
    assert abs(float(got.detach()) - total / 4) < 1e-6


def test_itm_with_one_possible_negative_equals_hand_computed_cross_entropy():
    """Two pairs of different groups: each image's only negative text is the other one, and each text's
    only negative image the other, so the six pairs and labels are known in advance."""
    heads, out = _heads(itm=True), _outputs([0, 1])
    soft, states, mask = out["soft"], out["text_states"], out["text_mask"]
    pairs = [(0, 0, 1), (1, 1, 1), (0, 1, 0), (1, 0, 0), (1, 0, 0), (0, 1, 0)]  # image, text, label
    total = 0.0
    for i, t, label in pairs:
        logits = heads["itm"](soft[i : i + 1], states[t : t + 1], mask[t : t + 1])[0]
        total += -(float(logits[label]) - math.log(sum(math.exp(float(v)) for v in logits)))
    got = itm_loss(dict(out), heads)
    assert abs(float(got.detach()) - total / len(pairs)) < 1e-6


def test_no_negatives_means_no_itm_or_triplet_term():
    heads, out = _heads(itm=True), _outputs([5, 5])
    assert itm_loss(dict(out), heads) is None and triplet_loss(dict(out), heads) is None
    assert itc_loss(dict(out), heads) is not None  # ITC still has its (soft) targets


def test_gradients_reach_the_image_side_and_the_heads_only():
    heads, out = _heads(itm=True), _outputs([0, 1, 2])
    objectives = Objectives({"itc": 1.0, "itm": 1.0, "triplet": 1.0}, {"triplet_margin": 0.2})
    for name, head in heads.items():
        objectives.add_head(name, head)
    loss = objectives(out)
    loss.backward()
    assert set(objectives.parts) == {"itc", "itm", "triplet"}
    assert out["soft"].grad is not None and out["soft"].grad.abs().sum() > 0
    assert out["text_states"].grad is None  # the text encoder's states are frozen inputs
    for name, param in objectives.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_similarity_takes_the_best_query():
    images = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one image, two queries
    texts = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    torch.testing.assert_close(similarity(images, texts), torch.tensor([[0.8, 1.0]]))


def test_temperature_is_clamped_at_a_hundred():
    head = EmbeddingHead(4, 4, 4, temperature=0.07)
    with torch.no_grad():
        head.logit_scale.fill_(10.0)
    assert abs(float(head.scale()) - 100.0) < 1e-3


def test_first_correct_ranks():
    sim = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.3, 0.8], [0.4, 0.4, 0.1]])
    correct = torch.tensor([[True, False, False], [True, False, False], [False, True, False]])
    assert first_correct_ranks(sim, correct) == [0, 2, 0]  # a tie counts in the correct one's favour


def test_retrieval_metric_known_values():
    from adaptkit.metrics import ClassAccuracy, RetrievalRecall

    got = RetrievalRecall().compute(ranks=[0, 0, 3, 7, 20])
    assert got["r1"] == pytest.approx(0.4) and got["r5"] == pytest.approx(0.6)
    assert got["r10"] == pytest.approx(0.8) and got["n"] == 5
    assert got["mean_rank"] == pytest.approx((1 + 1 + 4 + 8 + 21) / 5) and got["median_rank"] == 4
    assert RetrievalRecall().compute(ranks=[0, 1, 2, 3])["median_rank"] == pytest.approx(2.5)
    acc = ClassAccuracy().compute(predictions=[1, 2, 3, 0], references=[1, 2, 0, 0])
    assert acc == {"accuracy": 0.75, "n": 4}
