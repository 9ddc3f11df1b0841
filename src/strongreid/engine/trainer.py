"""The training loop: plain PyTorch, one epoch at a time, in one process or under torchrun.

Order of one iteration (as reid-strong-baseline): forward, loss, backward, model optimizer step;
with center loss, the center gradients are rescaled by 1/weight and the centers take their own
SGD step. The LR scheduler steps once per epoch, after it (epoch e trains with t = e - 1).
Under torchrun (docs/distributed.md) SOLVER.IMS_PER_BATCH is the global batch, the model is
wrapped in DDP, and the logged losses are the means over all ranks.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from yacs.config import CfgNode

from strongreid.config import save_config
from strongreid.config.loader import dump_config
from strongreid.engine import distributed as D
from strongreid.engine.averaging import WeightAveraging, save_averaged
from strongreid.engine.checkpoint import load_checkpoint, save_checkpoint
from strongreid.engine.inference import evaluate_model, format_table, write_results
from strongreid.engine.runtime import (
    amp_dtype,
    autocast,
    rng_state,
    seed_everything,
    select_device,
    set_rng_state,
    setup_logging,
    use_channels_last,
)
from strongreid.errors import CheckpointError, ConfigError, StrongReIDError
from strongreid.modeling.outputs import ModelOutput
from strongreid.solver.optimizer import step_center

logger = logging.getLogger("strongreid")


class TrainingDiverged(StrongReIDError):
    """The loss became NaN or infinite."""


def scale_lr(cfg: CfgNode) -> CfgNode:
    """The config the optimisers are built from: with SOLVER.SCALE_LR, BASE_LR and CENTER_LR
    times IMS_PER_BATCH / LR_REFERENCE_BATCH (the linear scaling rule); else `cfg` itself.

    CENTER_LR scales too: a center moves by 2 lr K / B of its class's offset per step, so with a
    larger batch it would otherwise trail the features it tracks.
    """
    s = cfg.SOLVER
    if not s.SCALE_LR:
        return cfg
    if s.LR_REFERENCE_BATCH < 1:
        raise ConfigError(f"SOLVER.LR_REFERENCE_BATCH = {s.LR_REFERENCE_BATCH} must be >= 1 with SOLVER.SCALE_LR True")
    factor = s.IMS_PER_BATCH / s.LR_REFERENCE_BATCH
    scaled = cfg.clone()
    scaled.defrost()
    scaled.SOLVER.BASE_LR = s.BASE_LR * factor
    scaled.SOLVER.CENTER_LR = s.CENTER_LR * factor
    scaled.freeze()
    logger.info(
        "SOLVER.SCALE_LR: x%g (IMS_PER_BATCH %d / LR_REFERENCE_BATCH %d): BASE_LR %.3g -> %.3g, "
        "CENTER_LR %.3g -> %.3g", factor, s.IMS_PER_BATCH, s.LR_REFERENCE_BATCH, s.BASE_LR,
        scaled.SOLVER.BASE_LR, s.CENTER_LR, scaled.SOLVER.CENTER_LR,
    )
    return scaled


def evaluates_after(cfg: CfgNode, epoch: int) -> bool:
    """Whether `fit` evaluates after this epoch: every SOLVER.EVAL_PERIOD epochs and after the last."""
    return epoch % cfg.SOLVER.EVAL_PERIOD == 0 or epoch == cfg.SOLVER.MAX_EPOCHS


class Trainer:
    """Holds everything one run needs; `fit()` trains, evaluates and checkpoints.

    `resume`: True continues from OUTPUT_DIR/last.pt; "auto" does so when every rank sees that
    file (the torchrun restart path) and starts afresh when none does.
    """

    def __init__(self, cfg: CfgNode, resume: bool | str = False) -> None:
        from strongreid.data import build_train_loader
        from strongreid.data.integrity import check_splits
        from strongreid.data.splits import load_splits
        from strongreid.losses import build_loss
        from strongreid.modeling import build_model
        from strongreid.solver import (
            build_iteration_lr,
            build_scheduler,
            make_center_optimizer,
            make_optimizer,
        )

        self.cfg = cfg
        self.device = select_device(cfg)
        self.dist = D.init_distributed(self.device)
        # Before anything heavy: the global batch must split into whole identities per rank.
        D.local_batch_size(cfg, self.dist.world_size)
        self.out_dir = Path(cfg.OUTPUT_DIR)
        if resume == "auto":
            resume = self._agree_on_resume()
        if not resume and (self.out_dir / "last.pt").exists():
            raise ConfigError(
                f"OUTPUT_DIR {self.out_dir} already holds a run ({self.out_dir / 'last.pt'}): "
                "continue it with --resume, or set another OUTPUT_DIR. Nothing was overwritten."
            )
        setup_logging(self.out_dir, self.dist.rank)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        # Same seed on every rank: identical initial weights; the sampler shards the data.
        seed_everything(cfg.SOLVER.SEED, cfg.SOLVER.DETERMINISTIC)

        self.splits = load_splits(cfg)
        self.num_classes = self.splits.num_classes
        # Every unreadable image named before anything trains (data/integrity.py).
        unreadable = check_splits(cfg, self.splits, write_list=self.dist.is_main)
        self.loader = build_train_loader(cfg, self.splits.train, rank=self.dist.rank,
                                         world_size=self.dist.world_size, device=self.device,
                                         known_corrupt=unreadable)
        model = build_model(cfg, self.num_classes)
        self.sync_bn = D.world_switch(cfg.MODEL.SYNC_BN, self.dist.world_size)
        if self.sync_bn:
            model = D.convert_sync_batchnorm(model, self.device)
        self.channels_last = use_channels_last(cfg.MODEL.CHANNELS_LAST, self.device)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.amp_dtype = amp_dtype(cfg.MODEL.AMP, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.loss_fn = build_loss(cfg, self.num_classes, model.feat_dim).to(self.device)
        self.triplet_gather = (D.world_switch(cfg.SOLVER.TRIPLET_GATHER, self.dist.world_size)
                               and len(self.loss_fn.metrics) > 0)
        solver_cfg = scale_lr(cfg)
        self.optimizer = make_optimizer(solver_cfg, model)
        self.center_optimizer = (
            make_center_optimizer(solver_cfg, self.loss_fn.center) if self.loss_fn.center is not None else None
        )
        self.scheduler = build_scheduler(solver_cfg, self.optimizer)
        self.averaging = WeightAveraging(cfg)  # SOLVER.WA (engine/averaging.py)
        # SOLVER.LR_STEP_UNIT 'iter'/'warmup' (issue 14): the lr also moves within the epoch.
        self.iter_lr = build_iteration_lr(cfg, self.scheduler, len(self.loader))
        self.start_epoch = 0
        self.best_map = -1.0
        self.last_eval: dict[str, Any] | None = None
        if resume:
            self._resume(self.out_dir / "last.pt")
        self.train_model: nn.Module = model
        if self.dist.enabled:
            # A triplet-only loss leaves the classifier unused, which DDP must be told.
            self.train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.loss_fn.id_loss is None, **_no_forward_buffer_sync(),
            )
        if cfg.MODEL.COMPILE:
            self.train_model = torch.compile(self.train_model)
        self.tb = None
        if self.dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out_dir / "tb"))
            except ImportError:  # tensorboard is a dependency, but training must not need it
                logger.warning("tensorboard is not installed: no TensorBoard logs")
        logger.info(
            "training %s on %s: %d images, %d ids, %d iterations/epoch, device %s, amp %s, channels_last %s, world %d",
            cfg.MODEL.NAME, "+".join(self.splits.train_names), len(self.splits.train), self.num_classes,
            len(self.loader), self.device, self.amp_dtype, self.channels_last, self.dist.world_size,
        )
        if self.dist.enabled:
            logger.info("distributed: %d ranks x %d images (global batch %d), SyncBN %s (MODEL.SYNC_BN %s), "
                        "triplet over %s (SOLVER.TRIPLET_GATHER %s)",
                        self.dist.world_size, D.local_batch_size(cfg, self.dist.world_size),
                        cfg.SOLVER.IMS_PER_BATCH, "on" if self.sync_bn else "off", cfg.MODEL.SYNC_BN,
                        "all ranks" if self.triplet_gather else "each rank's batch", cfg.SOLVER.TRIPLET_GATHER)

    def _agree_on_resume(self) -> bool:
        """Resume when every rank sees last.pt, start afresh when none does; anything else means
        OUTPUT_DIR is not shared by all nodes, and the ranks would silently diverge."""
        seen = D.count_true((self.out_dir / "last.pt").is_file())
        if 0 < seen < self.dist.world_size:
            raise CheckpointError(
                f"{self.out_dir / 'last.pt'} is visible to {seen} of {self.dist.world_size} processes: "
                "OUTPUT_DIR must be on a filesystem that every node shares for torchrun restarts to resume"
            )
        return seen > 0

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self, epoch: int) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "best_map": self.best_map,
            "rng": rng_state(),
            "config": dump_config(self.cfg),
            "num_classes": self.num_classes,
            "arch": self.cfg.MODEL.NAME,
            "scaler": self.scaler.state_dict(),
        }
        if self.loss_fn.center is not None:
            state["center"] = self.loss_fn.center.state_dict()
            state["center_optimizer"] = self.center_optimizer.state_dict()
        if self.last_eval is not None:
            state["metrics"] = self.last_eval
        state.update(self.averaging.state_dict())
        return state

    def _resume(self, path: Path) -> None:
        if not path.is_file():
            raise CheckpointError(f"--resume: {path} does not exist; train without --resume first "
                                  "(or point OUTPUT_DIR at the run to continue)")
        ckpt = load_checkpoint(path, map_location=self.device)
        if ckpt.get("arch") != self.cfg.MODEL.NAME or ckpt.get("num_classes") != self.num_classes:
            raise CheckpointError(
                f"--resume: {path} is a {ckpt.get('arch')} with {ckpt.get('num_classes')} classes, but "
                f"this config builds a {self.cfg.MODEL.NAME} with {self.num_classes} classes"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.loss_fn.center is not None:
            if "center" not in ckpt:
                raise CheckpointError(f"--resume: {path} has no center-loss state but the config uses center loss")
            self.loss_fn.center.load_state_dict(ckpt["center"])
            self.center_optimizer.load_state_dict(ckpt["center_optimizer"])
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.averaging.load_state_dict(ckpt, self.model)
        self.start_epoch = int(ckpt["epoch"])
        self.best_map = float(ckpt.get("best_map", -1.0))
        self.last_eval = ckpt.get("metrics")
        set_rng_state(ckpt["rng"])
        self._trim_metrics(self.start_epoch)
        logger.info("resumed from %s at the end of epoch %d", path, self.start_epoch)

    def _trim_metrics(self, epoch: int) -> None:
        """Drop metrics.jsonl rows of epochs after the checkpoint (and a line cut short by a
        kill): the resumed run writes them again, once."""
        path = self.out_dir / "metrics.jsonl"
        if not self.dist.is_main or not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line).get("epoch", 0)) <= epoch:
                    kept.append(line)
            except (ValueError, TypeError, AttributeError):
                continue
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)

    def _sync_buffers(self) -> None:
        # SyncBN keeps the running statistics equal on every rank (and averaging equal values
        # over 3 ranks could round); without it each rank only saw its own images.
        if self.dist.enabled and not self.sync_bn:
            D.average_buffers_(self.model)

    def _save(self, epoch: int, evaluated: bool) -> None:
        if not self.dist.is_main:
            return
        state = self.state_dict(epoch)
        save_checkpoint(state, self.out_dir / "last.pt")
        if epoch % self.cfg.SOLVER.CHECKPOINT_PERIOD == 0:
            save_checkpoint(state, self.out_dir / f"{self._prefix()}_epoch{epoch}.pt")
        if evaluated and self.last_eval and self.last_eval["mAP"] >= self.best_map:
            self.best_map = self.last_eval["mAP"]
            state["best_map"] = self.best_map
            save_checkpoint(state, self.out_dir / "best.pt")
            # last.pt must know the best mAP too, so a resumed run keeps choosing best.pt right.
            save_checkpoint(state, self.out_dir / "last.pt")

    def _finish_averaging(self, epoch: int) -> None:
        """BN statistics of the averaged model, its validation, OUTPUT_DIR/averaged.pt."""
        module = self.averaging.finalize(self.loader, self.device)
        D.average_buffers_(module)  # each rank recomputed BN on its own shard
        evaluated = evaluate_model(self.cfg, module, self.splits.query, self.splits.gallery, self.device)
        state = self.state_dict(epoch)
        if evaluated is not None:
            res = evaluated["results"]["plain"].to_dict()
            state["metrics"] = {k: res[k] for k in ("mAP", "mINP", "rank1", "rank5", "rank10") if k in res}
            self._log("averaged weights (SOLVER.WA):\n" + format_table("averaged", res))
            self._append_metrics({"type": "eval_averaged", "epoch": epoch, **state["metrics"]})
        if self.dist.is_main:
            save_averaged(self.out_dir / "averaged.pt", state, module)
        D.barrier()

    def _prefix(self) -> str:
        return self.cfg.MODEL.NAME.replace(":", "_").replace("/", "_")

    # -- training --------------------------------------------------------------------------------
    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        self.train_model.train()
        sampler = getattr(self.loader, "batch_sampler", None)
        for obj in (getattr(self.loader, "sampler", None), sampler):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        if hasattr(self.loader.dataset, "set_epoch"):
            self.loader.dataset.set_epoch(epoch)
        n_iter = len(self.loader)
        # The head's lr (SOLVER.BACKBONE_LR_FACTOR / FREEZE_BACKBONE_EPOCHS change the backbone's).
        groups = self.optimizer.param_groups
        lr = next((g["lr"] for g in groups if not g.get("backbone")), groups[0]["lr"])
        sums: dict[str, float] = {}
        count = 0
        images_seen = 0
        t_start = time.perf_counter()
        t_data = 0.0
        bar = None
        if self.dist.is_main and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=n_iter, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
        end = time.perf_counter()
        for it, (images, pids, _camids, _paths) in enumerate(self.loader, start=1):
            t_data += time.perf_counter() - end
            images = images.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = pids.to(self.device, non_blocking=True)
            if self.iter_lr is not None:
                lr = self.iter_lr(epoch - 1, it - 1)
            self.optimizer.zero_grad(set_to_none=True)
            if self.center_optimizer is not None:
                self.center_optimizer.zero_grad(set_to_none=True)
            with autocast(self.device, self.amp_dtype):
                outputs = self.train_model(images)
            # Losses in fp32: the triplet distances and center terms lose too much in bf16.
            terms, loss = self._losses(outputs.float(), targets)
            with torch.no_grad():
                acc = (outputs.class_scores().argmax(1) == targets).float().mean()
                # One small collective per step: the logged numbers are means over all ranks, and
                # a NaN on any rank stops every rank here (not in a collective that never returns).
                values = D.all_reduce_mean_(torch.stack([v.detach().float() for v in terms.values()] + [acc]))
            logged = dict(zip([*terms, "acc"], values.tolist()))
            if not math.isfinite(logged["total"]):
                raise TrainingDiverged(
                    f"the loss became {logged['total']} at epoch {epoch}, iteration {it} (terms: "
                    + ", ".join(f"{k}={v:.4g}" for k, v in logged.items() if k not in ("total", "acc"))
                    + f"). Training stopped; the last good checkpoint is {self.out_dir / 'last.pt'} "
                    "(resume with --resume). Lower SOLVER.BASE_LR or set MODEL.AMP 'off'."
                )
            self.scaler.scale(loss).backward()
            if cfg.SOLVER.GRAD_CLIP > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.SOLVER.GRAD_CLIP)
            self.scaler.step(self.optimizer)
            if self.center_optimizer is not None:
                # Before scaler.update(): the center step unscales with this iteration's scale.
                self._center_step()
            self.scaler.update()
            for k, v in logged.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            images_seen += images.shape[0] * self.dist.world_size
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sums['total'] / count:.3f}", acc=f"{sums['acc'] / count:.3f}")
            if it % cfg.SOLVER.LOG_PERIOD == 0 or it == n_iter:
                now = time.perf_counter()
                ips = images_seen / max(now - t_start, 1e-9)
                eta = (now - t_start) / it * (n_iter - it + (cfg.SOLVER.MAX_EPOCHS - epoch) * n_iter)
                msg = ", ".join(f"{k} {v / count:.3f}" for k, v in sums.items())
                self._log(f"epoch {epoch} iter {it}/{n_iter}: {msg}, lr {lr:.2e}, "
                          f"{ips:.1f} img/s, data wait {100 * t_data / max(now - t_start, 1e-9):.0f}%, "
                          f"eta {_fmt_time(eta)}")
                if self.tb is not None:
                    step = (epoch - 1) * n_iter + it
                    for k, v in logged.items():
                        self.tb.add_scalar("train/acc" if k == "acc" else f"train/loss_{k}", v, step)
                    self.tb.add_scalar("train/lr", lr, step)
                    self.tb.add_scalar("train/images_per_s", ips, step)
            end = time.perf_counter()
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t_start
        stats = {("loss" if k == "total" else ("acc" if k == "acc" else f"loss_{k}")): v / max(count, 1)
                 for k, v in sums.items()}
        stats.update({"lr": lr, "images_per_s": images_seen / max(elapsed, 1e-9), "time": elapsed,
                      "data_wait": t_data / max(elapsed, 1e-9)})
        return stats

    def _losses(self, outputs: ModelOutput,
                targets: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The weighted loss terms (what is logged) and the loss to back-propagate.

        They differ only with SOLVER.TRIPLET_GATHER under torchrun: the triplet term (and every
        other metric term) is mined over the global batch (every rank computes the same value),
        but the gathered features carry
        gradient only to this rank's slice, and DDP averages gradients over the W ranks, so the
        term is back-propagated W times over to give the single-process gradient. The ID and
        center terms stay per-rank means, whose DDP average is the global mean.
        """
        lf = self.loss_fn
        if not self.triplet_gather:
            terms = lf(outputs, targets)
            return terms, terms["total"]
        gathered = (D.all_gather_with_grad(outputs.features), D.all_gather_with_grad(targets))
        terms = lf(outputs, targets, gathered=gathered)
        pair_total = torch.stack([terms[k] for k in lf.metrics]).sum()
        return terms, terms["total"] + (self.dist.world_size - 1) * pair_total

    def _center_step(self) -> None:
        center = self.loss_fn.center
        if self.dist.enabled:
            # The centers are outside DDP: average their gradients like any other parameter.
            for p in center.parameters():
                if p.grad is not None:
                    D.all_reduce_mean_(p.grad)
        step_center(self.center_optimizer, center, self.loss_fn.center_weight, scaler=self.scaler)

    def _log(self, msg: str) -> None:
        if self.dist.is_main:
            logger.info(msg)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _validate(self, epoch: int) -> None:
        """DATASETS.VALIDATION: loss and top-1 error of the held-out images, on rank 0."""
        if not self.splits.val or not self.dist.is_main:
            return
        from strongreid.data import build_test_loader
        from strongreid.engine.validation import validation_metrics

        if not hasattr(self, "_val_loader"):
            self._val_loader = build_test_loader(self.cfg, self.splits.val)
        val = validation_metrics(self.model, self._val_loader, self.device, self.amp_dtype)
        self._log(f"epoch {epoch} validation: loss {val['val_loss']:.4f}, top-1 error "
                  f"{100 * val['val_error']:.2f}% ({val['val_images']} images)")
        self._append_metrics({"type": "val", "epoch": epoch, **val})
        if self.tb is not None:
            self.tb.add_scalar("val/loss", val["val_loss"], epoch)
            self.tb.add_scalar("val/error", val["val_error"], epoch)

    def evaluate(self, epoch: int) -> dict[str, Any] | None:
        evaluated = evaluate_model(self.cfg, self.model, self.splits.query, self.splits.gallery, self.device,
                                   multi_query=self.splits.multi_query)
        if evaluated is None:
            return None
        res = evaluated["results"]["plain"].to_dict()
        self.last_eval = {k: res[k] for k in ("mAP", "mINP", "rank1", "rank5", "rank10") if k in res}
        self.last_eval["epoch"] = epoch
        self._log(f"validation at epoch {epoch}:\n" + format_table("plain", res))
        record = {"type": "eval", "epoch": epoch, **{k: v for k, v in self.last_eval.items() if k != "epoch"}}
        if "reranked" in evaluated["results"]:
            rr = evaluated["results"]["reranked"].to_dict()
            self._log(format_table("re-ranked", rr))
            record.update({f"reranked_{k}": rr[k] for k in ("mAP", "mINP", "rank1")})
        self._append_metrics(record)
        if self.tb is not None:
            for k in ("mAP", "mINP", "rank1", "rank5", "rank10"):
                if k in res:
                    self.tb.add_scalar(f"eval/{k}", res[k], epoch)
        return evaluated

    def fit(self) -> dict[str, Any] | None:
        cfg = self.cfg
        max_epochs = cfg.SOLVER.MAX_EPOCHS
        final: dict[str, Any] | None = None
        evaluated = None
        t0 = time.perf_counter()
        for epoch in range(self.start_epoch + 1, max_epochs + 1):
            stats = self.train_one_epoch(epoch)
            self.scheduler.step()
            self._sync_buffers()
            self.averaging.update(epoch, self.model)
            self._append_metrics({"type": "train", "epoch": epoch, **stats})
            self._log(f"epoch {epoch} done in {stats['time']:.1f} s ({stats['images_per_s']:.1f} img/s)")
            self._validate(epoch)
            evaluated = self.evaluate(epoch) if evaluates_after(cfg, epoch) else None
            self._save(epoch, evaluated is not None)
            D.barrier()
        if self.averaging.averaged is not None and self.start_epoch < max_epochs:
            self._finish_averaging(max_epochs)
        if self.start_epoch >= max_epochs:
            logger.info("nothing to train: the checkpoint is already at epoch %d", self.start_epoch)
        elif evaluated is not None and self.dist.is_main:
            summary = write_results(cfg, self.out_dir, evaluated, self.splits.query, self.splits.gallery,
                                    {"epoch": max_epochs, "dataset": self.splits.test_name,
                                     "train_time_s": time.perf_counter() - t0,
                                     "weights": str(self.out_dir / "last.pt")})
            final = summary
            logger.info("final results written to %s", self.out_dir / "results.json")
        if self.tb is not None:
            self.tb.close()
        return final


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP keyword that stops rank 0's buffers being broadcast before every forward: with SyncBN
    they agree anyway, without it they are averaged at the end of each epoch (_sync_buffers).
    Newer torch names it forward_sync_buffers (and warns about the old broadcast_buffers)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def train(cfg: CfgNode, resume: bool | str = False) -> dict[str, Any] | None:
    try:
        return Trainer(cfg, resume=resume).fit()
    finally:
        D.cleanup()


def train_command(cfg: CfgNode, resume: bool = False) -> int:
    """`strongreid train`; when torchrun restarts the workers, they resume from last.pt by themselves."""
    if not resume and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        resume = "auto"
    final = train(cfg, resume=resume)
    if final is not None:
        print(format_table("final", final))
    return 0
