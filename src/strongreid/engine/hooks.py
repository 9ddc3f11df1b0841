"""What happens around the training loop, as hooks: logging, progress bar, TensorBoard,
metrics.jsonl, checkpoints, weight averaging, validation and the NaN guard.

The trainer (engine/trainer.py) only trains: for every epoch it calls `before_epoch`, then
`before_step` / `after_step` around each iteration, steps the LR scheduler, publishes the
epoch's `{"type": "train"}` row and calls `after_epoch`; `before_train` / `after_train` frame
the run. Each hook reads what it needs from `self.trainer`. A row published with
`trainer.publish(record)` (train, val, eval... rows of metrics.jsonl) reaches every hook's
`write`. A hook that keeps state across a resume returns it from `state_dict` (it is stored in
last.pt) and gets the checkpoint back in `load_state_dict`.

Hooks run in ascending `priority`, ties in registration order. The built-in hooks that measure
(NaN guard 0, weight averaging 10, logging 20, validation 30, evaluation 40) run before a hook
of the default priority 50, the ones that write files (checkpoints 80, metrics.jsonl and
TensorBoard 90) after it: a user's hook sees the epoch's evaluation, and its changes reach the
checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import TYPE_CHECKING, Any

from strongreid.engine import distributed as D
from strongreid.engine.averaging import WeightAveraging, save_averaged
from strongreid.errors import StrongReIDError
from strongreid.modeling.checkpoint import save_checkpoint
from strongreid.paths import atomic_write_text

if TYPE_CHECKING:
    from strongreid.engine.trainer import Trainer

logger = logging.getLogger("strongreid")


class TrainingDiverged(StrongReIDError):
    """The loss became NaN or infinite."""


class HookBase:
    """Does nothing at every point of the loop; subclasses override what they need."""

    priority: int = 50
    trainer: Trainer

    def before_train(self) -> None: ...
    def after_train(self) -> None: ...
    def before_epoch(self) -> None: ...
    def after_epoch(self) -> None: ...
    def before_step(self) -> None: ...
    def after_step(self) -> None: ...

    def write(self, record: dict[str, Any]) -> None:
        """A metrics row was published (`{"type": "train" | "val" | "eval" | ..., "epoch": ...}`)."""

    def state_dict(self) -> dict[str, Any]:
        """Entries this hook adds to every checkpoint."""
        return {}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """The checkpoint a resumed run starts from."""


class NaNGuard(HookBase):
    """Stops the run when the loss is not finite, naming the terms and the last good checkpoint.

    The logged values are means over all ranks, so every rank stops at the same iteration."""

    priority = 0

    def after_step(self) -> None:
        t = self.trainer
        values = t.step_values
        if math.isfinite(values["total"]):
            return
        raise TrainingDiverged(
            f"the loss became {values['total']} at epoch {t.epoch}, iteration {t.iter} (terms: "
            + ", ".join(f"{k}={v:.4g}" for k, v in values.items() if k not in ("total", "acc"))
            + f"). Training stopped; the last good checkpoint is {t.out_dir / 'last.pt'} "
            "(resume with --resume). Lower SOLVER.BASE_LR or set MODEL.AMP 'off'."
        )


class WeightAveragingHook(HookBase):
    """SOLVER.WA: updates the averaged model after each epoch (engine/averaging.py); at the end,
    recomputes its BN statistics and leaves it in `trainer.averaged_model` for evaluation and
    the checkpoint hook's averaged.pt."""

    priority = 10

    def __init__(self, averaging: WeightAveraging) -> None:
        self.averaging = averaging

    def after_epoch(self) -> None:
        self.averaging.update(self.trainer.epoch, self.trainer.model)

    def after_train(self) -> None:
        module = self.averaging.finalize(self.trainer.loader, self.trainer.device)
        if module is not None:
            D.average_buffers_(module)  # each rank recomputed BN on its own shard
            self.trainer.averaged_model = module

    def state_dict(self) -> dict[str, Any]:
        return self.averaging.state_dict()

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.averaging.load_state_dict(ckpt, self.trainer.model)


