"""The loss zoo: exact values on hand-worked cases, agreement with pytorch-metric-learning,
BNNeck + bf16 autocast, the gathered (torchrun) path, config rules, and CLI training."""

from __future__ import annotations

import json
import math
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from _train_utils import tiny_train_opts

from strongreid.cli import main
from strongreid.config import get_cfg_defaults, load_config
from strongreid.errors import ConfigError
from strongreid.losses import (
    ArcFaceLogits,
    CircleLoss,
    CircleSoftmaxLogits,
    ContrastiveLoss,
    CosFaceLogits,
    CrossEntropyLabelSmooth,
    CrossEntropyLoss,
    InstanceLoss,
    LiftedStructureLoss,
    MarginIDLoss,
    MultiSimilarityTripletLoss,
    SphereFaceLogits,
    WeightedRegularizedTriplet,
    build_loss,
)
from strongreid.modeling.cosine import CosineClassifier
from strongreid.modeling.outputs import ModelOutput

# --------------------------------------------------------------------------------------------
# Hand-worked cases
# --------------------------------------------------------------------------------------------
# Four unit vectors, identities [0, 0, 1, 1]. Cosine similarities:
#        0     1     2     3
#   0    1    .6    .8    0
#   1   .6    1     0    .8
#   2   .8    0     1   -.6
#   3    0   .8   -.6    1
# Positive pairs (0,1) s=.6 and (2,3) s=-.6; every anchor has negatives at s=.8 and s=0.
# Normalised distances d = sqrt(2 - 2s).
FEATS = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, -0.6], [0.0, 1.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 0, 1, 1])


def d(s: float) -> float:
    return math.sqrt(2 - 2 * s)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def ce(logits: list[float], target: int) -> float:
    return -logits[target] + lse(*logits)


def test_arcface_exact():
    cos = torch.tensor([[0.5, 0.2], [-0.95, 0.1]], dtype=torch.float64)
    arc = ArcFaceLogits(scale=2.0, margin=0.5)
    out = arc(cos, torch.tensor([0, 0]))
    assert out[0, 0].item() == pytest.approx(2 * math.cos(math.pi / 3 + 0.5), abs=1e-12)
    assert out[0, 1].item() == pytest.approx(0.4, abs=1e-12)
    # theta + m past pi: the CosFace-like fallback cos - m sin(pi - m)
    assert out[1, 0].item() == pytest.approx(2 * (-0.95 - 0.5 * math.sin(math.pi - 0.5)), abs=1e-12)
    loss = MarginIDLoss(arc, CrossEntropyLoss())(cos[:1], torch.tensor([0]))
    assert loss.item() == pytest.approx(ce([2 * math.cos(math.pi / 3 + 0.5), 0.4], 0), abs=1e-12)


def test_margins_have_finite_gradients_at_cos_one():
    for margin in (ArcFaceLogits(), SphereFaceLogits(), CosFaceLogits(), CircleSoftmaxLogits()):
        cos = torch.tensor([[1.0, -1.0]], requires_grad=True)
        MarginIDLoss(margin, CrossEntropyLoss())(cos, torch.tensor([0])).backward()
        assert torch.isfinite(cos.grad).all(), margin


def test_cosface_exact_with_label_smoothing():
    cos = torch.tensor([[0.5, 0.2]], dtype=torch.float64)
    loss = MarginIDLoss(CosFaceLogits(2.0, 0.35), CrossEntropyLabelSmooth(2, 0.1))(cos, torch.tensor([0]))
    logits = [2 * 0.15, 0.4]
    # q = (1 - eps + eps/K, eps/K) = (0.95, 0.05)
    log_p = [x - lse(*logits) for x in logits]
    assert loss.item() == pytest.approx(-(0.95 * log_p[0] + 0.05 * log_p[1]), abs=1e-12)


def test_sphereface_exact():
    cos = torch.tensor([[0.5, 0.2], [0.9, 0.2]], dtype=torch.float64)
    out = SphereFaceLogits(scale=2.0, margin=4)(cos, torch.tensor([0, 0]))
    # theta = pi/3: k = floor(4/3) = 1, psi = -cos(4 pi/3) - 2 = -1.5
    assert out[0, 0].item() == pytest.approx(-3.0, abs=1e-9)
    # theta = acos(.9) < pi/4: k = 0, psi = cos(4 theta)
    assert out[1, 0].item() == pytest.approx(2 * math.cos(4 * math.acos(0.9)), abs=1e-9)
    assert out[0, 1].item() == pytest.approx(0.4, abs=1e-12)


