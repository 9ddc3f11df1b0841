"""Optimiser groups, the center-loss step and the epoch learning-rate schedules."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from strongreid.config import get_cfg_defaults
from strongreid.errors import ConfigError
from strongreid.losses import CenterLoss
from strongreid.modeling import ReIDModel, create_backbone
from strongreid.solver import (
    WarmupCosineLR,
    WarmupMultiStepLR,
    build_scheduler,
    make_center_optimizer,
    make_optimizer,
    param_groups,
    step_center,
)


class Tiny(nn.Module):
    """Weights, biases, BN and a frozen bias: every case of the optimizer-group rules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.neck = nn.BatchNorm1d(4)
        self.neck.bias.requires_grad_(False)
        self.fc = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        x = self.bn(self.conv(x)).mean(dim=(2, 3))
        return self.fc(self.neck(x))


def _cfg(**solver):
    cfg = get_cfg_defaults()
    for key, value in solver.items():
        cfg.SOLVER[key] = value
    return cfg


# --------------------------------------------------------------------------------------------
# Optimiser
# --------------------------------------------------------------------------------------------


def test_param_groups_rules():
    model = Tiny()
    cfg = _cfg(BASE_LR=0.1, BIAS_LR_FACTOR=2, WEIGHT_DECAY=5e-4, WEIGHT_DECAY_BIAS=0.0)
    opt = make_optimizer(cfg, model)
    assert len(opt.param_groups) == 2
    by_name = {g["name"]: g for g in opt.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in by_name["bias"]["params"]) == ["bn.bias", "conv.bias"]
    assert sorted(names[id(p)] for p in by_name["weight"]["params"]) == [
        "bn.weight", "conv.weight", "fc.weight", "neck.weight",
    ]
    assert by_name["bias"]["lr"] == pytest.approx(0.2) and by_name["bias"]["weight_decay"] == 0.0
    assert by_name["weight"]["lr"] == pytest.approx(0.1)
    assert by_name["weight"]["weight_decay"] == pytest.approx(5e-4)
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert id(model.neck.bias) not in grouped  # frozen BNNeck shift is skipped


def test_shipped_config_rules_give_one_group():
    # The ymls: BIAS_LR_FACTOR 1 and WEIGHT_DECAY_BIAS = WEIGHT_DECAY -> every tensor alike.
    model = ReIDModel(create_backbone("resnet18", 1), 5)
    cfg = _cfg(BASE_LR=3.5e-4, BIAS_LR_FACTOR=1, WEIGHT_DECAY=5e-4, WEIGHT_DECAY_BIAS=5e-4)
    opt = make_optimizer(cfg, model)
    assert len(opt.param_groups) == 1
    assert len(opt.param_groups[0]["params"]) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_grouped_equals_one_group_per_tensor(name):
    # Same maths as the original's one group per parameter tensor.
    torch.manual_seed(0)
    a = Tiny()
    b = copy.deepcopy(a)
    cfg = _cfg(OPTIMIZER_NAME=name, BASE_LR=0.01, BIAS_LR_FACTOR=2, WEIGHT_DECAY=1e-3,
               WEIGHT_DECAY_BIAS=0.0, MOMENTUM=0.9)
    opt_a = make_optimizer(cfg, a)
    per_tensor = []
    for n, p in b.named_parameters():
        if p.requires_grad:
            bias = "bias" in n
            per_tensor.append({"params": [p], "lr": 0.02 if bias else 0.01,
                               "weight_decay": 0.0 if bias else 1e-3})
    extra = {"momentum": 0.9} if name == "SGD" else {}
    opt_b = getattr(torch.optim, name)(per_tensor, lr=0.01, **extra)
    x = torch.randn(4, 3, 6, 6)
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, msg=n)


def test_optimizer_kinds_and_unknown_name():
    model = Tiny()
    sgd = make_optimizer(_cfg(OPTIMIZER_NAME="SGD", MOMENTUM=0.8), model)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8
    adam = make_optimizer(_cfg(OPTIMIZER_NAME="Adam"), model)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["betas"] == (0.9, 0.999)
    with pytest.raises(ConfigError) as info:
        make_optimizer(_cfg(OPTIMIZER_NAME="Adamm"), model)
    assert "'Adamm'" in str(info.value) and "AdamW" in str(info.value)


