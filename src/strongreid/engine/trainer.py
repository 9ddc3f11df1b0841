"""The training loop: plain PyTorch, one epoch at a time, in one process or under torchrun.

Order of one iteration (as reid-strong-baseline): forward, loss, backward, model optimizer step;
with center loss, the center gradients are rescaled by 1/weight and the centers take their own
SGD step. The LR scheduler steps once per epoch, after it (epoch e trains with t = e - 1).
Under torchrun (docs/distributed.md) SOLVER.IMS_PER_BATCH is the global batch, the model is
wrapped in DDP, and the logged losses are the means over all ranks. Everything else a run does
(logs, metrics.jsonl, TensorBoard, checkpoints, weight averaging, validation, the NaN guard) is
a hook (engine/hooks.py); evaluation on the test split is one too, added by
`strongreid.workflows`.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from yacs.config import CfgNode

from strongreid.config import save_config
from strongreid.config.loader import dump_config
from strongreid.data import build_train_loader
from strongreid.data.integrity import check_splits
from strongreid.data.splits import load_splits
from strongreid.engine import distributed as D
from strongreid.engine import hooks as H
from strongreid.engine.averaging import WeightAveraging
from strongreid.engine.hooks import EpochMeter, HookBase
from strongreid.engine.inference import camera_inputs, tta_forward
from strongreid.engine.runtime import (
    amp_dtype,
    autocast,
    autocast_agrees,
    rng_state,
    seed_everything,
    select_device,
    set_rng_state,
    setup_logging,
    use_channels_last,
)
from strongreid.errors import CheckpointError, ConfigError
from strongreid.losses import build_loss
from strongreid.modeling import build_model
from strongreid.modeling.checkpoint import read_checkpoint
from strongreid.modeling.outputs import Branches, ModelOutput
from strongreid.solver import (
    build_iteration_lr,
    build_scheduler,
    make_center_optimizer,
    make_optimizer,
)
from strongreid.solver.optimizer import step_center

logger = logging.getLogger("strongreid")


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


# Checkpoint entries the trainer itself restores; the rest of a checkpoint belongs to the hooks.
_TRAINER_STATE = ("model", "optimizer", "scheduler", "center", "center_optimizer", "scaler", "rng")


def periodic_checkpoints(run: Path) -> list[Path]:
    """A run's NAME_epochN.pt files (SOLVER.CHECKPOINT_PERIOD), oldest epoch first."""
    found = []
    for path in run.glob("*_epoch*.pt"):
        epoch = path.stem.rpartition("_epoch")[2]
        if epoch.isdigit():
            found.append((int(epoch), path))
    return [path for _, path in sorted(found)]


