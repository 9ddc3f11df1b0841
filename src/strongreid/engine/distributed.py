"""torchrun integration: process group from the environment, rank helpers, collectives.

A plain `strongreid train` is a world of one; under `torchrun` the same code runs once per
process. NCCL on CUDA, gloo on the CPU. Every helper here is a no-op (or the identity) in a
world of one, so the single-process code path needs no branches.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from yacs.config import CfgNode

from strongreid.errors import ConfigError

logger = logging.getLogger("strongreid")

# The P x K samplers; the 'softmax' sampler shuffles single images.
IDENTITY_SAMPLERS = ("triplet", "softmax_triplet")


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
        timeout = datetime.timedelta(minutes=30)
        store = _restart_safe_store(timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _restart_safe_store(timeout: datetime.timedelta) -> dist.Store | None:
    """The store of torchrun's agent under a per-attempt prefix, or None for the default.

    torchrun's c10d rendezvous shares one TCPStore server across worker restarts, and the
    process group's keys carry no attempt number: after a restart a rank can read the address
    its killed peer published and fail to connect (pytorch/pytorch#135712, seen here with gloo).
    Prefixing the keys with TORCHELASTIC_RESTART_COUNT isolates the attempts. That count is the
    same on every worker of a single node; across nodes, set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    (torchrun then starts a fresh store for each attempt and this returns None).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                           int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"strongreid/attempt_{attempt}", client)


def current() -> DistContext:
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def comm_device() -> torch.device:
    """Where collective buffers must live: the current GPU under NCCL, the CPU under gloo."""
    if _active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    if _active():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def count_true(value: bool) -> int:
    """How many ranks pass True (1 or 0 in a world of one): lets every rank take one decision."""
    if not _active():
        return int(bool(value))
    t = torch.tensor([int(bool(value))], dtype=torch.int64, device=comm_device())
    dist.all_reduce(t)
    return int(t.item())


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
    """Concatenate an equally sized tensor of every rank (rank order); only the local part
    carries gradient.

    The other ranks' parts are constants here and no communication happens in backward. A loss
    computed identically on every rank from the gathered tensor therefore sends this rank's
    slice the gradient of the whole loss; under DDP, which averages gradients over W ranks,
    scale that loss by W to get the single-process gradient (the trainer does, for the
    cross-rank triplet loss).
    """
    if not _active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts, dim=0)