class ProgressLogger(HookBase):
    """The running means every SOLVER.LOG_PERIOD iterations (log.txt), a progress bar on a
    terminal, and one line per epoch; rank 0 only."""

    priority = 20

    def __init__(self) -> None:
        self.bar = None

    def before_epoch(self) -> None:
        t = self.trainer
        if self.bar is not None:
            self.bar.close()
        self.bar = None
        if t.dist.is_main and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=t.iters_per_epoch, desc=f"epoch {t.epoch}", leave=False, dynamic_ncols=True)

    def after_step(self) -> None:
        t, meter = self.trainer, self.trainer.meter
        if self.bar is not None:
            means = meter.means()
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{means['total']:.3f}", acc=f"{means['acc']:.3f}")
        if not (t.log_step() and t.dist.is_main):
            return
        elapsed = meter.elapsed()
        n_iter, it = t.iters_per_epoch, t.iter
        eta = elapsed / it * (n_iter - it + (t.cfg.SOLVER.MAX_EPOCHS - t.epoch) * n_iter)
        msg = ", ".join(f"{k} {v:.3f}" for k, v in meter.means().items())
        logger.info(f"epoch {t.epoch} iter {it}/{n_iter}: {msg}, lr {t.lr:.2e}, "
                    f"{meter.images_per_s():.1f} img/s, data wait {100 * meter.data_wait():.0f}%, "
                    f"eta {_fmt_time(eta)}")

    def after_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        stats = self.trainer.epoch_stats
        if self.trainer.dist.is_main:
            logger.info(f"epoch {self.trainer.epoch} done in {stats['time']:.1f} s "
                        f"({stats['images_per_s']:.1f} img/s)")


class ValidationHook(HookBase):
    """DATASETS.VALIDATION: loss and top-1 error of the held-out images after each epoch, on rank 0."""

    priority = 30

    def __init__(self) -> None:
        self.loader = None

    def after_epoch(self) -> None:
        t = self.trainer
        if not t.splits.val or not t.dist.is_main:
            return
        from strongreid.data import build_test_loader
        from strongreid.engine.validation import validation_metrics

        if self.loader is None:
            self.loader = build_test_loader(t.cfg, t.splits.val)
        val = validation_metrics(t.model, self.loader, t.device, t.amp_dtype)
        logger.info(f"epoch {t.epoch} validation: loss {val['val_loss']:.4f}, top-1 error "
                    f"{100 * val['val_error']:.2f}% ({val['val_images']} images)")
        t.publish({"type": "val", "epoch": t.epoch, **val})


class CheckpointHook(HookBase):
    """last.pt after every epoch, <MODEL.NAME>_epoch<N>.pt every SOLVER.CHECKPOINT_PERIOD epochs,
    best.pt when the epoch's evaluation has the best mAP so far, averaged.pt at the end with
    SOLVER.WA; all written atomically by rank 0."""

    priority = 80

    def __init__(self) -> None:
        self.best_map = -1.0

    def after_epoch(self) -> None:
        t = self.trainer
        if t.dist.is_main:
            self._save(t.epoch, t.eval_result)

    def _save(self, epoch: int, evaluated: dict[str, Any] | None) -> None:
        out = self.trainer.out_dir
        state = self.trainer.state_dict(epoch)
        save_checkpoint(state, out / "last.pt")
        if epoch % self.trainer.cfg.SOLVER.CHECKPOINT_PERIOD == 0:
            prefix = self.trainer.cfg.MODEL.NAME.replace(":", "_").replace("/", "_")
            save_checkpoint(state, out / f"{prefix}_epoch{epoch}.pt")
        if evaluated and evaluated["mAP"] >= self.best_map:
            self.best_map = evaluated["mAP"]
            state["best_map"] = self.best_map
            save_checkpoint(state, out / "best.pt")
            # last.pt must know the best mAP too, so a resumed run keeps choosing best.pt right.
            save_checkpoint(state, out / "last.pt")

    def after_train(self) -> None:
        t = self.trainer
        if t.averaged_model is None:
            return
        if t.dist.is_main:
            state = t.state_dict(t.epoch)
            if t.averaged_metrics is not None:
                state["metrics"] = t.averaged_metrics
            save_averaged(t.out_dir / "averaged.pt", state, t.averaged_model)
        D.barrier()

    def state_dict(self) -> dict[str, Any]:
        return {"best_map": self.best_map}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.best_map = float(ckpt.get("best_map", -1.0))