def test_circle_softmax_exact():
    cos = torch.tensor([[0.8, 0.1]], dtype=torch.float64)
    out = CircleSoftmaxLogits(scale=2.0, margin=0.25)(cos, torch.tensor([0]))
    # a_p = 1.25 - .8 = .45, s_p = .45 (.8 - .75); a_n = .1 + .25 = .35, s_n = .35 (.1 - .25)
    assert out[0].tolist() == pytest.approx([2 * 0.45 * 0.05, 2 * 0.35 * -0.15], abs=1e-12)


def _circle_terms(g: float) -> tuple[float, float, list[float]]:
    # logit_p = -g a_p (s_p - .75), a_p = 1.25 - s_p; logit_n = g a_n (s_n - .25), a_n = s_n + .25
    lp_06 = -g * 0.65 * (0.6 - 0.75)
    lp_m06 = -g * 1.85 * (-0.6 - 0.75)
    ln = [g * 1.05 * (0.8 - 0.25), g * 0.25 * (0.0 - 0.25)]
    return lp_06, lp_m06, ln


def test_pairwise_circle_exact_both_reductions():
    g = 2.0
    lp_06, lp_m06, ln = _circle_terms(g)
    anchor = (softplus(lp_06 + lse(*ln)) + softplus(lp_m06 + lse(*ln))) / 2
    assert CircleLoss(0.25, g, "anchor")(FEATS, LABELS).item() == pytest.approx(anchor, abs=1e-12)
    # layumi: upper-triangle pairs pooled; negatives (0,2) .8, (0,3) 0, (1,2) 0, (1,3) .8; / B
    batch = softplus(lse(lp_06, lp_m06) + lse(ln[0], ln[1], ln[1], ln[0])) / 4
    assert CircleLoss(0.25, g, "batch")(FEATS, LABELS).item() == pytest.approx(batch, abs=1e-12)


def test_contrastive_exact():
    # positives: d(.6) twice, d(-.6) twice; negatives below the margin 1: the four d(.8)
    expected = (d(0.6) + d(-0.6)) / 2 + (1 - d(0.8))
    assert ContrastiveLoss(0.0, 1.0)(FEATS, LABELS).item() == pytest.approx(expected, abs=1e-12)


def test_lifted_exact():
    neg = lse(1 - d(0.8), 1 - d(0.0))
    expected = (max(0.0, d(0.6) + neg) + max(0.0, d(-0.6) + neg)) / 2
    assert LiftedStructureLoss(0.0, 1.0)(FEATS, LABELS).item() == pytest.approx(expected, abs=1e-12)


def test_multi_similarity_triplet_exact():
    # Anchor 0: positive .6 kept (.5 < max neg .8); negatives kept where s + .1 > .6: only .8.
    # Anchor 2: positive -.6; both negatives kept (s + .1 > -.6). Anchors 1, 3 mirror 0, 2.
    t = [d(0.6) - d(0.8) + 0.3, d(-0.6) - d(0.8) + 0.3, d(-0.6) - d(0.0) + 0.3]
    expected = (2 * t[0] + 2 * t[1] + 2 * t[2]) / 6
    assert MultiSimilarityTripletLoss(0.3, 0.1)(FEATS, LABELS).item() == pytest.approx(expected, abs=1e-12)
    # eps .7 also keeps anchor 0's negative at s = 0 (0 + .7 > .6): its triplet
    # d(.6) - d(0) + .3 < 0 adds nothing to the mean of the non-zero ones ...
    assert MultiSimilarityTripletLoss(0.3, 0.7)(FEATS, LABELS).item() == pytest.approx(expected, abs=1e-12)
    # ... but the soft margin averages every mined triplet: 6 with eps .1, 8 with eps .7.
    diffs = [x - 0.3 for x in t]
    extra = d(0.6) - d(0.0)
    soft = sum(2 * softplus(x) for x in diffs) / 6
    soft_wide = (sum(2 * softplus(x) for x in diffs) + 2 * softplus(extra)) / 8
    assert MultiSimilarityTripletLoss(None, 0.1)(FEATS, LABELS).item() == pytest.approx(soft, abs=1e-12)
    assert MultiSimilarityTripletLoss(None, 0.7)(FEATS, LABELS).item() == pytest.approx(soft_wide, abs=1e-12)