def test_no_trainable_parameters():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError):
        param_groups(frozen, 0.1, 0.0, 1.0, 0.0)


# --------------------------------------------------------------------------------------------
# Center loss optimiser
# --------------------------------------------------------------------------------------------


def test_center_optimizer_settings():
    center = CenterLoss(3, 2)
    opt = make_center_optimizer(_cfg(CENTER_LR=0.5), center)
    group = opt.param_groups[0]
    assert group["lr"] == 0.5 and group["momentum"] == 0 and group["weight_decay"] == 0
    assert group["params"] == [center.centers]


@pytest.mark.parametrize("weight", [0.0005, 0.25])
def test_center_step_closed_form(weight):
    # Center update: c_j <- c_j + (2 lr / B) sum_{i: y_i = j} (x_i - c_j), whatever the weight.
    torch.manual_seed(0)
    center = CenterLoss(4, 3)
    start = center.centers.detach().clone()
    x = torch.randn(5, 3, requires_grad=True)
    y = torch.tensor([0, 0, 1, 2, 0])
    lr = 0.5
    opt = make_center_optimizer(_cfg(CENTER_LR=lr), center)
    opt.zero_grad()
    total = weight * center(x, y) + x.pow(2).sum()  # other terms do not touch the centers
    total.backward()
    step_center(opt, center, weight)
    expected = start.clone()
    for j in range(4):
        members = x.detach()[y == j]
        if len(members):
            expected[j] += (2 * lr / 5) * (members - start[j]).sum(dim=0)
    torch.testing.assert_close(center.centers.detach(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(center.centers[3], start[3])  # absent class: unchanged


def test_center_step_with_grad_scaler_unscales():
    center = CenterLoss(2, 2)
    start = center.centers.detach().clone()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    opt = make_center_optimizer(_cfg(CENTER_LR=0.5), center)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    (scaler.scale(0.01 * center(x, y))).backward()
    step_center(opt, center, 0.01, scaler=scaler)
    torch.testing.assert_close(center.centers.detach(), start + 0.5 * (x - start))
    with pytest.raises(ConfigError):
        step_center(opt, center, 0.0)


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------

BASE = 3.5e-4


def _epoch_lrs(scheduler, optimizer, epochs: int) -> list[float]:
    """The lr each epoch trains with when the scheduler steps once after every epoch."""
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _sched_for(steps, warmup_iters, warmup_factor=0.01):
    # The four shipped ymls' values.
    cfg = _cfg(BASE_LR=BASE, STEPS=steps, GAMMA=0.1, WARMUP_FACTOR=warmup_factor,
               WARMUP_ITERS=warmup_iters, WARMUP_METHOD="linear", MAX_EPOCHS=120)
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=BASE)
    return build_scheduler(cfg, opt), opt


def test_softmax_triplet_schedule_pt10_column():
    # softmax_triplet.yml and softmax_triplet_with_center.yml: warm-up 10 from 0.01, 40/70.
    sched, opt = _sched_for((40, 70), 10)
    lrs = _epoch_lrs(sched, opt, 120)
    table = {1: 3.5e-06, 2: 3.815e-05, 5: 1.421e-04, 10: 3.1535e-04, 11: 3.5e-04, 39: 3.5e-04,
             40: 3.5e-04, 41: 3.5e-05, 69: 3.5e-05, 70: 3.5e-05, 71: 3.5e-06, 120: 3.5e-06}
    for epoch, lr in table.items():
        assert lrs[epoch - 1] == pytest.approx(lr, rel=1e-9), epoch
    for e in range(1, 121):  # the rule under the table
        rule = (BASE * (0.01 + 0.99 * (e - 1) / 10) if e <= 10 else
                BASE if e <= 40 else BASE / 10 if e <= 70 else BASE / 100)
        assert lrs[e - 1] == pytest.approx(rule, rel=1e-9), e


def test_baseline_schedule_without_warmup():
    sched, opt = _sched_for((40, 70), 0)
    lrs = _epoch_lrs(sched, opt, 120)
    for epoch, lr in {1: 3.5e-4, 2: 3.5e-4, 40: 3.5e-4, 41: 3.5e-5, 70: 3.5e-5, 71: 3.5e-6}.items():
        assert lrs[epoch - 1] == pytest.approx(lr, rel=1e-9), epoch


def test_softmax_schedule():
    sched, opt = _sched_for((30, 55), 5)
    lrs = _epoch_lrs(sched, opt, 120)
    expected = {1: 3.5e-6, 2: BASE * (0.01 + 0.99 / 5), 5: BASE * (0.01 + 0.99 * 4 / 5),
                6: 3.5e-4, 30: 3.5e-4, 31: 3.5e-5, 55: 3.5e-5, 56: 3.5e-6}
    for epoch, lr in expected.items():
        assert lrs[epoch - 1] == pytest.approx(lr, rel=1e-9), epoch


def test_constant_warmup_and_bias_group_scaling():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 2.0}], lr=1.0)
    sched = WarmupMultiStepLR(opt, [3], gamma=0.5, warmup_factor=0.25, warmup_iters=2,
                              warmup_method="constant")
    seen = []
    for _ in range(4):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen == [[0.25, 0.5], [0.25, 0.5], [1.0, 2.0], [0.5, 1.0]]


