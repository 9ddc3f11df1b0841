"""layumi / fast-reid training options: backbone lr factor, Nesterov, backbone freeze, delayed
cosine, colour jitter, AutoAugment, weight averaging (EMA / SWA)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from _train_utils import model_cfg, tiny_train_opts
from torchvision import transforms as T

from strongreid.cli import main
from strongreid.config import load_config
from strongreid.data.transforms import build_transforms
from strongreid.engine.averaging import WeightAveraging, first_averaged_epoch
from strongreid.errors import ConfigError
from strongreid.modeling import build_model
from strongreid.modeling.checkpoint import read_checkpoint
from strongreid.solver import build_scheduler, make_optimizer

_solver_cfg = model_cfg


def _lrs(opt):
    return sorted({(g["name"], round(g["lr"], 12)) for g in opt.param_groups})


def test_backbone_lr_factor_and_nesterov():
    cfg = _solver_cfg(SOLVER__OPTIMIZER_NAME="SGD", SOLVER__BASE_LR=0.05, SOLVER__BIAS_LR_FACTOR=1.0,
                      SOLVER__BACKBONE_LR_FACTOR=0.1, SOLVER__NESTEROV=True, MODEL__HEAD="layumi")
    model = build_model(cfg, 5)
    opt = make_optimizer(cfg, model)
    assert _lrs(opt) == [("backbone bias", 0.005), ("backbone weight", 0.005), ("bias", 0.05),
                         ("weight", 0.05)]
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in opt.param_groups)
    n_backbone = sum(p.numel() for g in opt.param_groups if g["backbone"] for p in g["params"])
    assert n_backbone == sum(p.numel() for p in model.backbone.parameters())


def test_default_groups_are_unchanged():
    cfg = _solver_cfg()
    opt = make_optimizer(cfg, build_model(cfg, 5))
    # Original rules: weights at BASE_LR, biases at BASE_LR * BIAS_LR_FACTOR (2).
    assert {round(g["lr"], 12) for g in opt.param_groups} == {3e-4, 6e-4}


def test_nesterov_needs_sgd():
    with pytest.raises(ConfigError, match="SOLVER.NESTEROV applies to SGD only"):
        load_config(None, ["MODEL.DEVICE", "cpu", "SOLVER.NESTEROV", "True"])


def test_freeze_backbone_epochs_hold_the_backbone_at_lr_0():
    cfg = _solver_cfg(SOLVER__FREEZE_BACKBONE_EPOCHS=2, SOLVER__WARMUP_ITERS=0, SOLVER__STEPS=(100,))
    model = build_model(cfg, 5)
    opt = make_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt)
    seen = []
    for _ in range(3):
        seen.append(sorted({(g["backbone"], g["lr"]) for g in opt.param_groups}))
        opt.step()
        sched.step()
    head = [(False, 3e-4)]  # the BNNeck has no trainable bias
    assert seen[0] == seen[1] == [*head, (True, 0.0)]
    assert seen[2] == [*head, (True, 3e-4), (True, 6e-4)]


def test_cosine_after_delay():
    cfg = _solver_cfg(SOLVER__SCHED="cosine", SOLVER__MAX_EPOCHS=10, SOLVER__WARMUP_ITERS=2,
                      SOLVER__WARMUP_FACTOR=0.1, SOLVER__COSINE_DELAY_EPOCHS=3,
                      SOLVER__COSINE_MIN_LR_FACTOR=0.0)
    sched = build_scheduler(cfg, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0))
    got = [sched.factor(t) for t in range(10)]
    # warm-up 0.1 -> 0.55, flat 1 until t = 3 (the delay counts from the start, as fast-reid),
    # then a cosine over t = 3..9 (6 steps) down to 0.
    expected = [0.1, 0.55, 1, *(0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(7))]
    assert got == pytest.approx(expected, abs=1e-12)


def test_colour_jitter_and_autoaugment_come_first():
    cfg = _solver_cfg(INPUT__COLOR_JITTER=True, INPUT__AUTOAUG_PROB=0.1)
    steps = build_transforms(cfg, is_train=True).transforms
    assert isinstance(steps[0], T.RandomApply) and steps[0].p == 0.1
    assert isinstance(steps[0].transforms[0], T.AutoAugment)
    jitter = steps[1]
    assert isinstance(jitter, T.ColorJitter)
    assert jitter.brightness == (0.9, 1.1) and jitter.saturation == (0.9, 1.1) and jitter.hue is None
    assert isinstance(steps[2], T.Resize)
    plain = build_transforms(_solver_cfg(), is_train=True).transforms
    assert isinstance(plain[0], T.Resize)
    with pytest.raises(ConfigError, match="INPUT.CJ_PARAMS"):
        build_transforms(_solver_cfg(INPUT__COLOR_JITTER=True, INPUT__CJ_PARAMS=[0.1, 0.1]), True)


def test_first_averaged_epoch_is_layumis():
    # layumi: 0-based epoch >= 0.8 * total -> 1-based 49 of 60.
    assert first_averaged_epoch(60, 0.8) == 49
    assert first_averaged_epoch(10, 0.5) == 6
    assert first_averaged_epoch(3, 0.0) == 1


@pytest.mark.parametrize("mode", ["ema", "swa"])
def test_averaging_formula(mode):
    cfg = _solver_cfg(SOLVER__WA=mode, SOLVER__WA_EMA_DECAY=0.9, SOLVER__MAX_EPOCHS=4,
                      SOLVER__WA_START=0.5)
    wa = WeightAveraging(cfg)
    lin = nn.Linear(1, 1, bias=False)
    values = {3: 1.0, 4: 3.0}
    for epoch in range(1, 5):
        with torch.no_grad():
            lin.weight.fill_(values.get(epoch, 100.0))
        wa.update(epoch, lin)
    got = wa.averaged.module.weight.item()
    # EMA: first snapshot copied, then 0.9 * 1 + 0.1 * 3; SWA: the mean of 1 and 3.
    assert got == pytest.approx(1.2 if mode == "ema" else 2.0)


def test_weight_averaging_writes_its_own_checkpoint(tiny_synthetic_root, tmp_path, capsys):
    out = tmp_path / "wa"
    opts = tiny_train_opts(tiny_synthetic_root, out, **{
        "SOLVER.MAX_EPOCHS": 3, "SOLVER.EVAL_PERIOD": 3,
        "SOLVER.WA": "swa", "SOLVER.WA_START": 0.5, "SOLVER.OPTIMIZER_NAME": "SGD",
        "SOLVER.NESTEROV": True, "SOLVER.BACKBONE_LR_FACTOR": 0.1, "SOLVER.BASE_LR": 0.02,
        "INPUT.COLOR_JITTER": True,
    })
    assert main(["train", *opts]) == 0
    averaged = read_checkpoint(out / "averaged.pt")
    last = read_checkpoint(out / "last.pt")
    assert averaged["weight_averaging"] and "optimizer" not in averaged
    assert set(averaged["model"]) == set(last["model"])
    # WA_START 0.5 of 3 epochs: 0-based epoch >= 1.5, i.e. epoch 3 alone is averaged, so the
    # weights equal the last ones while the BN statistics were recomputed.
    w = "backbone.conv1.weight"
    assert torch.equal(averaged["model"][w], last["model"][w])
    assert not torch.equal(averaged["model"]["backbone.bn1.running_var"],
                           last["model"]["backbone.bn1.running_var"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in rows].count("eval_averaged") == 1
    capsys.readouterr()
    test_opts = tiny_train_opts(tiny_synthetic_root, tmp_path / "t", **{"TEST.WEIGHT": out / "averaged.pt"})
    assert main(["test", *test_opts]) == 0


PRESETS = ["agw", "sbs", "layumi_resnet50", "layumi_pcb", "layumi_circle", "layumi_swinv2_circle"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_build(name):
    from pathlib import Path

    from strongreid.losses import build_loss

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yml"
    cfg = load_config(str(path), ["MODEL.DEVICE", "cpu", "MODEL.PRETRAIN_CHOICE", "none"])
    with torch.device("meta"):  # shapes only: ResNet-50 / SwinV2-B at their sizes in no time
        model = build_model(cfg, 751)
        out = model.eval()(torch.empty(2, 3, *cfg.INPUT.SIZE_TEST))
    assert out.shape == (2, model.feat_dim)
    loss = build_loss(cfg, 751, model.feat_dim)
    assert loss.id_loss is not None
    make_optimizer(cfg, model)


def test_preset_values_are_the_published_recipes():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    agw = load_config(str(root / "agw.yml"), ["MODEL.DEVICE", "cpu"])
    assert (agw.MODEL.NON_LOCAL, agw.MODEL.POOLING, agw.MODEL.METRIC_LOSS_TYPE,
            agw.TEST.NECK_FEAT) == (True, "gem", "wrt", "before")
    sbs = load_config(str(root / "sbs.yml"), ["MODEL.DEVICE", "cpu"])
    assert (sbs.MODEL.ID_LOSS_TYPE, sbs.SOLVER.MARGIN, sbs.INPUT.AUTOAUG_PROB,
            sbs.SOLVER.COSINE_DELAY_EPOCHS, sbs.SOLVER.FREEZE_BACKBONE_EPOCHS,
            list(sbs.INPUT.SIZE_TRAIN)) == ("circle", None, 0.1, 30, 5, [384, 128])
    ly = load_config(str(root / "layumi_resnet50.yml"), ["MODEL.DEVICE", "cpu"])
    assert (ly.MODEL.HEAD, ly.SOLVER.BASE_LR, ly.SOLVER.BACKBONE_LR_FACTOR, ly.SOLVER.NESTEROV,
            ly.MODEL.LAST_STRIDE, ly.SOLVER.IMS_PER_BATCH) == ("layumi", 0.05, 0.1, True, 2, 32)
    pcb = load_config(str(root / "layumi_pcb.yml"), ["MODEL.DEVICE", "cpu"])
    assert (pcb.MODEL.HEAD, list(pcb.INPUT.SIZE_TRAIN), pcb.SOLVER.BASE_LR) == ("pcb", [384, 192], 0.02)
