"""Issue 14's keys (fast-reid's BoT differences): per-iteration LR, classifier std, zero-init
residual BN; their defaults keep the original behaviour; the ablation script's table."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from _train_utils import tiny_train_opts

from strongreid.cli import main
from strongreid.config import get_cfg_defaults, load_config
from strongreid.errors import ConfigError
from strongreid.modeling import build_model
from strongreid.modeling.backbones import create_backbone
from strongreid.modeling.init_options import last_block_norms, zero_init_residual
from strongreid.solver import IterationLR, WarmupCosineLR, WarmupMultiStepLR, build_iteration_lr

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_CONFIGS = ["softmax.yml", "softmax_triplet.yml", "softmax_triplet_with_center.yml", "baseline.yml"]


def _opt(base_lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)


def _cfg(unit: str):
    cfg = get_cfg_defaults()
    cfg.SOLVER.LR_STEP_UNIT = unit
    return cfg


@pytest.mark.parametrize("name", ORIGINAL_CONFIGS)
def test_original_configs_keep_the_original_behaviour(name):
    cfg = load_config(str(ROOT / "configs" / name), [])
    assert cfg.SOLVER.LR_STEP_UNIT == "epoch"
    assert cfg.MODEL.CLASSIFIER_INIT_STD == 0.001
    assert cfg.MODEL.ZERO_INIT_RESIDUAL is False
    assert cfg.INPUT.INTERPOLATION == "bilinear"
    assert cfg.MODEL.HEAD_PRECISION == "amp"


def test_epoch_unit_builds_no_iteration_lr():
    sched = WarmupCosineLR(_opt(), 16, 0.01, 0.1, 3, "linear")
    assert build_iteration_lr(_cfg("epoch"), sched, 33) is None
    with pytest.raises(ConfigError, match="'epoch', 'iter', 'warmup'"):
        build_iteration_lr(_cfg("batch"), sched, 33)


def test_iteration_warmup_hand_values():
    # base 1e-3, warm-up 3 epochs from 0.1, 10 iterations an epoch: t = e + i / 10.
    opt = _opt(1e-3)
    sched = WarmupCosineLR(opt, 16, 0.01, 0.1, 3, "linear")
    step = IterationLR(sched, "warmup", 10)
    assert step(0, 0) == pytest.approx(1e-4)  # fast-reid's first iteration: base * factor
    # t = 0.5: 0.1 (1 - 0.5/3) + 0.5/3 = 0.25
    assert step(0, 5) == pytest.approx(2.5e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    # t = 2.9: 0.1 (1 - 2.9/3) + 2.9/3 = 0.97
    assert step(2, 9) == pytest.approx(0.97e-3)
    # after warm-up 'warmup' keeps the epoch's value: epoch 4 (0-based 3) is the cosine's start
    assert step(3, 7) == pytest.approx(1e-3)
    # epoch 0-based 9: progress (9 - 3) / 12 = 0.5 -> 0.01 + 0.99 * 0.5
    assert step(9, 5) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))


def test_iteration_schedule_hand_values():
    sched = WarmupCosineLR(_opt(1e-3), 16, 0.01, 0.1, 3, "linear")
    step = IterationLR(sched, "iter", 10)
    # t = 3.5: progress 0.5 / 12
    expected = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5 / 12))
    assert step(3, 5) == pytest.approx(1e-3 * expected)
    # multistep: milestone 5 takes effect half-way through 0-based epoch 4 only at t >= 5
    ms = WarmupMultiStepLR(_opt(1.0), [5], 0.1, 1.0, 0, "linear")
    mstep = IterationLR(ms, "iter", 4)
    assert mstep(4, 3) == pytest.approx(1.0)
    assert mstep(5, 0) == pytest.approx(0.1)


def test_iteration_lr_agrees_with_the_epoch_scheduler_at_epoch_starts():
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": 1e-3},
                           {"params": [nn.Parameter(torch.zeros(1))], "lr": 2e-3}], lr=1e-3)
    sched = WarmupCosineLR(opt, 8, 0.01, 0.1, 2, "linear")
    step = IterationLR(sched, "iter", 7)
    for epoch in range(8):
        lrs = [g["lr"] for g in opt.param_groups]
        step(epoch, 0)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(lrs)
        assert lrs[1] == pytest.approx(2 * lrs[0])  # every group keeps its own base lr
        opt.step()
        sched.step()


def test_lr_step_unit_is_validated_by_the_loader():
    with pytest.raises(ConfigError, match="SOLVER.LR_STEP_UNIT.*'epoch', 'iter', 'warmup'"):
        load_config(None, ["SOLVER.LR_STEP_UNIT", "batch"])
    with pytest.raises(ConfigError, match="MODEL.CLASSIFIER_INIT_STD"):
        load_config(None, ["MODEL.CLASSIFIER_INIT_STD", "0"])


def _model(**kv) -> nn.Module:
    torch.manual_seed(0)
    opts = ["MODEL.NAME", "resnet18", "MODEL.PRETRAIN_CHOICE", "none"]
    for k, v in kv.items():
        opts += [k, str(v)]
    return build_model(load_config(None, opts), 7)


def test_default_init_is_the_original_bit_for_bit():
    a = _model()
    b = _model(**{"MODEL.CLASSIFIER_INIT_STD": 0.001, "MODEL.ZERO_INIT_RESIDUAL": False})
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_classifier_std_option():
    w = _model(**{"MODEL.CLASSIFIER_INIT_STD": 0.01}).classifier.weight
    assert 0.009 < float(w.detach().std()) < 0.011
    # neck 'no' keeps nn.Linear's default init (as the original), whatever the std says
    plain = _model(**{"MODEL.NECK": "no", "MODEL.CLASSIFIER_INIT_STD": 0.01}).classifier.weight
    assert float(plain.detach().std()) > 0.02


@pytest.mark.parametrize("training", [True, False])
def test_head_precision_fp32_keeps_the_head_out_of_bf16(training):
    torch.manual_seed(0)
    amp = _model().train(training)
    fp32 = _model(**{"MODEL.HEAD_PRECISION": "fp32"}).train(training)
    fp32.load_state_dict(amp.state_dict())  # same weights: only the head's precision differs
    x = torch.randn(4, 3, 64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_amp, out_fp32 = amp(x), fp32(x)
    if training:
        assert out_amp[0].dtype == torch.bfloat16  # the classifier ran in bf16
        assert out_fp32[0].dtype == torch.float32 and out_fp32[1].dtype == torch.float32
        # the fp32 head's logits are the fp32 classifier applied to its fp32 BN feature
        feat = fp32.bottleneck(out_fp32[1])
        assert torch.allclose(out_fp32[0], fp32.classifier(feat), atol=1e-6)
    else:
        assert out_amp.dtype == torch.bfloat16 and out_fp32.dtype == torch.float32
        assert torch.allclose(out_amp.float(), out_fp32, atol=0.05, rtol=0.05)
    # outside autocast the two are the same model (same weights and BN statistics again)
    fp32.load_state_dict(amp.state_dict())
    with torch.no_grad():
        a, b = amp.eval()(x), fp32.eval()(x)
    assert torch.equal(a, b)


def test_head_precision_is_refused_for_heads_it_does_not_cover():
    assert load_config(None, ["MODEL.HEAD_PRECISION", "fp32"]).MODEL.HEAD_PRECISION == "fp32"
    for head in ("layumi", "pcb", "torchreid"):
        with pytest.raises(ConfigError, match=f"HEAD_PRECISION 'fp32'.*MODEL.HEAD is '{head}'"):
            load_config(None, ["MODEL.HEAD", head, "MODEL.HEAD_PRECISION", "fp32"])
    with pytest.raises(ConfigError, match="MODEL.HEAD_PRECISION.*'amp', 'fp32'"):
        load_config(None, ["MODEL.HEAD_PRECISION", "bf16"])


@pytest.mark.parametrize(("name", "count", "attr"), [("resnet18", 8, "bn2"), ("resnet50", 16, "bn3")])
def test_zero_init_residual_zeroes_the_last_bn_of_every_block(name, count, attr):
    backbone = create_backbone(name, 1)
    assert len(last_block_norms(backbone)) == count
    assert zero_init_residual(backbone, name) == count
    for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
        for block in layer:
            assert torch.count_nonzero(getattr(block, attr).weight) == 0
            assert torch.count_nonzero(block.bn1.weight) > 0


def test_zero_init_block_starts_as_the_identity():
    backbone = create_backbone("resnet18", 1)
    zero_init_residual(backbone, "resnet18")
    block = backbone.layer1[0].eval()  # no downsample: out = relu(bn2(...) + x) = relu(x)
    x = torch.randn(2, 64, 8, 4)
    assert torch.equal(block(x), torch.relu(x))


def test_zero_init_without_residual_blocks_is_a_clear_error():
    with pytest.raises(ConfigError, match="MODEL.ZERO_INIT_RESIDUAL"):
        zero_init_residual(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "tiny")


def test_training_with_iteration_warmup_through_the_cli(tiny_synthetic_root, tmp_path):
    out = tmp_path / "run"
    opts = tiny_train_opts(tiny_synthetic_root, out, **{
        "SOLVER.LR_STEP_UNIT": "iter", "SOLVER.WARMUP_ITERS": 2, "SOLVER.WARMUP_FACTOR": 0.1,
        "SOLVER.MAX_EPOCHS": 2, "SOLVER.EVAL_PERIOD": 2, "MODEL.CLASSIFIER_INIT_STD": 0.01,
        "MODEL.ZERO_INIT_RESIDUAL": True, "MODEL.IF_WITH_CENTER": "no", "MODEL.METRIC_LOSS_TYPE": "triplet",
    })
    assert main(["train", *opts]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["type"] == "train"]
    # The logged lr is the last iteration's: t = e + (n - 1) / n, below the epoch-end value.
    lr1, lr2 = train_rows[0]["lr"], train_rows[1]["lr"]
    assert 0.1 * 0.002 < lr1 < 0.55 * 0.002 < lr2 < 0.002
    assert json.loads((out / "results.json").read_text())["mAP"] > 0


def _ablation():
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "benchmarks" / "ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ablation_variants_and_table(tmp_path):
    ab = _ablation()
    assert ab.overrides("demo") == []
    assert ab.overrides("bot") == ab.BOT
    for name in ab.VARIANTS:  # every variant is a valid config
        load_config(str(ROOT / "configs" / "demo.yml"), ab.overrides(name))
    rows = [{"variant": "bot", "seed": s, "mAP": m, "rank1": r, "wall_s": 100.0}
            for s, (m, r) in enumerate([(0.70, 0.80), (0.74, 0.84)])]
    rows.append({"variant": "fastreid", "seed": 0, "mAP": 0.81, "rank1": 0.9, "wall_s": 90.0})
    path = tmp_path / "r.json"
    ab.save_results(path, rows)
    assert ab.load_results(path) == rows
    text = ab.table(rows)
    # mean 72.0, sample std sqrt(((-2)^2 + 2^2) / 1) = 2.83; rank-1 82.0 +- 2.83
    assert "| bot | 2 | 72.0 ± 2.8 | 82.0 ± 2.8 | 70.0..74.0 | 100 |" in text
    assert "| fastreid | 1 | 81.0 | 90.0 | 81.0..81.0 | 90 |" in text


@pytest.mark.parametrize("name", ["bilinear", "bicubic"])
def test_interpolation_option_resizes_with_that_filter(name):
    import numpy as np
    from PIL import Image

    from strongreid.data.transforms import build_transforms

    cfg = load_config(None, ["INPUT.SIZE_TEST", "[16, 8]", "INPUT.INTERPOLATION", name,
                             "INPUT.PIXEL_MEAN", "[0, 0, 0]", "INPUT.PIXEL_STD", "[1, 1, 1]"])
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 16, 3), dtype=np.uint8))
    filt = Image.Resampling.BICUBIC if name == "bicubic" else Image.Resampling.BILINEAR
    expected = torch.from_numpy(np.array(img.resize((8, 16), filt))).permute(2, 0, 1).float() / 255
    got = build_transforms(cfg, is_train=False)(img)
    assert torch.allclose(got, expected, atol=1e-6)
    with pytest.raises(ConfigError, match="INPUT.INTERPOLATION.*'bilinear', 'bicubic'"):
        load_config(None, ["INPUT.INTERPOLATION", "nearest"])


def test_ablation_resumes_an_interrupted_training(tiny_synthetic_root, tmp_path):
    ab = _ablation()
    out = tmp_path / "abl"
    run_dir = out / "demo" / "seed0"
    # A run stopped after epoch 1 of 2 (simulated by training 1 epoch into the pair's folder).
    first = tiny_train_opts(tiny_synthetic_root, run_dir, **{"SOLVER.MAX_EPOCHS": 1, "SOLVER.EVAL_PERIOD": 2})
    assert main(["train", "--config", str(ROOT / "configs" / "demo.yml"), *first]) == 0
    opts = tiny_train_opts(tiny_synthetic_root, run_dir, **{"SOLVER.MAX_EPOCHS": 2, "SOLVER.EVAL_PERIOD": 2})
    opts = opts[:-2]  # OUTPUT_DIR is the ablation's own
    row = ab.train_once(str(ROOT / "configs" / "demo.yml"), "demo", 0, out, opts)
    assert row["resumed"] is True and 0 <= row["mAP"] <= 1
    # the row is stamped with the recipe the run saved, which is the one asked for
    assert row["recipe"] == ab.recipe_id(str(ROOT / "configs" / "demo.yml"), "demo", opts)
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "train"]
    assert epochs == [1, 2]
    assert "| demo | 1 |" in ab.table([row]) and ab.table([row]).rstrip().endswith("| ? |")


def test_ablation_reuses_a_result_only_for_the_same_recipe(tmp_path):
    ab = _ablation()
    demo = str(ROOT / "configs" / "demo.yml")
    edited = tmp_path / "demo.yml"
    # demo.yml changed in a key BOT restates: `bot` keeps its results, `demo` must rerun.
    import yaml

    data = yaml.safe_load((ROOT / "configs" / "demo.yml").read_text())
    data["MODEL"]["CLASSIFIER_INIT_STD"] = 0.005
    edited.write_text(yaml.safe_dump(data))
    assert ab.recipe_id(str(edited), "bot", []) == ab.recipe_id(demo, "bot", [])
    assert ab.recipe_id(str(edited), "demo", []) != ab.recipe_id(demo, "demo", [])
    assert ab.recipe_id(demo, "bot", []) != ab.recipe_id(demo, "fastreid", [])
    assert ab.recipe_id(demo, "bot", ["SOLVER.MAX_EPOCHS", "2"]) != ab.recipe_id(demo, "bot", [])


def test_ablation_table_groups_rows_by_recipe():
    ab = _ablation()
    # `demo` equal in recipe to `fastreid+bicubic` shares its rows; `bot` a different recipe.
    recipes = {"bot": "r-bot", "fastreid+bicubic": "r-fb", "demo": "r-fb"}
    rows = [{"variant": "fastreid+bicubic", "seed": 0, "mAP": 0.80, "rank1": 0.90, "wall_s": 50.0, "recipe": "r-fb"},
            {"variant": "demo", "seed": 1, "mAP": 0.82, "rank1": 0.92, "wall_s": 70.0, "recipe": "r-fb"},
            {"variant": "bot", "seed": 0, "mAP": 0.75, "rank1": 0.85, "wall_s": 60.0, "recipe": "r-old"}]
    text = ab.table(rows, recipes)
    assert "| demo | 2 | 81.0 ± 1.4 | 91.0 ± 1.4 | 80.0..82.0 | 60 |" in text
    assert "| fastreid+bicubic | 2 | 81.0 ± 1.4 |" in text
    assert "| bot |" not in text  # its only row is of a stale recipe
    assert "| fastreid |" not in text  # not in `recipes`


def test_demo_bot_is_the_ablations_paper_recipe_and_demo_its_best_variant():
    ab = _ablation()
    demo = str(ROOT / "configs" / "demo.yml")
    assert ab.recipe_id(str(ROOT / "configs" / "demo_bot.yml"), "demo", []) == ab.recipe_id(demo, "bot", [])
    # demo.yml is that variant evaluated once, after the last epoch (what it trains is the same)
    assert ab.recipe_id(demo, "demo", ["SOLVER.EVAL_PERIOD", "8"]) == ab.recipe_id(demo, "fastreid+bicubic+flip_test", [])
    assert load_config(demo, []).SOLVER.EVAL_PERIOD == 16
    bot = load_config(str(ROOT / "configs" / "demo_bot.yml"), [])
    assert (bot.MODEL.METRIC_LOSS_TYPE, bot.MODEL.IF_WITH_CENTER) == ("triplet_center", "yes")


def test_demo_walltime_benchmark_runs_both_recipes(tiny_synthetic_root, tmp_path):
    spec = importlib.util.spec_from_file_location("demo_walltime", ROOT / "benchmarks" / "demo_walltime.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    opts = tiny_train_opts(tiny_synthetic_root, tmp_path / "unused")[:-2]  # OUTPUT_DIR is its own
    # the recipes' own losses and test flip stay; only size, data and device are the tiny ones
    opts = [x for k, v in zip(opts[::2], opts[1::2])
            if k not in ("MODEL.IF_WITH_CENTER", "MODEL.METRIC_LOSS_TYPE") for x in (k, v)]
    out = tmp_path / "w.json"
    assert mod.main(["--rounds", "1", "--json", str(out), *opts]) == 0
    res = json.loads(out.read_text())
    paper, demo = res["recipes"].values()
    assert len(paper["epoch_s"]) == len(demo["epoch_s"]) == 1
    cfg = load_config(str(ROOT / "configs" / "demo.yml"), [])
    assert mod.evaluations(cfg) == 1 and mod.evaluations(load_config(str(ROOT / "configs" / "demo_bot.yml"), [])) == 2
    assert res["ratio_train"] == pytest.approx(demo["projected_train_s"] / paper["projected_train_s"])
    # `make demo` evaluates once more (its test step): one more median evaluation on each side
    for r in (paper, demo):
        assert r["projected_make_demo_s"] == pytest.approx(r["projected_train_s"] + r["median_eval_s"])
    assert res["ratio_make_demo"] == pytest.approx(demo["projected_make_demo_s"] / paper["projected_make_demo_s"])
