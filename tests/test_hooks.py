"""A user's hook joins a real training run without any edit of the trainer."""

import json

import pytest
from _train_utils import tiny_train_opts

from strongreid.config import load_config
from strongreid.engine.hooks import HookBase
from strongreid.modeling.checkpoint import read_checkpoint
from strongreid.workflows import build_trainer


class StepCounter(HookBase):
    """Counts steps, remembers what it saw, and keeps its count in the checkpoints."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.losses: dict[int, list[float]] = {}
        self.rows: list[str] = []
        self.steps = 0

    def before_train(self) -> None:
        self.events.append(("before_train", self.trainer.start_epoch))

    def before_epoch(self) -> None:
        self.events.append(("before_epoch", self.trainer.epoch))

    def after_step(self) -> None:
        self.steps += 1
        self.losses.setdefault(self.trainer.epoch, []).append(self.trainer.step_values["total"])

    def after_epoch(self) -> None:
        t = self.trainer
        # Priority 50: after the evaluation (40), before the checkpoint is written (80).
        self.events.append(("after_epoch", t.epoch, t.eval_result is not None,
                            (t.out_dir / f"resnet18_epoch{t.epoch}.pt").exists()))

    def after_train(self) -> None:
        self.events.append(("after_train", self.trainer.results is not None))

    def write(self, record: dict) -> None:
        self.rows.append(record["type"])

    def state_dict(self) -> dict:
        return {"toy_steps": self.steps}

    def load_state_dict(self, ckpt: dict) -> None:
        self.steps = ckpt.get("toy_steps", 0)


def test_a_hook_from_the_test_file_sees_every_point_of_a_real_run(tiny_synthetic_root, tmp_path):
    out = tmp_path / "run"
    counter = StepCounter()
    # CHECKPOINT_PERIOD 1: the epoch file exists after every epoch, so the hook can see it is not
    # written yet when it runs.
    cfg = load_config(None, tiny_train_opts(tiny_synthetic_root, out, **{"SOLVER.CHECKPOINT_PERIOD": 1}))
    trainer = build_trainer(cfg, hooks=[counter])
    per_epoch = len(trainer.loader)
    final = trainer.fit()

    assert counter.events == [("before_train", 0),
                              ("before_epoch", 1), ("after_epoch", 1, True, False),
                              ("before_epoch", 2), ("after_epoch", 2, True, False),
                              ("after_train", True)]
    assert counter.steps == 2 * per_epoch
    assert counter.rows == ["train", "eval", "train", "eval"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in (r for r in rows if r["type"] == "train"):
        seen = counter.losses[row["epoch"]]
        assert row["loss"] == pytest.approx(sum(seen) / len(seen), rel=1e-12)
    assert final["mAP"] == json.loads((out / "results.json").read_text())["mAP"]
    assert read_checkpoint(out / "last.pt")["toy_steps"] == 2 * per_epoch

    # A resumed run hands the hook its state back from last.pt.
    resumed = StepCounter()
    cfg = load_config(None, tiny_train_opts(tiny_synthetic_root, out, **{"SOLVER.MAX_EPOCHS": 3}))
    build_trainer(cfg, resume=True, hooks=[resumed]).fit()
    assert resumed.events[0] == ("before_train", 2)
    assert resumed.steps == 3 * per_epoch
    assert read_checkpoint(out / "last.pt")["toy_steps"] == 3 * per_epoch


def test_hooks_run_in_priority_order_whatever_the_registration_order(tiny_synthetic_root, tmp_path):
    class Named(HookBase):
        def __init__(self, name: str, priority: int) -> None:
            self.name, self.priority = name, priority

    cfg = load_config(None, tiny_train_opts(tiny_synthetic_root, tmp_path / "order", **{"SOLVER.MAX_EPOCHS": 1}))
    trainer = build_trainer(cfg, hooks=[Named("late", 95), Named("early", -5), Named("normal", 50)])
    trainer.register_hooks([Named("normal, registered later", 50)])
    names = [getattr(h, "name", type(h).__name__) for h in trainer.hooks]
    assert names == ["early", "NaNGuard", "WeightAveragingHook", "ProgressLogger", "ValidationHook", "EvalHook",
                     "normal", "normal, registered later", "CheckpointHook", "MetricsFile", "TensorBoard", "late"]
