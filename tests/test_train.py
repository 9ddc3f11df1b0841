"""End-to-end training on the CPU: the loss falls, mAP beats chance, resume is exact, NaN stops."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from _train_utils import tiny_train_opts

from strongreid.cli import main
from strongreid.config import load_config
from strongreid.engine.hooks import TrainingDiverged
from strongreid.engine.trainer import Trainer
from strongreid.modeling.checkpoint import read_checkpoint
from strongreid.workflows import build_trainer


def _chance_map(ranking_path, repeats: int = 20) -> float:
    """mAP of random features on the same query/gallery identities."""
    from strongreid.evaluation import evaluate_features

    r = np.load(ranking_path)
    rng = np.random.default_rng(0)
    maps = []
    for _ in range(repeats):
        q = rng.standard_normal((len(r["q_pids"]), 16)).astype(np.float32)
        g = rng.standard_normal((len(r["g_pids"]), 16)).astype(np.float32)
        maps.append(evaluate_features(q, g, r["q_pids"], r["g_pids"], r["q_camids"], r["g_camids"]).mAP)
    return float(np.mean(maps))


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_then_test_through_the_cli(tiny_synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    opts = tiny_train_opts(tiny_synthetic_root, out, **{"SOLVER.MAX_EPOCHS": 6, "SOLVER.EVAL_PERIOD": 3,
                                                               "SOLVER.CHECKPOINT_PERIOD": 6})
    assert main(["train", *opts]) == 0
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "last.pt", "best.pt", "results.json",
                 "ranking.npz", "resnet18_epoch6.pt"):
        assert (out / name).is_file(), name
    # Once the command returns its log file is closed: nothing later writes into this folder.
    handlers = logging.getLogger("strongreid").handlers
    assert not [h for h in handlers if isinstance(h, logging.FileHandler)], handlers
    train_rows = [m for m in _metrics(out) if m["type"] == "train"]
    assert [m["epoch"] for m in train_rows] == [1, 2, 3, 4, 5, 6]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    for term in ("loss_id", "loss_triplet", "loss_center", "acc", "lr", "images_per_s"):
        assert term in train_rows[0]
    results = json.loads((out / "results.json").read_text())
    assert results["mAP"] > 2 * _chance_map(out / "ranking.npz")
    assert 0 <= results["mINP"] <= results["mAP"] <= 1
    assert len(results["cmc"]) >= 10 and results["cmc"][0] == pytest.approx(results["rank1"])

    ckpt = read_checkpoint(out / "last.pt")
    assert {"model", "optimizer", "scheduler", "center", "center_optimizer", "epoch", "rng", "config",
            "num_classes", "arch"} <= set(ckpt)
    assert ckpt["epoch"] == 6 and ckpt["arch"] == "resnet18" and ckpt["num_classes"] == 12

    capsys.readouterr()
    test_out = tmp_path / "test"
    test_opts = tiny_train_opts(tiny_synthetic_root, test_out, **{"TEST.WEIGHT": out / "last.pt"})
    assert main(["test", *test_opts]) == 0
    printed = capsys.readouterr().out
    assert "mAP" in printed and "R1" in printed
    tested = json.loads((test_out / "results.json").read_text())
    assert tested["mAP"] == pytest.approx(results["mAP"], abs=1e-6)

    # `test` into the training run's own folder: the run's record survives beside the new one.
    in_run = tiny_train_opts(tiny_synthetic_root, out, **{"TEST.WEIGHT": out / "last.pt"})
    assert main(["test", *in_run]) == 0
    assert f"is kept as {out / 'results_train.json'}" in capsys.readouterr().out
    assert json.loads((out / "results_train.json").read_text()) == results
    assert "train_time_s" not in json.loads((out / "results.json").read_text())
    assert main(["test", *in_run]) == 0  # a second test keeps the first copy, untouched
    assert "is kept as" not in capsys.readouterr().out
    assert json.loads((out / "results_train.json").read_text()) == results


def test_resume_equals_uninterrupted_run(tiny_synthetic_root, tmp_path):
    straight = tmp_path / "straight"
    build_trainer(load_config(None, tiny_train_opts(tiny_synthetic_root, straight))).fit()

    split = tmp_path / "split"
    build_trainer(load_config(None, tiny_train_opts(tiny_synthetic_root, split, **{"SOLVER.MAX_EPOCHS": 1}))).fit()
    build_trainer(load_config(None, tiny_train_opts(tiny_synthetic_root, split)), resume=True).fit()

    a = read_checkpoint(straight / "last.pt")
    b = read_checkpoint(split / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-6, rtol=0, msg=key)
    torch.testing.assert_close(a["center"]["centers"], b["center"]["centers"], atol=1e-6, rtol=0)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tiny_synthetic_root, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    trainer = Trainer(load_config(None, tiny_train_opts(tiny_synthetic_root, out, **{"SOLVER.MAX_EPOCHS": 3})))
    real_forward = trainer.loss_fn.forward
    calls = {"n": 0}
    per_epoch = len(trainer.loader)

    def poisoned(outputs, targets):
        calls["n"] += 1
        terms = real_forward(outputs, targets)
        if calls["n"] == per_epoch + 2:  # second iteration of epoch 2
            terms["total"] = terms["total"] * float("nan")
        return terms

    monkeypatch.setattr(trainer.loss_fn, "forward", poisoned)
    with pytest.raises(TrainingDiverged) as exc:
        trainer.fit()
    msg = str(exc.value)
    assert "nan" in msg and "epoch 2" in msg and "last.pt" in msg
    ckpt = read_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_cli_reports_divergence_without_traceback(tiny_synthetic_root, tmp_path, capsys):
    out = tmp_path / "lr"
    opts = tiny_train_opts(tiny_synthetic_root, out, **{"SOLVER.BASE_LR": 1e12, "SOLVER.MAX_EPOCHS": 3,
                                                        "MODEL.IF_WITH_CENTER": "no",
                                                        "MODEL.METRIC_LOSS_TYPE": "triplet"})
    rc = main(["train", *opts])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: the loss became") and "Traceback" not in err


def test_resume_without_checkpoint_is_a_clear_error(tiny_synthetic_root, tmp_path, capsys):
    rc = main(["train", "--resume", *tiny_train_opts(tiny_synthetic_root, tmp_path / "none")])
    assert rc == 2
    assert "last.pt does not exist" in capsys.readouterr().err


def test_resume_from_a_damaged_last_pt_names_the_newest_periodic_checkpoint(tiny_synthetic_root,
                                                                           tmp_path, capsys):
    run = tmp_path / "cut"
    run.mkdir()
    (run / "last.pt").write_bytes(b"PK\x03\x04 cut short by a full disk")
    for epoch in (2, 10, 4):
        (run / f"resnet18_epoch{epoch}.pt").write_bytes(b"")
    rc = main(["train", "--resume", *tiny_train_opts(tiny_synthetic_root, run)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.count("error:") == 1
    assert err.startswith("error: --resume: ") and str(run / "last.pt") in err
    assert err.rstrip().endswith(f"The newest periodic checkpoint of this run is "
                                 f"{run / 'resnet18_epoch10.pt'}: copy it over {run / 'last.pt'} "
                                 "to resume from there")


def test_ranking_file_matches_results(tiny_synthetic_root, tmp_path):
    out = tmp_path / "rank"
    build_trainer(load_config(None, tiny_train_opts(tiny_synthetic_root, out, **{"SOLVER.MAX_EPOCHS": 1}))).fit()
    ranking = np.load(out / "ranking.npz")
    results = json.loads((out / "results.json").read_text())
    ap = ranking["ap"]
    assert np.nanmean(ap) == pytest.approx(results["mAP"], abs=1e-6)
    assert ranking["topk_index"].shape[0] == len(ranking["q_paths"])


def test_test_command_rejects_a_checkpoint_of_another_architecture(tiny_synthetic_root, tmp_path, capsys):
    from strongreid.modeling import build_model
    from strongreid.modeling.checkpoint import save_checkpoint

    other = build_model(load_config(None, tiny_train_opts(tiny_synthetic_root, tmp_path, **{"MODEL.NAME": "resnet34"})), 12)
    save_checkpoint({"model": other.state_dict(), "arch": "resnet34", "num_classes": 12}, tmp_path / "r34.pt")
    rc = main(["test", *tiny_train_opts(tiny_synthetic_root, tmp_path / "t", **{"TEST.WEIGHT": tmp_path / "r34.pt"})])
    err = capsys.readouterr().err
    assert rc == 2
    assert "resnet34" in err and "resnet18" in err and "r34.pt" in err and "Traceback" not in err


def test_result_table_says_when_no_query_has_a_match():
    from strongreid.evaluation.runner import format_table

    text = format_table("plain", {"mAP": None, "mINP": None, "cmc": [None] * 10, "num_valid": 0})
    assert "n/a" in text and "0 valid" in text


def test_training_into_a_finished_run_refuses_to_overwrite_it(tiny_synthetic_root, tmp_path, capsys):
    out = tmp_path / "done"
    out.mkdir()
    (out / "last.pt").write_bytes(b"precious")
    rc = main(["train", *tiny_train_opts(tiny_synthetic_root, out)])
    assert rc == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "last.pt").read_bytes() == b"precious"


@pytest.mark.parametrize("broken", [True, False])
def test_training_falls_back_to_fp32_when_autocast_gets_the_features_wrong(tiny_synthetic_root, tmp_path,
                                                                        monkeypatch, broken):
    out = tmp_path / "amp"
    trainer = Trainer(load_config(None, tiny_train_opts(tiny_synthetic_root, out, **{"MODEL.AMP": "bf16"})))
    assert trainer.amp_dtype == torch.bfloat16
    real_forward = trainer.model.forward
    seen = []

    def forward(x, **kwargs):
        out = real_forward(x, **kwargs)
        seen.append((trainer.model.training, torch.is_autocast_enabled("cpu")))
        if broken and not trainer.model.training and torch.is_autocast_enabled("cpu"):
            return torch.zeros_like(out)
        return out

    monkeypatch.setattr(trainer.model, "forward", forward)
    images, pids, camids, _ = next(iter(trainer.loader))
    stats_before = trainer.model.bottleneck.running_mean.clone()
    trainer.run_step(images, pids, camids)
    trainer.run_step(images, pids, camids)
    # The check: one eval forward in fp32 and one under autocast, then the training steps.
    assert seen[:2] == [(False, False), (False, True)]
    assert seen[2:] == [(True, not broken)] * 2
    assert trainer.model.training
    assert ("this run trains in fp32" in (out / "log.txt").read_text()) == broken
    assert trainer.amp_dtype == (None if broken else torch.bfloat16)
    # Only the two training steps moved the batch-norm statistics (momentum 0.1 each).
    assert not torch.equal(trainer.model.bottleneck.running_mean, stats_before)
    assert all(math.isfinite(v) for v in trainer.step_values.values())