def test_scheduler_validation():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="STEPS"):
        WarmupMultiStepLR(opt, [70, 40])
    with pytest.raises(ConfigError, match="WARMUP_METHOD"):
        WarmupMultiStepLR(opt, [40, 70], warmup_method="exp")
    cfg = _cfg(SCHED="poly")
    with pytest.raises(ConfigError, match="SOLVER.SCHED"):
        build_scheduler(cfg, opt)


def test_cosine_schedule():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, max_epochs=11, min_lr_factor=0.01, warmup_factor=0.1,
                           warmup_iters=1)
    lrs = _epoch_lrs(sched, opt, 11)
    assert lrs[0] == pytest.approx(0.1)  # warm-up epoch
    assert lrs[1] == pytest.approx(1.0)  # cosine starts at the base lr...
    assert lrs[10] == pytest.approx(0.01)  # ...and ends at base * min factor on the last epoch
    mid = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 4 / 9))  # epoch 6: t = 5, 4 of 9 steps
    assert lrs[5] == pytest.approx(mid)
    cfg = _cfg(SCHED="cosine", MAX_EPOCHS=11, COSINE_MIN_LR_FACTOR=0.01, WARMUP_ITERS=1,
               WARMUP_FACTOR=0.1, BASE_LR=1.0)
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    assert _epoch_lrs(build_scheduler(cfg, opt2), opt2, 11) == pytest.approx(lrs)


@pytest.mark.parametrize("sched_name", ["multistep", "cosine"])
def test_resume_from_state_dict(sched_name):
    cfg = _cfg(SCHED=sched_name, BASE_LR=BASE, STEPS=(4, 8), WARMUP_ITERS=3, WARMUP_FACTOR=0.01,
               MAX_EPOCHS=12)

    def fresh():
        opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=BASE)
        return build_scheduler(cfg, opt), opt

    sched, opt = fresh()
    straight = _epoch_lrs(sched, opt, 12)
    sched, opt = fresh()
    first = _epoch_lrs(sched, opt, 5)
    state = sched.state_dict()
    sched, opt = fresh()  # the optimiser's own state is NOT restored here
    sched.load_state_dict(state)
    assert first + _epoch_lrs(sched, opt, 7) == pytest.approx(straight, rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    milestones=st.lists(st.integers(1, 30), max_size=4).map(sorted),
    gamma=st.floats(0.05, 0.9),
    warmup_iters=st.integers(0, 8),
    warmup_factor=st.floats(0.001, 1.0),
)
def test_multistep_properties(milestones, gamma, warmup_iters, warmup_factor):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupMultiStepLR(opt, milestones, gamma, warmup_factor, warmup_iters, "linear")
    lrs = _epoch_lrs(sched, opt, 35)
    assert lrs[0] == pytest.approx(warmup_factor if warmup_iters else gamma ** milestones.count(0))
    for e in range(warmup_iters + 1, 36):  # after warm-up: decays only at milestones
        assert lrs[e - 1] == pytest.approx(gamma ** sum(m <= e - 1 for m in milestones))
    for e in range(2, warmup_iters + 1):  # during linear warm-up the lr never falls
        if not any(m <= e - 1 for m in milestones):
            assert lrs[e - 1] >= lrs[e - 2] - 1e-12