class Trainer:
    """One run: data, model, loss and optimisers built from the config; `fit()` trains.

    `resume`: True continues from OUTPUT_DIR/last.pt; "auto" does so when every rank sees that
    file (the torchrun restart path) and starts afresh when none does. `hooks` join
    `default_hooks()`; `register_hooks` adds more later (engine/hooks.py says in which order
    they run).

    What hooks read: `cfg`, `model` (the bare module) and `train_model` (DDP / compiled),
    `loader`, `splits`, `device`, `dist`, `out_dir`, `amp_dtype`, `epoch` and `iter` (1-based),
    `iters_per_epoch`, `lr` (the head's), `step_values` (the iteration's weighted loss terms,
    'total' and 'acc', means over ranks), `meter` (the epoch's EpochMeter) and `epoch_stats`
    (its train row). What they leave for each other: `eval_result` (the metrics of this epoch's
    evaluation, None when there was none), `averaged_model` / `averaged_metrics` (SOLVER.WA, at
    the end) and `results` (what `fit` returns).
    """

    def __init__(self, cfg: CfgNode, resume: bool | str = False, hooks: Iterable[HookBase] = ()) -> None:
        self.cfg = cfg
        self.device = select_device(cfg)
        self.dist = D.init_distributed(self.device)
        # Before anything heavy: the global batch must split into whole identities per rank.
        D.local_batch_size(cfg, self.dist.world_size)
        self.out_dir = Path(cfg.OUTPUT_DIR)
        self.resumed = self._agree_on_resume() if resume == "auto" else bool(resume)
        self._prepare_out_dir()
        # Same seed on every rank: identical initial weights; the sampler shards the data.
        seed_everything(cfg.SOLVER.SEED, cfg.SOLVER.DETERMINISTIC)
        self._build_data()
        self._build_model()
        self._build_solver()
        self.start_epoch = self.epoch = self.iter = 0
        self.iters_per_epoch = len(self.loader)
        self.eval_result: dict[str, Any] | None = None
        self.averaged_model: nn.Module | None = None
        self.averaged_metrics: dict[str, Any] | None = None
        self.results: dict[str, Any] | None = None
        self._resume_state: dict[str, Any] | None = None
        if self.resumed:
            self._resume(self.out_dir / "last.pt")
        self._wrap_for_training()
        self.hooks: list[HookBase] = []
        self.register_hooks([*self.default_hooks(), *hooks])
        self._log_setup()

    # -- building --------------------------------------------------------------------------------
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

    def _prepare_out_dir(self) -> None:
        if not self.resumed and (self.out_dir / "last.pt").exists():
            raise ConfigError(
                f"OUTPUT_DIR {self.out_dir} already holds a run ({self.out_dir / 'last.pt'}): "
                "continue it with --resume, or set another OUTPUT_DIR. Nothing was overwritten."
            )
        setup_logging(self.out_dir, self.dist.rank)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out_dir / "config.yaml")

    def _build_data(self) -> None:
        self.splits = load_splits(self.cfg)
        self.num_classes = self.splits.num_classes
        # Every unreadable image named before anything trains (data/integrity.py).
        unreadable = check_splits(self.cfg, self.splits, write_list=self.dist.is_main)
        self.loader = build_train_loader(self.cfg, self.splits.train, rank=self.dist.rank,
                                         world_size=self.dist.world_size, device=self.device,
                                         known_corrupt=unreadable)

    def _build_model(self) -> None:
        cfg = self.cfg
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
        self._autocast_checked = self.amp_dtype is None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _build_solver(self) -> None:
        cfg = self.cfg
        # A multi-branch model's losses see one branch's feature (TransReID), not the test feature.
        loss_dim = getattr(self.model, "loss_feat_dim", self.model.feat_dim)
        self.loss_fn = build_loss(cfg, self.num_classes, loss_dim).to(self.device)
        self.triplet_gather = (D.world_switch(cfg.SOLVER.TRIPLET_GATHER, self.dist.world_size)
                               and len(self.loss_fn.metrics) > 0)
        solver_cfg = scale_lr(cfg)
        self.optimizer = make_optimizer(solver_cfg, self.model)
        center = self.loss_fn.center
        self.center_optimizer = make_center_optimizer(solver_cfg, center) if center is not None else None
        self.scheduler = build_scheduler(solver_cfg, self.optimizer)
        # SOLVER.LR_STEP_UNIT 'iter'/'warmup': the lr also moves within the epoch.
        self.iter_lr = build_iteration_lr(cfg, self.scheduler, len(self.loader))

    def _wrap_for_training(self) -> None:
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            # A triplet-only loss leaves the classifier unused, which DDP must be told.
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.loss_fn.id_loss is None, **_no_forward_buffer_sync(),
            )
        if self.cfg.MODEL.COMPILE:
            self.train_model = torch.compile(self.train_model)

    def _log_setup(self) -> None:
        cfg, world = self.cfg, self.dist.world_size
        logger.info(
            "training %s on %s: %d images, %d ids, %d iterations/epoch, device %s, amp %s, channels_last %s, world %d",
            cfg.MODEL.NAME, "+".join(self.splits.train_names), len(self.splits.train), self.num_classes,
            len(self.loader), self.device, self.amp_dtype, self.channels_last, world,
        )
        if self.dist.enabled:
            logger.info("distributed: %d ranks x %d images (global batch %d), SyncBN %s (MODEL.SYNC_BN %s), "
                        "triplet over %s (SOLVER.TRIPLET_GATHER %s)",
                        world, D.local_batch_size(cfg, world), cfg.SOLVER.IMS_PER_BATCH,
                        "on" if self.sync_bn else "off", cfg.MODEL.SYNC_BN,
                        "all ranks" if self.triplet_gather else "each rank's batch", cfg.SOLVER.TRIPLET_GATHER)

    # -- hooks -----------------------------------------------------------------------------------
    def default_hooks(self) -> list[HookBase]:
        """What every run does besides training (evaluation is added by strongreid.workflows)."""
        return [H.NaNGuard(), H.WeightAveragingHook(WeightAveraging(self.cfg)), H.ProgressLogger(),
                H.ValidationHook(), H.CheckpointHook(), H.MetricsFile(), H.TensorBoard()]

    def register_hooks(self, hooks: Iterable[HookBase]) -> None:
        """Add hooks; a resumed run hands each its part of last.pt."""
        for hook in hooks:
            hook.trainer = self
            if self._resume_state is not None:
                hook.load_state_dict(self._resume_state)
            self.hooks.append(hook)
        self.hooks.sort(key=lambda h: h.priority)  # stable: ties keep their registration order

    def _call(self, event: str) -> None:
        for hook in self.hooks:
            getattr(hook, event)()

    def publish(self, record: dict[str, Any]) -> None:
        """Hand a metrics row to every hook's `write` (metrics.jsonl, TensorBoard...)."""
        for hook in self.hooks:
            hook.write(record)

    def log_step(self) -> bool:
        """Whether this iteration is one the logs report (every SOLVER.LOG_PERIOD, and the last)."""
        return self.iter % self.cfg.SOLVER.LOG_PERIOD == 0 or self.iter == self.iters_per_epoch

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self, epoch: int) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "rng": rng_state(),
            "config": dump_config(self.cfg),
            "num_classes": self.num_classes,
            "arch": self.cfg.MODEL.NAME,
            "scaler": self.scaler.state_dict(),
        }
        if self.loss_fn.center is not None:
            state["center"] = self.loss_fn.center.state_dict()
            state["center_optimizer"] = self.center_optimizer.state_dict()
        for hook in self.hooks:
            state.update(hook.state_dict())
        return state

    def _resume(self, path: Path) -> None:
        if not path.is_file():
            raise CheckpointError(f"--resume: {path} does not exist; train without --resume first "
                                  "(or point OUTPUT_DIR at the run to continue)")
        try:
            ckpt = read_checkpoint(path, map_location=self.device)
        except CheckpointError as exc:
            older = periodic_checkpoints(path.parent)
            if not older:
                raise
            raise CheckpointError(f"--resume: {str(exc).rstrip('.')}. The newest periodic "
                                  f"checkpoint of this run is "
                                  f"{older[-1]}: copy it over {path} to resume from there") from None
        if ckpt.get("arch") != self.cfg.MODEL.NAME or ckpt.get("num_classes") != self.num_classes:
            raise CheckpointError(
                f"--resume: {path} is a {ckpt.get('arch')} with {ckpt.get('num_classes')} classes, but "
                f"this config builds a {self.cfg.MODEL.NAME} with {self.num_classes} classes: resume "
                f"with the run's own settings (--config {path.parent / 'config.yaml'} and the same "
                "datasets), or train into a new OUTPUT_DIR"
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
        self.start_epoch = int(ckpt["epoch"])
        set_rng_state(ckpt["rng"])
        self._resume_state = {k: v for k, v in ckpt.items() if k not in _TRAINER_STATE}
        logger.info("resumed from %s at the end of epoch %d", path, self.start_epoch)

    # -- training --------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any] | None:
        """Train the epochs after `start_epoch`; returns `results` (the final evaluation's summary
        when an evaluation hook wrote one)."""
        max_epochs = self.cfg.SOLVER.MAX_EPOCHS
        if self.start_epoch >= max_epochs:
            logger.info("nothing to train: the checkpoint is already at epoch %d", self.start_epoch)
            return None
        self._call("before_train")
        for epoch in range(self.start_epoch + 1, max_epochs + 1):
            self.run_epoch(epoch)
        self._call("after_train")
        return self.results

    def run_epoch(self, epoch: int) -> None:
        """Train one epoch, step the LR schedule, publish the train row, then `after_epoch`."""
        self.eval_result = None
        self.epoch_stats = self.train_one_epoch(epoch)
        self.scheduler.step()
        self._sync_buffers()
        self.publish({"type": "train", "epoch": epoch, **self.epoch_stats})
        self._call("after_epoch")
        D.barrier()

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the loader with the step hooks; returns the epoch's train row."""
        self.epoch = epoch
        self.train_model.train()
        for obj in (getattr(self.loader, "sampler", None), getattr(self.loader, "batch_sampler", None),
                    self.loader.dataset):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        self.iters_per_epoch = len(self.loader)
        # The head's lr (SOLVER.BACKBONE_LR_FACTOR / FREEZE_BACKBONE_EPOCHS change the backbone's).
        groups = self.optimizer.param_groups
        self.lr = next((g["lr"] for g in groups if not g.get("backbone")), groups[0]["lr"])
        self.meter = EpochMeter(self.dist.world_size)
        self._call("before_epoch")
        end = time.perf_counter()
        for it, (images, pids, camids, _paths) in enumerate(self.loader, start=1):
            self.iter = it
            self.meter.data_time += time.perf_counter() - end
            self._call("before_step")
            self.run_step(images, pids, camids)
            self.meter.update(self.step_values, images.shape[0])
            self._call("after_step")
            end = time.perf_counter()
        return self.meter.stats(self.lr)

    def run_step(self, images: torch.Tensor, pids: torch.Tensor, camids: torch.Tensor | None = None) -> None:
        """Forward, loss, backward and the optimizer steps of one batch; sets `step_values`.
        `camids` reach the models that embed the camera (TransReID's SIE)."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = pids.to(self.device, non_blocking=True)
        if self.iter_lr is not None:
            self.lr = self.iter_lr(self.epoch - 1, self.iter - 1)
        self.optimizer.zero_grad(set_to_none=True)
        if self.center_optimizer is not None:
            self.center_optimizer.zero_grad(set_to_none=True)
        if not self._autocast_checked:
            self._check_autocast(images, camids)
        with autocast(self.device, self.amp_dtype):
            outputs = self.train_model(images, **camera_inputs(self.model, camids, self.device))
        # Losses in fp32: the triplet distances and center terms lose too much in bf16.
        terms, loss = self._losses(outputs.float(), targets)
        with torch.no_grad():
            acc = (outputs.class_scores().argmax(1) == targets).float().mean()
            # One small collective per step: the logged numbers are means over all ranks, so a
            # NaN on any rank stops every rank at the same step (NaNGuard).
            values = D.all_reduce_mean_(torch.stack([v.detach().float() for v in terms.values()] + [acc]))
        self.step_values = dict(zip([*terms, "acc"], values.tolist()))
        self.scaler.scale(loss).backward()
        if self.cfg.SOLVER.GRAD_CLIP > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.SOLVER.GRAD_CLIP)
        self.scaler.step(self.optimizer)
        if self.center_optimizer is not None:
            # Before scaler.update(): the center step unscales with this iteration's scale.
            self._center_step()
        self.scaler.update()

    def _check_autocast(self, images: torch.Tensor, camids: torch.Tensor | None) -> None:
        """Train in fp32 when this machine's autocast kernels get the first batch's features wrong
        (runtime.autocast_agrees). Eval-mode forwards without gradients, so the batch-norm
        statistics and the weights stay as they were; the backward kernels are not checked."""
        self._autocast_checked = True
        model, was_training = self.model, self.model.training
        cams = camera_inputs(model, camids, self.device).get("camids")
        model.eval()
        try:
            with torch.no_grad():
                full = tta_forward(model, images, camids=cams)
                with autocast(self.device, self.amp_dtype):
                    reduced = tta_forward(model, images, camids=cams)
        finally:
            model.train(was_training)
        if not autocast_agrees(reduced, full):
            logger.warning("MODEL.AMP: mixed-precision (%s) features of the training batch %s disagree "
                           "with fp32 ones on this machine, so this run trains in fp32 (MODEL.AMP off "
                           "skips this check)", self.amp_dtype, list(images.shape))
            self.amp_dtype = None
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)

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
        feats = outputs.features
        gathered = (feats.map(D.all_gather_with_grad) if isinstance(feats, Branches) else D.all_gather_with_grad(feats),
                    D.all_gather_with_grad(targets))
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

    def _sync_buffers(self) -> None:
        # SyncBN keeps the running statistics equal on every rank (and averaging equal values
        # over 3 ranks could round); without it each rank only saw its own images.
        if self.dist.enabled and not self.sync_bn:
            D.average_buffers_(self.model)


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP keyword that stops rank 0's buffers being broadcast before every forward: with SyncBN
    they agree anyway, without it they are averaged at the end of each epoch (_sync_buffers).
    Newer torch names it forward_sync_buffers (and warns about the old broadcast_buffers)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