def test_instance_exact_both_targets():
    sims = [[1, 0.6, 0.8, 0], [0.6, 1, 0, 0.8], [0.8, 0, 1, -0.6], [0, 0.8, -0.6, 1]]
    g = 2.0
    rows = [[g * s for s in r] for r in sims]
    image = sum(ce(r, i) for i, r in enumerate(rows)) / 4
    assert InstanceLoss(g, "image")(FEATS, LABELS).item() == pytest.approx(image, abs=1e-12)
    # layumi's target: rank of the identity among the batch's identities -> [0, 0, 1, 1]
    layumi = sum(ce(r, t) for r, t in zip(rows, [0, 0, 1, 1])) / 4
    assert InstanceLoss(g, "layumi")(FEATS, LABELS).item() == pytest.approx(layumi, abs=1e-12)


def test_weighted_regularized_triplet_exact():
    eps = 1e-6  # the clamped distance of an image to itself

    def term(dp: float, dns: list[float]) -> float:
        wp = [math.exp(eps), math.exp(dp)]
        far = (wp[0] * eps + wp[1] * dp) / sum(wp)
        wn = [math.exp(-x) for x in dns]
        close = sum(w * x for w, x in zip(wn, dns)) / sum(wn)
        return softplus(far - close)

    expected = (term(d(0.6), [d(0.8), d(0.0)]) + term(d(-0.6), [d(0.8), d(0.0)])) / 2
    assert WeightedRegularizedTriplet()(FEATS, LABELS).item() == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("loss", [CircleLoss(), CircleLoss(reduction="batch"), MultiSimilarityTripletLoss(),
                                  WeightedRegularizedTriplet(), ContrastiveLoss(), LiftedStructureLoss()])
def test_one_identity_batch_keeps_a_finite_graph(loss):
    """Circle and the triplets need a negative (0, still in the graph); contrastive and lifted
    still pull the positives together (their positive part alone)."""
    x = torch.randn(4, 8, requires_grad=True)
    out = loss(x, torch.zeros(4, dtype=torch.long))
    out.backward()
    assert torch.isfinite(x.grad).all()
    if isinstance(loss, (ContrastiveLoss, LiftedStructureLoss)):
        assert out.item() > 0
    else:
        assert out.item() == 0.0


def test_parameters_out_of_range_name_their_key():
    for make, key in ((lambda: ArcFaceLogits(margin=2.0), "ARCFACE_MARGIN"),
                      (lambda: SphereFaceLogits(margin=2.5), "SPHEREFACE_MARGIN"),
                      (lambda: CosFaceLogits(scale=0), "COSFACE_SCALE"),
                      (lambda: CircleLoss(gamma=0), "CIRCLE_GAMMA"),
                      (lambda: ContrastiveLoss(0.5, 0.2), "CONTRASTIVE"),
                      (lambda: InstanceLoss(target="x"), "INSTANCE_TARGET")):
        with pytest.raises(ConfigError, match=key):
            make()


# --------------------------------------------------------------------------------------------
# pytorch-metric-learning: the same formulas, random inputs, values and gradients
# --------------------------------------------------------------------------------------------


def _batch(seed: int, ids: int = 4, k: int = 4, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ids * k, dim, generator=g, dtype=torch.float64)
    return x, torch.arange(ids).repeat_interleave(k)