class _CrossRankBatchNorm(torch.autograd.Function):
    """Batch normalisation whose per-channel reductions (forward and backward) span all ranks.

    The forward follows the CPU BatchNorm kernel's arithmetic: sums accumulated in float64, the
    float32 mean, the float32 variance, invstd = 1 / sqrt(var + eps), then y = x * alpha + beta
    with alpha = invstd * weight and beta = bias - mean * alpha, each rounded once (the kernel
    is compiled to fused multiply-adds; float64 reproduces a single rounding). On the CPU the
    output therefore equals BatchNorm's on the concatenated batch bit for bit (as far as a
    float64 sum of the same numbers in another order rounds to the same float32). That matters
    more than it seems: ReLU turns any difference into a different mask for values near zero,
    and a handful of flipped elements change the gradients by far more than rounding.
    Backward is BatchNorm's with global sums: dx = w * invstd * (dy - mean(dy) - xmu * invstd^2
    * mean(dy * xmu)), the means running over all ranks' dy (each the gradient of its own loss).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalised x, global mean, unbiased global variance: what the running stats take)."""
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        sums = torch.cat([x.sum(dims, dtype=torch.float64),
                          torch.full((1,), x.numel() // c, dtype=torch.float64, device=x.device)])
        dist.all_reduce(sums)
        n = int(sums[c])
        if n < 2:
            raise ValueError(f"expected more than 1 value per channel across ranks when training, got input size {list(x.shape)}")
        mean = (sums[:c] / n).to(x.dtype)
        xmu = x - mean.view(shape)
        var_sum = (xmu * xmu).sum(dims, dtype=torch.float64)
        dist.all_reduce(var_sum)
        var_sum = var_sum.to(x.dtype)
        invstd = (1.0 / torch.sqrt((var_sum / n).double() + eps)).to(x.dtype)
        alpha = invstd if weight is None else invstd * weight
        beta = -mean.double() * alpha.double()
        if bias is not None:
            beta = beta + bias.double()
        y = (x.double() * alpha.double().view(shape) + beta.to(x.dtype).double().view(shape)).to(x.dtype)
        ctx.save_for_backward(xmu, invstd, weight)
        ctx.n = n
        unbiased = var_sum / (n - 1)
        ctx.mark_non_differentiable(mean, unbiased)
        return y, mean, unbiased

    @staticmethod
    def backward(ctx, dy: torch.Tensor, _dmean: torch.Tensor, _dvar: torch.Tensor):
        xmu, invstd, weight = ctx.saved_tensors
        c = dy.shape[1]
        dims = [0, *range(2, dy.dim())]
        shape = [1, c] + [1] * (dy.dim() - 2)
        sum_dy = dy.sum(dims, dtype=torch.float64)
        sum_dy_xmu = (dy * xmu).sum(dims, dtype=torch.float64)
        # The parameter gradients stay per rank: DDP averages them like any other.
        grad_weight = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xmu * invstd.double()).to(weight.dtype)
        grad_bias = sum_dy.to(dy.dtype) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(sums)
            mean_dy, mean_dy_xmu = sums[:c] / ctx.n, sums[c:] / ctx.n
            inv = invstd.double()
            scale = inv if weight is None else inv * weight.double()
            grad_x = (dy - mean_dy.to(dy.dtype).view(shape)
                      - xmu * (inv * inv * mean_dy_xmu).to(dy.dtype).view(shape)) * scale.to(dy.dtype).view(shape)
        return grad_x, grad_weight, grad_bias, None


class AllReduceBatchNorm(_BatchNorm):
    """Batch normalisation over the union of all ranks' batches, on any device and backend.

    torch's SyncBatchNorm only runs on GPUs; this one uses plain all-reduces (gloo on the CPU):
    two in forward (the mean, then the variance about it: no E[x^2] - E[x]^2 cancellation) and
    one in backward, so the output and the gradients equal BatchNorm on the concatenated batch.
    The running variance takes the unbiased global variance, as BatchNorm. In evaluation, or in
    a world of one, it is plain BatchNorm; the parameters and buffers are BatchNorm's, so
    checkpoints load into either.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and _active()):
            return super().forward(input)
        # Statistics in fp32 (accumulated in fp64) even under autocast.
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        y, mean, var = _CrossRankBatchNorm.apply(input.float(), weight, bias, self.eps)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average, as BatchNorm
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = self.momentum
                # In float64 and rounded once, as the CPU kernel updates them.
                for buf, batch in ((self.running_mean, mean), (self.running_var, var)):
                    buf.copy_(factor * batch.double() + (1 - factor) * buf.double())
        return y.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm*d to a cross-rank one: torch's SyncBatchNorm on CUDA, AllReduceBatchNorm
    elsewhere. The same Parameter objects are kept, so frozen ones (the BNNeck bias) stay frozen."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_to_all_reduce_bn(module)


def _convert_to_all_reduce_bn(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, (AllReduceBatchNorm, nn.SyncBatchNorm)):
        out = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_to_all_reduce_bn(child))
    return out


def average_buffers_(module: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the ranks.

    Without SyncBN each rank's running statistics come from its own images only; averaging them
    makes every rank hold the model rank 0 saves, so the sharded evaluation is the evaluation of
    that checkpoint.
    """
    if not _active():
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            all_reduce_mean_(buf.data)


def world_switch(value: str | bool, world_size: int) -> bool:
    """An 'auto' | 'on' | 'off' key (MODEL.SYNC_BN, SOLVER.TRIPLET_GATHER) for this world size.

    'auto' is on exactly when the world is larger than 1: both switches make W ranks compute what
    one process computes on the global batch, so the defaults train the single-process recipe
    whatever the world size. In a world of one both are no-ops anyway.
    """
    if isinstance(value, bool):
        return value and world_size > 1
    text = str(value).lower()
    if text == "auto":
        return world_size > 1
    return text == "on" and world_size > 1


def local_batch_size(cfg: CfgNode, world_size: int) -> int:
    """SOLVER.IMS_PER_BATCH is the global batch: the images each of `world_size` ranks trains on.

    With a P x K sampler every rank must hold whole identities, i.e. IMS_PER_BATCH / W must be a
    multiple of K; the error says which batch sizes work. Checked before anything heavy is built.
    """
    batch, w = int(cfg.SOLVER.IMS_PER_BATCH), int(world_size)
    if cfg.DATALOADER.SAMPLER not in IDENTITY_SAMPLERS:
        if batch % w:
            raise ConfigError(
                f"SOLVER.IMS_PER_BATCH={batch} is the global batch and must split evenly over the "
                f"{w} processes: use a multiple of {w} (e.g. {max(w, round(batch / w) * w)})."
            )
        return batch // w
    k = int(cfg.DATALOADER.NUM_INSTANCE)
    unit = k * w
    if batch % unit:
        suggestion = max(unit, round(batch / unit) * unit)
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH={batch} is the global batch: over {w} processes each would train "
            f"on {batch / w:g} images, which is not a whole number of identities of "
            f"DATALOADER.NUM_INSTANCE={k} images (batch-hard triplet mining needs whole identities "
            f"on every rank). Use a multiple of NUM_INSTANCE x processes = {unit}, "
            f"e.g. SOLVER.IMS_PER_BATCH {suggestion}."
        )
    local_p = batch // unit
    if w > 1 and local_p < 2 and not world_switch(cfg.SOLVER.TRIPLET_GATHER, w):
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH={batch} over {w} processes leaves each rank {local_p} identity of "
            f"{k} images: the triplet loss finds no negative within a rank. Set SOLVER.TRIPLET_GATHER "
            f"'auto' or 'on' (mine over the global batch) or use SOLVER.IMS_PER_BATCH {2 * unit} or more."
        )
    return batch // w


def cleanup(wait: bool = False) -> None:
    """Leave the process group. With `wait` (the run ended well on every rank), the ranks first
    meet at a barrier: a rank that tore its gloo group down while another was still evaluating
    sometimes aborted at exit ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
