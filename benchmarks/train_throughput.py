"""Throughput of the strong baseline's training step, inference and data loader.

One training iteration is the paper's: ResNet-50 with last stride 1 at 256x128, a 16 x 4 batch,
label-smoothed CE + triplet + center loss, Adam on the model and SGD on the centers. It is timed
in plain fp32 eager mode (the reference, as the original runs) and in channels_last, bf16
autocast and bf16 autocast + channels_last variants; every figure is given as a ratio against
the reference measured in the same run, so the numbers compare across machines. Inference
(batch 128, eval mode) is measured the same way. The DataLoader is timed on small JPEGs written
to a temporary folder, alone at 1 and 2 workers and then feeding the training step (its share of
waiting for data). On CUDA the variants use AMP (bf16 where supported, else fp16 + GradScaler).

    python benchmarks/train_throughput.py            # the full-size run (minutes on 2 cores)
    python benchmarks/train_throughput.py --quick    # batch 16, fewer iterations
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from yacs.config import CfgNode

from strongreid.config import get_cfg_defaults
from strongreid.losses import build_loss
from strongreid.modeling import ReIDModel, create_backbone
from strongreid.solver import make_center_optimizer, make_optimizer, step_center

NUM_CLASSES = 751  # Market-1501's training identities


@dataclass(frozen=True)
class Variant:
    name: str
    channels_last: bool
    amp: bool
    compile: bool = False


@dataclass
class Timing:
    seconds_per_iter: float
    images_per_s: float
    first_s: float  # the first (warm-up) iteration: includes compilation for compiled variants


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="training batch (P x K), default 64")
    p.add_argument("--instances", type=int, default=4, help="K images per identity")
    p.add_argument("--infer-batch", type=int, default=128)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per variant")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per variant")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile on the fastest variant (compile time separately)")
    p.add_argument("--loader-ids", type=int, default=96, help="identities in the JPEG folder")
    p.add_argument("--loader-per-id", type=int, default=8)
    p.add_argument("--skip", default="", help="comma list of parts to skip: train,infer,loader,pipeline")
    p.add_argument("--quick", action="store_true",
                   help="batch 16, infer batch 32, 1 warm-up + 2 timed iterations")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.infer_batch, args.warmup, args.iters = 16, 32, 1, 2
        args.loader_ids = 48
    if args.batch % args.instances:
        p.error(f"--batch {args.batch} must be a multiple of --instances {args.instances}")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def amp_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_cfg(args: argparse.Namespace) -> CfgNode:
    # softmax_triplet_with_center.yml's recipe.
    cfg = get_cfg_defaults()
    cfg.MODEL.NAME = args.model
    cfg.MODEL.LAST_STRIDE = 1
    cfg.MODEL.PRETRAIN_CHOICE = "none"
    cfg.MODEL.METRIC_LOSS_TYPE = "triplet_center"
    cfg.MODEL.IF_WITH_CENTER = "yes"
    cfg.MODEL.IF_LABELSMOOTH = "on"
    cfg.DATALOADER.SAMPLER = "softmax_triplet"
    cfg.DATALOADER.NUM_INSTANCE = args.instances
    cfg.SOLVER.IMS_PER_BATCH = args.batch
    cfg.SOLVER.BASE_LR = 3.5e-4
    cfg.SOLVER.BIAS_LR_FACTOR = 1
    cfg.SOLVER.WEIGHT_DECAY_BIAS = 5e-4
    cfg.INPUT.SIZE_TRAIN = [args.height, args.width]
    cfg.INPUT.SIZE_TEST = [args.height, args.width]
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def make_model(args: argparse.Namespace) -> ReIDModel:
    return ReIDModel(create_backbone(args.model, 1), NUM_CLASSES)


class TrainStep:
    """One iteration of the trainer's maths: forward (autocast), fp32 losses, backward, Adam,
    center SGD with the 1/weight rescale."""

    def __init__(self, cfg: CfgNode, model: ReIDModel, variant: Variant, device: torch.device) -> None:
        self.device = device
        self.variant = variant
        self.model = model.to(device).train()
        if variant.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(cfg, NUM_CLASSES, model.feat_dim, device=device)
        self.optimizer = make_optimizer(cfg, self.model)
        self.center_optimizer = make_center_optimizer(cfg, self.loss_fn.center)
        self.dtype = amp_dtype(device) if variant.amp else None
        use_scaler = device.type == "cuda" and self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.forward = torch.compile(self.model) if variant.compile else self.model

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.variant.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        self.center_optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            outputs = self.forward(images)
        terms = self.loss_fn(outputs.float(), targets)
        self.scaler.scale(terms["total"]).backward()
        self.scaler.step(self.optimizer)
        step_center(self.center_optimizer, self.loss_fn.center, self.loss_fn.center_weight,
                    scaler=self.scaler)
        self.scaler.update()
        return float(terms["total"].detach())


def synthetic_batch(args: argparse.Namespace, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, args.height, args.width, generator=gen)
    ids = torch.randperm(NUM_CLASSES, generator=gen)[: batch // args.instances]
    return images, ids.repeat_interleave(args.instances)


def time_interleaved(
    calls: dict[str, Callable[[], object]], warmup: int, iters: int, device: torch.device,
    batch: int,
) -> dict[str, Timing]:
    """Time every variant round-robin: one iteration of each in turn, `iters` rounds.

    Interleaving makes the ratios robust to a machine whose load changes during the run (other
    jobs on a shared 2-core box): every variant sees the same mix of quiet and busy moments.
    The per-variant figure is the median iteration.
    """
    first: dict[str, float] = {}
    for name, fn in calls.items():
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        first[name] = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        for fn in calls.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(iters):
        for name, fn in calls.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - t0)
    out = {}
    for name, times in samples.items():
        per_iter = float(np.median(times))
        out[name] = Timing(per_iter, batch / per_iter, first[name])
    return out


def bench_train(
    args: argparse.Namespace, cfg: CfgNode, device: torch.device, variants: list[Variant],
    state: dict[str, torch.Tensor],
) -> dict[str, Timing]:
    images, targets = synthetic_batch(args, args.batch)
    calls = {}
    for v in variants:
        torch.manual_seed(0)
        model = make_model(args)
        model.load_state_dict(state)
        calls[v.name] = partial(TrainStep(cfg, model, v, device), images, targets)
    results = time_interleaved(calls, args.warmup, args.iters, device, args.batch)
    del calls
    gc.collect()
    return results


class InferStep:
    """Eval-mode forward of one batch, features copied back to the host as fp32."""

    def __init__(self, model: ReIDModel, variant: Variant, images: torch.Tensor,
                 device: torch.device) -> None:
        self.device = device
        self.dtype = amp_dtype(device) if variant.amp else None
        model = model.to(device).eval()
        self.x = images.to(device)
        if variant.channels_last:
            model = model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.forward = torch.compile(model) if variant.compile else model

    def __call__(self) -> None:
        ctx = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None
               else contextlib.nullcontext())
        with torch.inference_mode(), ctx:
            self.forward(self.x).float().cpu()


def bench_infer(
    args: argparse.Namespace, device: torch.device, variants: list[Variant],
    state: dict[str, torch.Tensor],
) -> dict[str, Timing]:
    images, _ = synthetic_batch(args, args.infer_batch)
    calls = {}
    for v in variants:
        model = make_model(args)
        model.load_state_dict(state)
        calls[v.name] = InferStep(model, v, images, device)
    results = time_interleaved(calls, args.warmup, args.iters, device, args.infer_batch)
    del calls
    gc.collect()
    return results


def write_jpegs(root: Path, ids: int, per_id: int) -> list:
    """Market-sized (128x64) smooth random JPEGs named like Market files."""
    from strongreid.data.datasets.base import ImageRecord

    rng = np.random.default_rng(0)
    records = []
    for pid in range(ids):
        for k in range(per_id):
            small = rng.integers(0, 256, size=(16, 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((64, 128), Image.BILINEAR)
            path = root / f"{pid:04d}_c{k % 6 + 1}s1_{k:06d}_00.jpg"
            img.save(path, quality=90)
            records.append(ImageRecord(str(path), pid, k % 6))
    return records


def make_loader(cfg: CfgNode, records: list, workers: int) -> torch.utils.data.DataLoader:
    from strongreid.data import build_train_loader

    cfg = cfg.clone()
    cfg.DATALOADER.NUM_WORKERS = workers
    loader = build_train_loader(cfg, records)
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(0)
    return loader


def bench_loader(cfg: CfgNode, records: list, workers: int) -> tuple[float, float, int]:
    """Steady-state images/s (from the first batch on), start-up seconds, images counted."""
    loader = make_loader(cfg, records, workers)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t_first = time.perf_counter()
    n = 0
    for images, *_ in it:
        n += images.shape[0]
    elapsed = time.perf_counter() - t_first
    del it, loader
    return n / max(elapsed, 1e-9), t_first - t0, n


def bench_pipeline(
    args: argparse.Namespace, cfg: CfgNode, device: torch.device, variant: Variant,
    state: dict[str, torch.Tensor], records: list, workers: int,
) -> tuple[float, float]:
    """Training fed by the real loader: images/s and the share of time spent waiting for data."""
    torch.manual_seed(0)
    model = make_model(args)
    model.load_state_dict(state)
    step = TrainStep(cfg, model, variant, device)
    loader = make_loader(cfg, records, workers)
    needed = args.warmup + args.iters
    batches_seen, waited, seen = 0, 0.0, 0
    t_start = None
    epoch = 0
    while batches_seen < needed:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        epoch += 1
        end = time.perf_counter()
        for images, pids, *_ in loader:
            got = time.perf_counter()
            if batches_seen == args.warmup:
                sync(device)
                t_start, waited, seen = got, 0.0, 0
                end = got
            if batches_seen > args.warmup:
                waited += got - end
            step(images, pids)
            sync(device)
            batches_seen += 1
            if batches_seen > args.warmup:
                seen += images.shape[0]
            end = time.perf_counter()
            if batches_seen >= needed:
                break
    total = time.perf_counter() - t_start
    del step, model, loader
    gc.collect()
    return seen / total, waited / total


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(device)}"
    flags = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    bf16 = sorted(flags & {"amx_bf16", "avx512_bf16"}) or ["no native bf16"]
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, {', '.join(bf16)}")


def load_line() -> str:
    """The 1-minute load average: on a shared machine the absolute figures depend on it."""
    try:
        return f"; load average {os.getloadavg()[0]:.1f}"
    except OSError:
        return ""


def table(title: str, results: dict[str, Timing], batch: int, reference: str) -> None:
    ref = results[reference].images_per_s
    print(f"\n{title} (batch {batch})")
    print(f"  {'variant':<36s} {'s/iter':>8s} {'img/s':>8s} {'x fp32':>7s} {'1st iter s':>10s}")
    for name, t in results.items():
        print(f"  {name:<36s} {t.seconds_per_iter:8.2f} {t.images_per_s:8.2f} "
              f"{t.images_per_s / ref:6.2f}x {t.first_s:10.1f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    cfg = make_cfg(args)
    amp_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype(device)]
    variants = [
        Variant("fp32 eager (reference)", channels_last=False, amp=False),
        Variant("fp32 channels_last", channels_last=True, amp=False),
        Variant(f"{amp_name} autocast", channels_last=False, amp=True),
        Variant(f"{amp_name} autocast + channels_last", channels_last=True, amp=True),
    ]
    if args.compile:
        variants.append(Variant(f"{amp_name} + channels_last + compile", True, True, compile=True))
    fastest = variants[3]
    torch.manual_seed(0)
    state = copy.deepcopy(make_model(args).state_dict())
    print(machine_line(device) + load_line())
    print(f"torch {torch.__version__}; {args.model}, last stride 1, {args.height}x{args.width}, "
          f"warm-up {args.warmup} + {args.iters} timed iterations per variant", flush=True)

    if "train" not in skip:
        train = bench_train(args, cfg, device, variants, state)
        table("Training step: LS-CE + triplet + center, Adam + center SGD", train, args.batch,
              variants[0].name)
    if "infer" not in skip:
        infer = bench_infer(args, device, variants, state)
        table("Inference", infer, args.infer_batch, variants[0].name)

    if {"loader", "pipeline"} - skip:
        with tempfile.TemporaryDirectory(prefix="strongreid-bench-") as tmp:
            records = write_jpegs(Path(tmp), args.loader_ids, args.loader_per_id)
            if "loader" not in skip:
                print(f"\nDataLoader alone ({len(records)} JPEGs of 128x64, train transforms, "
                      f"P x K batches of {args.batch})")
                for workers in (1, 2):
                    ips, startup, n = bench_loader(cfg, records, workers)
                    print(f"  {workers} worker{'s' if workers > 1 else ' '}  {ips:8.1f} img/s "
                          f"steady ({n} images), start-up {startup:.2f} s", flush=True)
            if "pipeline" not in skip:
                ips, wait = bench_pipeline(args, cfg, device, fastest, state, records, 2)
                print(f"\nTraining fed by the loader ({fastest.name}, 2 workers): {ips:.2f} img/s, "
                      f"waiting for data {100 * wait:.1f}% of the time", flush=True)
    print(f"\ndone{load_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