def _same(ours, theirs, x):
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    va, vb = ours(a), theirs(b)
    va.backward()
    vb.backward()
    assert va.item() == pytest.approx(vb.item(), rel=1e-6, abs=1e-9)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_losses_match_pytorch_metric_learning(seed):
    pml = pytest.importorskip("pytorch_metric_learning", reason="pytorch-metric-learning (dev extra)")
    from pytorch_metric_learning import losses, miners

    x, y = _batch(seed)
    _same(lambda f: CircleLoss(0.25, 32.0)(f, y), lambda f: losses.CircleLoss(m=0.25, gamma=32)(f, y), x)
    _same(lambda f: ContrastiveLoss(0.0, 1.0)(f, y),
          lambda f: losses.ContrastiveLoss(pos_margin=0, neg_margin=1)(f, y), x)
    _same(lambda f: LiftedStructureLoss(0.0, 1.0)(f, y),
          lambda f: losses.GeneralizedLiftedStructureLoss(neg_margin=1, pos_margin=0)(f, y), x)
    miner, trip = miners.MultiSimilarityMiner(epsilon=0.1), losses.TripletMarginLoss(margin=0.3)
    _same(lambda f: MultiSimilarityTripletLoss(0.3, 0.1)(f, y), lambda f: trip(f, y, miner(f, y)), x)
    inst = losses.InstanceLoss(gamma=32)
    _same(lambda f: InstanceLoss(32.0, "layumi")(f, y), lambda f: inst(f, y), x)
    # without labels every image is its own class: pml's labels = arange(B)
    _same(lambda f: InstanceLoss(32.0, "image")(f, y), lambda f: inst(f, torch.arange(len(y))), x)
    assert pml.__version__


@pytest.mark.parametrize("seed", [0, 1])
def test_margin_classifiers_match_pytorch_metric_learning(seed):
    pytest.importorskip("pytorch_metric_learning", reason="pytorch-metric-learning (dev extra)")
    from pytorch_metric_learning import losses

    x, _ = _batch(seed, dim=8)
    classes = 5
    y = torch.arange(len(x)) % classes
    # Seeded here: the precondition on the angles below holds for these weights, whatever
    # other tests in the same worker drew from the global generator before.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clf = CosineClassifier(8, classes).double()

    def ours(margin):
        return lambda f: MarginIDLoss(margin, CrossEntropyLoss())(clf(f), y)

    def theirs(loss, sphere_scale=None):
        w = clf.weight.detach().t().clone()
        if sphere_scale is None:
            loss.W.data = w.double()
            return lambda f: loss(f, y)
        # pml multiplies by |x| |W|: unit class weights and features of norm s give ours.
        loss.W.data = F.normalize(w, dim=0).double()
        return lambda f: loss(F.normalize(f, dim=1) * sphere_scale, y)

    # ArcFace: pml's margin is in degrees; no angle here passes pi - m, where insightface's
    # fallback (ours) and pml's plain cos(theta + m) differ.
    assert (clf(x) > math.cos(math.pi - math.radians(28.6))).all()
    _same(ours(ArcFaceLogits(64.0, math.radians(28.6))),
          theirs(losses.ArcFaceLoss(classes, 8, margin=28.6, scale=64)), x)
    _same(ours(CosFaceLogits(64.0, 0.35)), theirs(losses.CosFaceLoss(classes, 8, margin=0.35, scale=64)), x)
    _same(ours(SphereFaceLogits(3.0, 4)), theirs(losses.SphereFaceLoss(classes, 8, margin=4, scale=1), 3.0), x)


# --------------------------------------------------------------------------------------------
# Config: keys, combinations, the original meaning
# --------------------------------------------------------------------------------------------


def _zoo_cfg(**over):
    cfg = get_cfg_defaults()
    cfg.DATALOADER.SAMPLER = "softmax_triplet"
    cfg.MODEL.IF_WITH_CENTER = "no"
    for k, v in over.items():
        node = cfg
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return cfg