class MetricsFile(HookBase):
    """OUTPUT_DIR/metrics.jsonl: every published row, one JSON object a line (rank 0)."""

    priority = 90

    def before_train(self) -> None:
        if self.trainer.resumed and self.trainer.dist.is_main:
            self._trim(self.trainer.start_epoch)

    def write(self, record: dict[str, Any]) -> None:
        if not self.trainer.dist.is_main:
            return
        with open(self.trainer.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _trim(self, epoch: int) -> None:
        """Drop the rows of epochs after the checkpoint (and a line cut short by a kill): the
        resumed run writes them again, once."""
        path = self.trainer.out_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line).get("epoch", 0)) <= epoch:
                    kept.append(line)
            except (ValueError, TypeError, AttributeError):
                continue
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))


class TensorBoard(HookBase):
    """OUTPUT_DIR/tb: the step's losses, lr and speed every LOG_PERIOD iterations, validation and
    evaluation per epoch (rank 0)."""

    priority = 90

    def __init__(self) -> None:
        self.writer = None

    def before_train(self) -> None:
        if not self.trainer.dist.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but training must not need it
            logger.warning("tensorboard is not installed: no TensorBoard logs")
            return
        self.writer = SummaryWriter(str(self.trainer.out_dir / "tb"))

    def after_step(self) -> None:
        t = self.trainer
        if self.writer is None or not t.log_step():
            return
        step = (t.epoch - 1) * t.iters_per_epoch + t.iter
        for k, v in t.step_values.items():
            self.writer.add_scalar("train/acc" if k == "acc" else f"train/loss_{k}", v, step)
        self.writer.add_scalar("train/lr", t.lr, step)
        self.writer.add_scalar("train/images_per_s", t.meter.images_per_s(), step)

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        if record["type"] == "val":
            self.writer.add_scalar("val/loss", record["val_loss"], record["epoch"])
            self.writer.add_scalar("val/error", record["val_error"], record["epoch"])
        elif record["type"] == "eval":
            for k in ("mAP", "mINP", "rank1", "rank5", "rank10"):
                if k in record:
                    self.writer.add_scalar(f"eval/{k}", record[k], record["epoch"])

    def after_train(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class EpochMeter:
    """Sums of one epoch's logged values (means over ranks), images and data-loading wait."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.sums: dict[str, float] = {}
        self.count = 0
        self.images = 0
        self.data_time = 0.0
        self.start = time.perf_counter()

    def update(self, values: dict[str, float], batch: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.images += batch * self.world_size

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def images_per_s(self) -> float:
        return self.images / max(self.elapsed(), 1e-9)

    def data_wait(self) -> float:
        return self.data_time / max(self.elapsed(), 1e-9)

    def stats(self, lr: float) -> dict[str, float]:
        """The epoch's metrics.jsonl train row: mean losses (`loss`, `loss_<term>`), acc, lr, speed."""
        elapsed = self.elapsed()
        stats = {("loss" if k == "total" else "acc" if k == "acc" else f"loss_{k}"): v
                 for k, v in self.means().items()}
        stats.update({"lr": lr, "images_per_s": self.images / max(elapsed, 1e-9), "time": elapsed,
                      "data_wait": self.data_time / max(elapsed, 1e-9)})
        return stats


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
