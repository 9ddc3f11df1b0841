"""Data-parallel scaling of the training step: images/s with 1 and 2 processes, and the share
of a 2-process step spent on communication.

Each process trains the strong baseline's step (ReID model, label-smoothed CE + triplet + center
loss, Adam + center SGD) on random images of a fixed per-process batch (weak scaling, as a
torchrun run with a larger global batch). The processes are started with
torch.multiprocessing on 127.0.0.1, under DDP, with gloo on the CPU and NCCL on CUDA (one GPU
per process, so 2 processes need 2 GPUs). On the CPU every process gets the same number of
threads (cores / 2 unless --threads says), so 2 processes use twice the cores of 1, as 2 GPUs
are twice 1 GPU; ideal scaling is then x2.

The communication share is what DDP's gradient all-reduce adds to a step: the same step timed
with and without `no_sync()` (which skips the all-reduce), 1 - t(no_sync) / t(sync). The
throughputs are also given as a ratio (2 processes / 1 process) measured in the same run, so
the figures compare across machines. Step times are medians: the machine may be shared.

    python benchmarks/ddp_scaling.py            # ResNet-50, 256x128, 32 images per process
    python benchmarks/ddp_scaling.py --quick    # ResNet-18, 128x64, 16 images per process
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="ResNet-18 at 128x64, batch 16, fewer steps")
    p.add_argument("--arch", help="backbone (default resnet50, or resnet18 with --quick)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--batch", type=int, help="images per process (P x 4)")
    p.add_argument("--steps", type=int, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="CPU threads per process (default: cores / 2)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm in the 2-process run")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    args.arch = args.arch or ("resnet18" if args.quick else "resnet50")
    args.height = args.height or (128 if args.quick else 256)
    args.width = args.width or (64 if args.quick else 128)
    args.batch = args.batch or (16 if args.quick else 32)
    args.steps = args.steps or (6 if args.quick else 10)
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // 2)
    if args.batch % 4:
        p.error("--batch must be a multiple of 4 (P identities x K=4 images)")
    return args


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(args: argparse.Namespace, device: torch.device, world: int):
    from strongreid.config import get_cfg_defaults
    from strongreid.engine import distributed as D
    from strongreid.losses import build_loss
    from strongreid.modeling import ReIDModel, create_backbone
    from strongreid.solver import make_center_optimizer, make_optimizer

    cfg = get_cfg_defaults()
    cfg.DATALOADER.SAMPLER = "softmax_triplet"
    cfg.MODEL.IF_WITH_CENTER = "yes"
    cfg.MODEL.METRIC_LOSS_TYPE = "triplet_center"
    num_classes = 751  # Market-1501's training identities
    torch.manual_seed(0)
    model = ReIDModel(create_backbone(args.arch, 1), num_classes)
    if args.sync_bn and world > 1:
        model = D.convert_sync_batchnorm(model, device)
    model = model.to(device)
    loss_fn = build_loss(cfg, num_classes, model.feat_dim).to(device)
    optimizer = make_optimizer(cfg, model)
    center_optimizer = make_center_optimizer(cfg, loss_fn.center)
    return cfg, model, loss_fn, optimizer, center_optimizer


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    from strongreid.engine import distributed as D
    from strongreid.solver import step_center

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))
    cfg, model, loss_fn, optimizer, center_optimizer = _build(args, device, world)
    train_model = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None) if world > 1 else model
    g = torch.Generator().manual_seed(rank)
    images = torch.randn(args.batch, 3, args.height, args.width, generator=g).to(device)
    targets = torch.arange(args.batch // 4).repeat_interleave(4).add(rank * args.batch // 4).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        center_optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(train_model(images), targets)["total"]
        loss.backward()
        optimizer.step()
        for p in loss_fn.center.parameters():
            D.all_reduce_mean_(p.grad)
        step_center(center_optimizer, loss_fn.center, loss_fn.center_weight)

    def timed(n: int, sync: bool) -> list[float]:
        times = []
        for _ in range(n):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if sync or world == 1:
                step()
            else:
                with train_model.no_sync():
                    step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times

    timed(args.warmup, True)
    # Interleaved rounds, so that a change of machine load hits both variants alike.
    sync_times, local_times = [], []
    for _ in range(2):
        sync_times += timed(args.steps // 2 or 1, True)
        local_times += timed(args.steps // 2 or 1, False)
    if rank == 0:
        Path(out).write_text(json.dumps({"sync": sync_times, "no_sync": local_times}))
    if world > 1:
        dist.destroy_process_group()


def run(world: int, args: argparse.Namespace) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.json")
        mp.start_processes(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True,
                           start_method="spawn")
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < 2:
        print("2 processes with NCCL need 2 GPUs; this machine has 1: only the 1-process figure", file=sys.stderr)
    worlds = [1, 2] if not cuda or torch.cuda.device_count() >= 2 else [1]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.arch} at {args.height}x{args.width}, {args.batch} images per process, "
          f"{'CUDA/NCCL' if cuda else f'CPU/gloo, {os.cpu_count()} cores, {args.threads} threads per process'}, "
          f"load average {load:.1f}, "
          f"SyncBN {'on' if args.sync_bn else 'off'}")
    figures: dict[str, float] = {}
    for world in worlds:
        times = run(world, args)
        t_sync = statistics.median(times["sync"])
        figures[f"images_per_s_{world}"] = world * args.batch / t_sync
        line = f"{world} process{'es' if world > 1 else ''}: {t_sync * 1000:.0f} ms/step, " \
               f"{figures[f'images_per_s_{world}']:.1f} images/s"
        if world > 1:
            t_local = statistics.median(times["no_sync"])
            figures["comm_share"] = max(0.0, 1.0 - t_local / t_sync)
            line += f"; without the all-reduce (no_sync) {t_local * 1000:.0f} ms/step: " \
                    f"communication {100 * figures['comm_share']:.0f}% of a step"
        print(line)
    if len(worlds) == 2:
        figures["speedup"] = figures["images_per_s_2"] / figures["images_per_s_1"]
        print(f"2 / 1 processes: x{figures['speedup']:.2f} images/s "
              f"(scaling efficiency {100 * figures['speedup'] / 2:.0f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps({**figures, "args": vars(args), "load": load}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
