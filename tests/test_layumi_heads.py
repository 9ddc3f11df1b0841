"""layumi's ClassBlock head and PCB: structure (layumi's names), features, losses, training."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _train_utils import model_cfg, tiny_train_opts

from strongreid.cli import main
from strongreid.config import get_cfg_defaults, load_config
from strongreid.errors import ConfigError
from strongreid.losses.build import ReIDLoss
from strongreid.losses.classification import CrossEntropyLoss
from strongreid.modeling import build_model, load_test_weights
from strongreid.modeling.heads.class_block import ClassBlock, LayumiModel
from strongreid.modeling.heads.pcb import PCBModel
from strongreid.modeling.outputs import ModelOutput, class_scores

_cfg = model_cfg


def test_class_block_has_layumis_module_names_and_order():
    block = ClassBlock(64, 10, droprate=0.5, relu=True, linear=32)
    assert [type(m) for m in block.add_block] == [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Dropout]
    assert block.add_block[2].negative_slope == 0.1
    assert set(block.state_dict()) == {
        "add_block.0.weight", "add_block.0.bias", "add_block.1.weight", "add_block.1.bias",
        "add_block.1.running_mean", "add_block.1.running_var", "add_block.1.num_batches_tracked",
        "classifier.0.weight", "classifier.0.bias",
    }
    # layumi's init (weights_init_classifier): zero biases, classifier std 0.0001, BN scale ~1.
    assert torch.all(block.add_block[0].bias == 0) and torch.all(block.classifier[0].bias == 0)
    assert block.classifier[0].weight.std().item() == pytest.approx(1e-4, rel=0.2)
    assert abs(block.add_block[1].weight.mean().item() - 1.0) < 0.02
    plain = ClassBlock(64, 10, droprate=0.0, linear=0)
    assert [type(m) for m in plain.add_block] == [nn.BatchNorm1d] and plain.linear_num == 64


def test_layumi_head_features_are_the_bn_embedding():
    torch.manual_seed(0)
    model = build_model(_cfg(MODEL__HEAD="layumi", MODEL__LINEAR_NUM=24), 7)
    assert isinstance(model, LayumiModel) and model.feat_dim == 24
    assert {k.split(".")[0] for k in model.state_dict()} == {"backbone", "classifier"}
    x = torch.randn(4, 3, 64, 32)
    model.train()
    logits, f = model(x)
    assert logits.shape == (4, 7) and f.shape == (4, 24)
    model.eval()
    with torch.no_grad():
        feat = model(x)
        pooled = F.adaptive_avg_pool2d(model.backbone(x), 1).flatten(1)
        lin, bn = model.classifier.add_block[0], model.classifier.add_block[1]
        expected = (lin(pooled) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    assert torch.allclose(feat, expected, atol=1e-5)


def test_pcb_feature_is_layumis_part_normalised_concatenation():
    torch.manual_seed(0)
    model = build_model(_cfg(MODEL__HEAD="pcb", MODEL__PCB_PARTS=3), 5).eval()
    assert isinstance(model, PCBModel) and model.feat_dim == 512 * 3
    x = torch.randn(2, 3, 48, 32)  # 3 x 2 map at last stride 1
    with torch.no_grad():
        feat = model(x)
        stripes = model.stripes(x)  # B x C x P
    assert feat.shape == (2, 512 * 3)
    assert torch.allclose(feat.norm(dim=1), torch.ones(2), atol=1e-5)
    # layumi's ordering: index c * P + p.
    for p in range(3):
        part = feat.view(2, 512, 3)[:, :, p]
        assert torch.allclose(part.norm(dim=1), torch.full((2,), 1 / math.sqrt(3)), atol=1e-5)
        assert torch.allclose(part, stripes[:, :, p] / stripes[:, :, p].norm(dim=1, keepdim=True)
                              / math.sqrt(3), atol=1e-5)
    model.train()
    logits, feats = model(x)
    assert len(logits) == 3 and all(t.shape == (2, 5) for t in logits) and feats.shape == (2, 1536)
    assert {k.split(".")[0] for k in model.state_dict()} == {"backbone", "classifier0", "classifier1",
                                                             "classifier2"}


def test_pcb_flip_and_scales_sum_raw_stripes_then_normalise_each_like_layumi():
    from strongreid.engine.inference import tta_forward

    torch.manual_seed(0)
    model = build_model(_cfg(MODEL__HEAD="pcb", MODEL__PCB_PARTS=3), 5).eval()
    x = torch.randn(2, 3, 48, 32)
    views = [x, x.flip(3)]
    views += [F.interpolate(v, scale_factor=math.sqrt(2.25), mode="bicubic", align_corners=False)
              for v in views]
    with torch.no_grad():
        raw = [model.stripes(v) for v in views]  # B x C x P each
        got_flip = tta_forward(model, x, flip=True)
        got_all = tta_forward(model, x, flip=True, scales=(1.0, 2.25))
        averaged = (model(views[0]) + model(views[1])) / 2  # the mean of normalised features

    def layumi(stripes):  # test.py: ff += outputs over views, then per-part norm x sqrt(P)
        ff = sum(stripes)
        return (ff / (ff.norm(dim=1, keepdim=True) * math.sqrt(3))).reshape(2, -1)

    torch.testing.assert_close(got_flip, layumi(raw[:2]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_all, layumi(raw), rtol=1e-5, atol=1e-6)
    # Averaging normalised stripes is another vector (different relative weights of the views).
    assert (F.normalize(averaged, dim=1) - got_flip).abs().max() > 1e-4


def test_pcb_refuses_a_map_with_fewer_rows_than_parts():
    model = build_model(_cfg(MODEL__HEAD="pcb"), 5).eval()  # 6 parts
    with pytest.raises(ConfigError, match="MODEL.PCB_PARTS = 6"):
        model(torch.randn(1, 3, 64, 32))  # 4 rows


def test_id_loss_sums_over_part_logits():
    targets = torch.tensor([0, 2])
    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    loss = ReIDLoss(CrossEntropyLoss(), id_weight=0.5)
    out = loss(ModelOutput([a, b], torch.zeros(2, 4)), targets)
    # CE(a) = mean(log(2 + e^2) - 2, log(2 + e) - 1); CE(b) = mean(log(2 + e) - 0, log 3)
    ce_a = (math.log(2 + math.e ** 2) - 2 + math.log(2 + math.e) - 1) / 2
    ce_b = (math.log(2 + math.e) + math.log(3)) / 2
    assert out["id"].item() == pytest.approx(0.5 * (ce_a + ce_b), rel=1e-6)
    assert out["total"].item() == pytest.approx(out["id"].item())


def test_pcb_prediction_sums_part_softmaxes():
    a = torch.tensor([[5.0, 0.0], [0.0, 0.1]])
    b = torch.tensor([[0.0, 0.5], [0.0, 3.0]])
    # sample 0: part a is sure of class 0, part b mildly prefers 1 -> class 0 (logit sum agrees);
    scores = class_scores([a, b])
    assert torch.allclose(scores, F.softmax(a, 1) + F.softmax(b, 1))
    assert scores.argmax(1).tolist() == [0, 1]
    plain = torch.randn(2, 3)
    assert class_scores(plain) is plain


@pytest.mark.parametrize("key, value, match", [
    # every registered head is offered, in sorted order (more register themselves from heads/)
    ("MODEL.HEAD", "bnn", "MODEL.HEAD = 'bnn' is not allowed; choose one of 'baseline', 'layumi', ('[a-z_]+', )*'pcb'"),
    ("MODEL.DROPRATE", "1.0", r"MODEL.DROPRATE = 1.0 must lie in \[0, 1\)"),
    ("MODEL.LINEAR_NUM", "-1", "MODEL.LINEAR_NUM = -1 must be >= 0"),
    ("MODEL.PCB_PARTS", "0", "MODEL.PCB_PARTS = 0 must be at least 1"),
])
def test_bad_head_keys_fail_up_front(key, value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [key, value, "MODEL.DEVICE", "cpu"])


def test_defaults_build_the_strong_baseline():
    cfg = get_cfg_defaults()
    assert cfg.MODEL.HEAD == "baseline"
    from strongreid.modeling import ReIDModel

    assert isinstance(build_model(_cfg(), 3), ReIDModel)


@pytest.mark.parametrize("head, extra", [
    ("layumi", {}),
    ("pcb", {"MODEL.PCB_PARTS": 4}),  # 4 rows at 64x32 with last stride 1
])
def test_layumi_heads_train_and_test_from_the_cli(tiny_synthetic_root, tmp_path, head, extra):
    out = tmp_path / head
    opts = tiny_train_opts(tiny_synthetic_root, out, **{
        # layumi's default recipe: cross-entropy alone on a shuffled loader.
        "MODEL.HEAD": head, "MODEL.IF_WITH_CENTER": "no", "MODEL.METRIC_LOSS_TYPE": "triplet",
        "DATALOADER.SAMPLER": "softmax", "MODEL.IF_LABELSMOOTH": "off",
        "SOLVER.MAX_EPOCHS": 3, "SOLVER.EVAL_PERIOD": 3, **extra,
    })
    assert main(["train", *opts]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["type"] == "train"]
    assert all(math.isfinite(r["loss"]) for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert 0 < json.loads((out / "results.json").read_text())["mAP"] <= 1
    # Cross-domain load: the class-count layers are skipped, everything else must fit.
    cfg = load_config(None, opts)
    other = build_model(cfg, 3)
    report = load_test_weights(other, out / "last.pt")
    assert report.skipped and all(".classifier." in k or k.startswith("classifier.classifier.")
                                  for k in report.skipped)


@pytest.mark.parametrize("head", ["layumi", "pcb"])
def test_margin_id_losses_get_cosine_part_classifiers(head):
    from strongreid.modeling.cosine import CosineClassifier

    model = build_model(_cfg(MODEL__HEAD=head, MODEL__PCB_PARTS=3, MODEL__ID_LOSS_TYPE="arcface"), 5)
    blocks = [model.classifier] if head == "layumi" else [model.classifier0, model.classifier1,
                                                          model.classifier2]
    assert all(isinstance(b.classifier[0], CosineClassifier) for b in blocks)
    assert "classifier.0.weight" in dict(blocks[0].named_parameters())
    model.train()
    logits, _ = model(torch.randn(2, 3, 48, 32))
    parts = logits if isinstance(logits, list) else [logits]
    assert all(p.abs().max() <= 1 + 1e-5 for p in parts)  # cosines
