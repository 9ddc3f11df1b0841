"""Loss terms against hand-computed values, and the combination table of the original's losses."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strongreid.config import get_cfg_defaults
from strongreid.errors import ConfigError
from strongreid.losses import (
    LOSSES,
    CenterLoss,
    CrossEntropyLabelSmooth,
    CrossEntropyLoss,
    TripletLoss,
    build_loss,
    euclidean_dist,
)
from strongreid.losses import build as build_module
from strongreid.modeling.outputs import ModelOutput


def _log_softmax(row):
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


def test_registry():
    assert {"cross_entropy", "label_smooth_ce", "triplet", "center"} <= set(LOSSES.names())
    assert LOSSES.get("triplet") is TripletLoss


def test_cross_entropy_exact():
    logits = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
    targets = [2, 0]
    expected = -(_log_softmax(logits[0])[2] + _log_softmax(logits[1])[0]) / 2
    got = CrossEntropyLoss()(torch.tensor(logits), torch.tensor(targets))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_exact():
    # K = 3, eps = 0.1: q = (1 - eps) [k = y] + eps / K.
    logits = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
    targets = [2, 0]
    eps, k = 0.1, 3
    total = 0.0
    for row, y in zip(logits, targets):
        logp = _log_softmax(row)
        q = [eps / k + (1 - eps if j == y else 0.0) for j in range(k)]
        total += -sum(qj * lj for qj, lj in zip(q, logp))
    got = CrossEntropyLabelSmooth(3, 0.1)(torch.tensor(logits), torch.tensor(targets))
    assert got.item() == pytest.approx(total / 2, rel=1e-6)


def test_label_smoothing_zero_eps_is_cross_entropy_and_device_agnostic():
    logits = torch.randn(4, 6)
    targets = torch.tensor([0, 5, 2, 2])
    torch.testing.assert_close(
        CrossEntropyLabelSmooth(6, 0.0)(logits, targets), CrossEntropyLoss()(logits, targets)
    )
    # No .cuda() inside: on the meta device everything stays there.
    out = CrossEntropyLabelSmooth(6, 0.1)(logits.to("meta"), targets.to("meta"))
    assert out.device.type == "meta"
    with pytest.raises(ConfigError, match="LABEL_SMOOTH_EPSILON"):
        CrossEntropyLabelSmooth(6, 1.0)


def test_euclidean_dist_clamp():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    d = euclidean_dist(x, x)
    assert d[0, 1].item() == pytest.approx(5.0)
    assert d[1, 1].item() == pytest.approx(1e-6)  # sqrt(1e-12), the original's clamp


# Points on a line so every distance is a difference: x = 0, 2, 3, 7.
LINE = torch.tensor([[0.0], [2.0], [3.0], [7.0]])


def test_triplet_margin_exact():
    # ids 0,0,1,1: (d_ap, d_an) = (2,3), (2,1), (4,1), (4,5); hinge with 0.3: 0, 1.3, 3.3, 0.
    loss = TripletLoss(0.3)(LINE, torch.tensor([0, 0, 1, 1]))
    assert loss.item() == pytest.approx((1.3 + 3.3) / 4, rel=1e-6)


def test_triplet_soft_margin_exact():
    loss = TripletLoss(None)(LINE, torch.tensor([0, 0, 1, 1]))
    expected = sum(math.log1p(math.exp(a - n)) for a, n in [(2, 3), (2, 1), (4, 1), (4, 5)]) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_triplet_unequal_identity_counts():
    # ids 0,0,0,1 (the original's reshape crashes here). (d_ap, d_an) = (3,7), (2,5), (3,4),
    # (1e-6,4): the anchor alone in its identity has only itself as positive.
    labels = torch.tensor([0, 0, 0, 1])
    loss = TripletLoss(2.0)(LINE, labels)
    assert loss.item() == pytest.approx(1.0 / 4, rel=1e-5)
    soft = TripletLoss(None)(LINE, labels)
    pairs = [(3, 7), (2, 5), (3, 4), (1e-6, 4)]
    expected = sum(math.log1p(math.exp(a - n)) for a, n in pairs) / 4
    assert soft.item() == pytest.approx(expected, rel=1e-5)


def test_triplet_single_identity_is_zero_with_gradient():
    feats = torch.randn(3, 4, requires_grad=True)
    loss = TripletLoss(0.3)(feats, torch.tensor([1, 1, 1]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(feats.grad, torch.zeros(3, 4))


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 3), min_size=2, max_size=10),
    margin=st.one_of(st.none(), st.floats(0.0, 2.0)),
    seed=st.integers(0, 2**16),
)
def test_triplet_matches_per_anchor_loop(labels, margin, seed):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(labels), 3, generator=gen, dtype=torch.float64)
    y = torch.tensor(labels)
    terms = []
    for i in range(len(labels)):
        d = [max(float(((feats[i] - feats[j]) ** 2).sum()), 1e-12) ** 0.5 for j in range(len(labels))]
        pos = [d[j] for j in range(len(labels)) if labels[j] == labels[i]]
        neg = [d[j] for j in range(len(labels)) if labels[j] != labels[i]]
        if not neg:
            continue
        gap = max(pos) - min(neg)
        terms.append(math.log1p(math.exp(gap)) if margin is None else max(0.0, gap + margin))
    expected = sum(terms) / len(terms) if terms else 0.0
    got = TripletLoss(margin)(feats, y).item()
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)  # fp64 stays fp64


def _center_loss(centers):
    loss = CenterLoss(len(centers), len(centers[0]))
    with torch.no_grad():
        loss.centers.copy_(torch.tensor(centers))
    return loss


def test_center_loss_value_and_gradient():
    loss_fn = _center_loss([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    x = torch.tensor([[1.0, 0.0], [1.0, 3.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    loss = loss_fn(x, y)
    # |x0 - c0|^2 = 1, |x1 - c1|^2 = 4; mean 2.5, plus (C - 1) * 1e-12 from the clamp.
    assert loss.item() == pytest.approx(2.5 + 2e-12, rel=1e-7)
    loss.backward()
    # d/dx_i = (2/B)(x_i - c_{y_i}); d/dc_j = -(2/B) sum_{i: y_i = j} (x_i - c_j).
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(
        loss_fn.centers.grad, torch.tensor([[-1.0, 0.0], [0.0, -2.0], [0.0, 0.0]])
    )


def test_center_loss_clamp_gives_no_gradient_at_the_center():
    loss_fn = _center_loss([[1.0, 2.0]])
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    loss = loss_fn(x, torch.tensor([0]))
    assert loss.item() == pytest.approx(1e-12, abs=1e-15)
    loss.backward()
    assert torch.equal(x.grad, torch.zeros(1, 2))


def test_center_loss_device_and_init():
    with torch.device("meta"):
        meta = CenterLoss(4, 8)
    assert meta.centers.device.type == "meta"
    torch.manual_seed(0)
    big = CenterLoss(100, 100)
    assert abs(big.centers.mean().item()) < 0.05 and abs(big.centers.std().item() - 1) < 0.05


# --------------------------------------------------------------------------------------------
# build_loss: the original's loss combinations
# --------------------------------------------------------------------------------------------


def _cfg(sampler, metric, center, smooth):
    cfg = get_cfg_defaults()
    cfg.DATALOADER.SAMPLER = sampler
    cfg.MODEL.METRIC_LOSS_TYPE = metric
    cfg.MODEL.IF_WITH_CENTER = center
    cfg.MODEL.IF_LABELSMOOTH = smooth
    return cfg


@pytest.mark.parametrize(
    "sampler,metric,center,smooth,terms,id_kind",
    [
        ("softmax", "triplet", "no", "off", {"id"}, CrossEntropyLoss),
        ("triplet", "triplet", "no", "on", {"triplet"}, None),
        ("softmax_triplet", "triplet", "no", "on", {"id", "triplet"}, CrossEntropyLabelSmooth),
        ("softmax_triplet", "triplet", "no", "off", {"id", "triplet"}, CrossEntropyLoss),
        ("softmax_triplet", "center", "yes", "on", {"id", "center"}, CrossEntropyLabelSmooth),
        ("softmax_triplet", "center", "yes", "off", {"id", "center"}, CrossEntropyLoss),
        ("softmax_triplet", "triplet_center", "yes", "on", {"id", "triplet", "center"},
         CrossEntropyLabelSmooth),
        ("triplet", "triplet_center", "yes", "off", {"id", "triplet", "center"}, CrossEntropyLoss),
    ],
)
def test_combination_table(sampler, metric, center, smooth, terms, id_kind):
    loss_fn = build_loss(_cfg(sampler, metric, center, smooth), num_classes=3, feat_dim=4)
    out = loss_fn(ModelOutput(torch.randn(4, 3), torch.randn(4, 4)), torch.tensor([0, 0, 1, 2]))
    assert set(out) == terms | {"total"}
    assert type(loss_fn.id_loss) is id_kind if id_kind else loss_fn.id_loss is None
    assert (loss_fn.center is not None) == ("center" in terms)
    assert loss_fn.center_weight == pytest.approx(0.0005)


def test_softmax_path_ignores_label_smoothing_with_a_warning(caplog, monkeypatch):
    monkeypatch.setattr(build_module, "_warned_softmax_ls", False)
    with caplog.at_level(logging.WARNING):
        loss_fn = build_loss(_cfg("softmax", "triplet", "no", "on"), 3, 4)
        build_loss(_cfg("softmax", "triplet", "no", "on"), 3, 4)
    assert type(loss_fn.id_loss) is CrossEntropyLoss
    assert caplog.text.count("IF_LABELSMOOTH 'on' is ignored") == 1


@pytest.mark.parametrize(
    "sampler,metric,center",
    [
        ("softmax_triplet", "center", "no"),
        ("triplet", "triplet_center", "no"),
        ("softmax_triplet", "triplet", "yes"),
        ("random", "triplet", "no"),
    ],
)
def test_invalid_combinations(sampler, metric, center):
    with pytest.raises(ConfigError):
        build_loss(_cfg(sampler, metric, center, "on"), 3, 4)


def test_weights_epsilon_and_margin_from_config():
    cfg = _cfg("softmax_triplet", "triplet_center", "yes", "on")
    cfg.SOLVER.ID_LOSS_WEIGHT = 2.0
    cfg.SOLVER.TRIPLET_LOSS_WEIGHT = 3.0
    cfg.SOLVER.CENTER_LOSS_WEIGHT = 0.5
    cfg.SOLVER.MARGIN = None
    cfg.MODEL.LABEL_SMOOTH_EPSILON = 0.2
    loss_fn = build_loss(cfg, 3, 1)
    assert loss_fn.id_loss.epsilon == 0.2 and loss_fn.triplet.margin is None
    with torch.no_grad():
        loss_fn.center.centers.zero_()
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    out = loss_fn(ModelOutput(logits, LINE), torch.tensor([0, 0, 1, 1]))
    raw_id = CrossEntropyLabelSmooth(3, 0.2)(logits, torch.tensor([0, 0, 1, 1]))
    raw_tri = sum(math.log1p(math.exp(a - n)) for a, n in [(2, 3), (2, 1), (4, 1), (4, 5)]) / 4
    raw_center = (0 + 4 + 9 + 49) / 4  # centers at 0
    assert out["id"].item() == pytest.approx(2.0 * raw_id.item(), rel=1e-6)
    assert out["triplet"].item() == pytest.approx(3.0 * raw_tri, rel=1e-6)
    assert out["center"].item() == pytest.approx(0.5 * raw_center, rel=1e-6)
    total = out["id"] + out["triplet"] + out["center"]
    assert out["total"].item() == pytest.approx(total.item(), rel=1e-6)


def test_center_loss_on_requested_device():
    cfg = _cfg("softmax_triplet", "center", "yes", "on")
    loss_fn = build_loss(cfg, 3, 4, device="meta")
    assert loss_fn.center.centers.device.type == "meta"