def test_terms_and_weights_come_from_the_config():
    cfg = _zoo_cfg(**{"MODEL.METRIC_LOSS_TYPE": "circle, triplet,contrastive", "MODEL.ID_LOSS_TYPE": "cosface",
                      "SOLVER.CIRCLE_LOSS_WEIGHT": 0.5, "SOLVER.CONTRASTIVE_LOSS_WEIGHT": 2.0,
                      "SOLVER.TRIPLET_MINER": "multi_similarity", "SOLVER.CIRCLE_GAMMA": 64.0,
                      "MODEL.COSFACE_MARGIN": 0.2})
    loss = build_loss(cfg, 4, 8)
    assert list(loss.metrics) == ["triplet", "circle", "contrastive"]
    assert loss.metric_weights == {"triplet": 1.0, "circle": 0.5, "contrastive": 2.0}
    assert isinstance(loss.triplet, MultiSimilarityTripletLoss)
    assert loss.metrics["circle"].gamma == 64.0
    assert isinstance(loss.id_loss, MarginIDLoss) and loss.id_loss.margin.margin == 0.2
    assert isinstance(loss.id_loss.ce, CrossEntropyLabelSmooth)
    x, y = torch.randn(8, 8), torch.arange(4).repeat_interleave(2)
    cos = torch.rand(8, 4)
    out = loss(ModelOutput(cos, x), y)
    assert set(out) == {"id", "triplet", "circle", "contrastive", "total"}
    assert out["circle"].item() == pytest.approx(0.5 * CircleLoss(0.25, 64.0)(x, y).item(), rel=1e-6)
    assert out["total"].item() == pytest.approx(sum(v.item() for k, v in out.items() if k != "total"), rel=1e-6)


def test_every_term_combines_with_center_loss():
    cfg = _zoo_cfg(**{"MODEL.METRIC_LOSS_TYPE": "wrt,lifted,center", "MODEL.IF_WITH_CENTER": "yes"})
    loss = build_loss(cfg, 4, 8)
    assert list(loss.metrics) == ["wrt", "lifted"] and loss.center is not None and loss.triplet is None


@pytest.mark.parametrize("opts, words", [
    (["MODEL.METRIC_LOSS_TYPE", "cirkle"], ["cirkle", "'circle'"]),
    (["MODEL.METRIC_LOSS_TYPE", "triplet,triplet"], ["twice"]),
    (["MODEL.ID_LOSS_TYPE", "normface"], ["ID_LOSS_TYPE", "'arcface'"]),
    (["MODEL.METRIC_LOSS_TYPE", "circle"], ["softmax_triplet", "circle"]),  # default sampler 'softmax'
    (["DATALOADER.SAMPLER", "triplet", "MODEL.ID_LOSS_TYPE", "arcface"], ["no ID loss"]),
    (["DATALOADER.SAMPLER", "softmax_triplet", "MODEL.METRIC_LOSS_TYPE", "circle,center"], ["IF_WITH_CENTER"]),
    (["SOLVER.TRIPLET_MINER", "hardest"], ["'multi_similarity'"]),
    (["DATALOADER.SAMPLER", "softmax_triplet", "MODEL.METRIC_LOSS_TYPE", "circle",
      "SOLVER.CIRCLE_LOSS_WEIGHT", "-1"], ["CIRCLE_LOSS_WEIGHT"]),
])
def test_unknown_combinations_fail_at_load_with_one_message(opts, words):
    with pytest.raises(ConfigError) as exc:
        load_config(None, opts)
    for w in words:
        assert w in str(exc.value)


def test_yaml_list_of_terms_combines_them(tmp_path):
    path = tmp_path / "zoo.yml"
    path.write_text("MODEL:\n  METRIC_LOSS_TYPE: [triplet, circle]\nDATALOADER:\n  SAMPLER: softmax_triplet\n")
    assert load_config(str(path), []).MODEL.METRIC_LOSS_TYPE == "triplet,circle"


def test_original_configs_keep_their_loss():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    expected = {"softmax.yml": ["id"], "softmax_triplet.yml": ["id", "triplet"],
                "softmax_triplet_with_center.yml": ["id", "triplet", "center"],
                "baseline.yml": ["id", "triplet"]}
    for name, terms in expected.items():
        cfg = load_config(str(configs / name), [])
        assert cfg.MODEL.ID_LOSS_TYPE == "softmax" and cfg.SOLVER.TRIPLET_MINER == "batch_hard"
        loss = build_loss(cfg, 4, 8)
        got = (["id"] if loss.id_loss is not None else []) + list(loss.metrics) + (["center"] if loss.center else [])
        assert got == terms, name
        assert type(loss.id_loss) in (CrossEntropyLoss, CrossEntropyLabelSmooth)


# --------------------------------------------------------------------------------------------
# BNNeck model, bf16 autocast, checkpoints
# --------------------------------------------------------------------------------------------

