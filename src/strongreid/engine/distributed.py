"""torchrun integration: process group from the environment, rank helpers, ordered gathers.

A plain `strongreid train` is a world of one; under `torchrun` the same code runs once per
process. NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger("strongreid")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    if not launched_by_torchrun():
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def current() -> DistContext:
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, nearly equal shards: concatenating them in rank order restores the input order."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def gather_in_order(tensor: torch.Tensor, n_total: int) -> torch.Tensor | None:
    """Concatenate each rank's shard (from `shard_range`) on rank 0; other ranks get None."""
    ctx = current()
    if not ctx.enabled:
        return tensor
    backend = dist.get_backend()
    dev = tensor.device if backend == "nccl" else torch.device("cpu")
    sizes = [shard_range(n_total, r, ctx.world_size) for r in range(ctx.world_size)]
    max_len = max(e - s for s, e in sizes)
    padded = torch.zeros((max_len, *tensor.shape[1:]), dtype=tensor.dtype, device=dev)
    padded[: tensor.shape[0]] = tensor.to(dev)
    chunks = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(chunks, padded)
    if not ctx.is_main:
        return None
    return torch.cat([c[: e - s] for c, (s, e) in zip(chunks, sizes)]).cpu()


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor across ranks keeping the local part differentiable."""
    ctx = current()
    if not ctx.enabled:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