ZOO = [
    ("arcface", "triplet"), ("cosface", "circle"), ("sphereface", "contrastive"), ("circle", "lifted"),
    ("softmax", "instance"), ("softmax", "wrt"), ("softmax", "triplet_ms"),
]


def _model_cfg(id_type, metric):
    miner = "multi_similarity" if metric == "triplet_ms" else "batch_hard"
    return load_config(None, [
        "MODEL.NAME", "resnet18", "MODEL.PRETRAIN_CHOICE", "none", "DATALOADER.SAMPLER", "softmax_triplet",
        "MODEL.ID_LOSS_TYPE", id_type, "MODEL.METRIC_LOSS_TYPE", metric.replace("triplet_ms", "triplet"),
        "SOLVER.TRIPLET_MINER", miner, "DATALOADER.NUM_INSTANCE", "2", "SOLVER.IMS_PER_BATCH", "8"])


@pytest.mark.parametrize("id_type,metric", ZOO)
def test_each_loss_trains_a_bnneck_model_under_bf16_autocast(id_type, metric):
    from strongreid.modeling import build_model

    torch.manual_seed(0)
    cfg = _model_cfg(id_type, metric)
    model = build_model(cfg, 4)
    assert (type(model.classifier) is CosineClassifier) == (id_type != "softmax")
    loss_fn = build_loss(cfg, 4, model.feat_dim)
    images, targets = torch.randn(8, 3, 64, 32), torch.arange(4).repeat_interleave(2)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, feats = model(images)
    assert feats.dtype == torch.bfloat16
    # the cosine classifier leaves autocast: margins are added in fp32
    assert logits.dtype == (torch.float32 if id_type != "softmax" else torch.bfloat16)
    terms = loss_fn(ModelOutput(logits, feats).float(), targets)
    assert all(torch.isfinite(v) for v in terms.values())
    terms["total"].backward()
    for name in ("classifier.weight", "bottleneck.weight", "backbone.conv1.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("head,extra", [("layumi", []), ("pcb", ["MODEL.PCB_PARTS", "4"])])
def test_margin_classifiers_replace_the_layumi_and_pcb_classifiers(head, extra):
    from strongreid.modeling import build_model

    torch.manual_seed(0)
    cfg = load_config(None, [
        "MODEL.NAME", "resnet18", "MODEL.PRETRAIN_CHOICE", "none", "MODEL.HEAD", head, *extra,
        "DATALOADER.SAMPLER", "softmax_triplet", "MODEL.ID_LOSS_TYPE", "cosface",
        "MODEL.METRIC_LOSS_TYPE", "circle", "DATALOADER.NUM_INSTANCE", "2", "SOLVER.IMS_PER_BATCH", "8"])
    model = build_model(cfg, 4)
    cosine = [n for n, m in model.named_modules() if isinstance(m, CosineClassifier)]
    assert len(cosine) == (4 if head == "pcb" else 1)
    assert all(m.out_features != 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    model.train()
    terms = build_loss(cfg, 4, model.feat_dim)(model(torch.randn(8, 3, 64, 32)), torch.arange(4).repeat_interleave(2))
    terms["total"].backward()
    assert all(torch.isfinite(v) for v in terms.values())
    assert all(dict(model.named_parameters())[n + ".weight"].grad is not None for n in cosine)


def test_cosine_classifier_checkpoint_loads_and_tests_like_the_linear_one(tmp_path):
    from strongreid.modeling import build_model
    from strongreid.modeling.checkpoint import save_checkpoint
    from strongreid.modeling.weights import load_test_weights

    torch.manual_seed(0)
    trained = build_model(_model_cfg("arcface", "triplet"), 4)
    save_checkpoint({"model": trained.state_dict(), "arch": "resnet18", "num_classes": 4}, tmp_path / "arc.pt")
    for id_type in ("arcface", "softmax"):
        fresh = build_model(_model_cfg(id_type, "triplet"), 4)
        load_test_weights(fresh, str(tmp_path / "arc.pt"))
        torch.testing.assert_close(fresh.classifier.weight, trained.classifier.weight)
        x = torch.randn(2, 3, 64, 32)
        trained.eval(), fresh.eval()
        torch.testing.assert_close(fresh(x), trained(x))


# --------------------------------------------------------------------------------------------
# torchrun: every pair term mined over the gathered batch gives the single-process gradient
# --------------------------------------------------------------------------------------------

GATHER_TERMS = "triplet,circle,contrastive,lifted,instance,wrt"


def _gather_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from strongreid.engine import distributed as D
    from strongreid.engine.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = _zoo_cfg(**{"MODEL.METRIC_LOSS_TYPE": GATHER_TERMS, "MODEL.ID_LOSS_TYPE": "arcface"})
    feats, labels = _batch(7, ids=4, k=4, dim=6)
    cos = torch.rand(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    half = slice(8 * rank, 8 * rank + 8)
    local = feats[half].clone().requires_grad_(True)
    fake = SimpleNamespace(loss_fn=build_loss(cfg, 4, 6), triplet_gather=True,
                           dist=SimpleNamespace(world_size=2))
    terms, loss = Trainer._losses(fake, ModelOutput(cos[half], local), labels[half])
    loss.backward()
    torch.save({"terms": {k: v.item() for k, v in terms.items()}, "grad": local.grad}, f"{out}/rank{rank}.pt")
    D.cleanup()


def test_gathered_pair_terms_equal_the_single_process_ones(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gather_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    cfg = _zoo_cfg(**{"MODEL.METRIC_LOSS_TYPE": GATHER_TERMS, "MODEL.ID_LOSS_TYPE": "arcface"})
    feats, labels = _batch(7, ids=4, k=4, dim=6)
    full = feats.clone().requires_grad_(True)
    loss_fn = build_loss(cfg, 4, 6)
    single = {k: loss_fn.metric_weights[k] * m(full, labels) for k, m in loss_fn.metrics.items()}
    torch.stack(list(single.values())).sum().backward()
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for k, v in single.items():
            assert r["terms"][k] == pytest.approx(v.item(), rel=1e-9), k
        # The trainer back-propagates W x the pair terms, so each rank's slice gets W x its part
        # of the single-process gradient, and DDP's average over the W ranks gives the latter
        # (the ID term here depends on the cosines only, not on these features).
        torch.testing.assert_close(r["grad"], 2 * full.grad[8 * rank:8 * rank + 8], rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# CLI: each family trains on the synthetic set, loss finite and falling
# --------------------------------------------------------------------------------------------

FAMILIES = {
    "margin_classifiers+pair": {"MODEL.ID_LOSS_TYPE": "arcface", "MODEL.METRIC_LOSS_TYPE": "circle,contrastive"},
    "cosface+lifted+instance": {"MODEL.ID_LOSS_TYPE": "cosface", "MODEL.METRIC_LOSS_TYPE": "lifted,instance"},
    "sphereface+ms_triplet": {"MODEL.ID_LOSS_TYPE": "sphereface", "MODEL.METRIC_LOSS_TYPE": "triplet",
                              "SOLVER.TRIPLET_MINER": "multi_similarity"},
    "circle_softmax+wrt": {"MODEL.ID_LOSS_TYPE": "circle", "MODEL.METRIC_LOSS_TYPE": "wrt,center"},
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_trains_from_the_cli(family, tiny_synthetic_root, tmp_path):
    over = {"MODEL.IF_WITH_CENTER": "yes" if "center" in FAMILIES[family]["MODEL.METRIC_LOSS_TYPE"] else "no",
            "SOLVER.MAX_EPOCHS": 3, "SOLVER.EVAL_PERIOD": 3,
            **FAMILIES[family]}  # bf16 is covered above; CPU bf16 without AMX is slow
    out = tmp_path / "run"
    assert main(["train", *tiny_train_opts(tiny_synthetic_root, out, **over)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["type"] == "train"]
    terms = [t.strip() for t in FAMILIES[family]["MODEL.METRIC_LOSS_TYPE"].split(",")]
    for r in train:
        assert math.isfinite(r["loss"]) and all(math.isfinite(r[f"loss_{t}"]) for t in terms + ["id"])
    assert train[-1]["loss"] < train[0]["loss"]
    assert (out / "results.json").is_file()
