"""Input checks shared by the evaluation functions, and chunked query x gallery distances.

"euclidean" is the squared Euclidean distance ||q||^2 + ||g||^2 - 2 q.g of the original project
(no square root, no clamp; it ranks like the true distance). "cosine" is 1 - cos(q, g).
The full query x gallery matrix is only built when a caller asks for it (`pairwise_distance`);
`DistanceChunks` hands out blocks of query rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from strongreid.errors import StrongReIDError

METRICS = ("euclidean", "cosine")

# Elements of one query x gallery block handed to the evaluator: its temporaries (a mask,
# sorted candidates) stay small. Distances are computed in blocks of _CPU_GEMM_ELEMENTS, which
# is large enough that the GEMM streams the gallery rarely (204-row blocks at MSMT17 scale
# ran 14% slower than 816-row ones).
_CPU_BLOCK_ELEMENTS = 1 << 24
_CPU_GEMM_ELEMENTS = 1 << 26
_CUDA_BLOCK_ELEMENTS = 1 << 27


@contextmanager
def serial_cpu(device: torch.device) -> Iterator[None]:
    """Run the enclosed torch CPU ops on one thread, then restore the thread count.

    The evaluator's bookkeeping is hundreds of small ops (compare, nonzero, gathers, sorts of
    a few million entries). With more threads each waits for its whole team to be scheduled:
    on a busy 2-core machine `evaluate` took 2.4 s with 2 threads and 0.10 s with 1 (Market
    scale, same process). The matmuls stay outside and keep every thread.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def resolve_device(device: Any, *tensors: Any) -> torch.device:
    """The device to compute on: the one asked for, else that of the first torch tensor."""
    if device is None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                return t.device
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise StrongReIDError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StrongReIDError(f"device {device!r} was asked for but CUDA is not available here")
    return dev


def block_rows(
    num_cols: int, device: torch.device, chunk_size: int | None, gemm: bool = False
) -> int:
    """Query rows per block: `chunk_size` when given, else a size-based default (`gemm`:
    the larger blocks distances are computed in)."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
            raise StrongReIDError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        return int(chunk_size)
    if device.type == "cuda":
        budget = _CUDA_BLOCK_ELEMENTS
    else:
        budget = _CPU_GEMM_ELEMENTS if gemm else _CPU_BLOCK_ELEMENTS
    return max(1, budget // max(1, num_cols))


def as_features(x: Any, name: str, device: torch.device) -> torch.Tensor:
    """A 2-D float32 tensor on `device`; empty, ragged or non-finite input is a user error."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
        except (TypeError, ValueError) as exc:
            raise StrongReIDError(f"{name} is not a numeric array: {exc}") from exc
    if t.dim() != 2:
        raise StrongReIDError(f"{name} must be a 2-D (count x dim) array, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise StrongReIDError(f"{name} is empty (0 rows): there is nothing to evaluate")
    if t.shape[1] == 0:
        raise StrongReIDError(f"{name} has feature dimension 0")
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                  torch.uint8)):
        raise StrongReIDError(f"{name} must hold numbers, got dtype {t.dtype}")
    t = t.to(device=device, dtype=torch.float32)
    # min/max propagate NaN and show inf: one read-only pass instead of an elementwise mask.
    low, high = torch.aminmax(t)
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        row = int(torch.nonzero(~torch.isfinite(t).all(dim=1))[0, 0])
        raise StrongReIDError(
            f"{name} has NaN or infinite values (first in row {row}): the model produced "
            "non-finite features; check the checkpoint, or turn mixed precision off (MODEL.AMP off)"
        )
    return t



def feature_pair(q_feats: Any, g_feats: Any, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and gallery features as checked float32 tensors on one device, same dimension."""
    dev = resolve_device(device, q_feats, g_feats)
    q = as_features(q_feats, "q_feats", dev)
    g = as_features(g_feats, "g_feats", dev)
    if q.shape[1] != g.shape[1]:
        raise StrongReIDError(
            f"query features have dimension {q.shape[1]} but gallery features {g.shape[1]}; "
            "extract both with the same model and TEST.NECK_FEAT"
        )
    return q, g

def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """Row sums of squares, as the original's pow(2).sum(1) (exact for integer features, so
    ties stay ties), without its N x D temporary."""
    return torch.einsum("ij,ij->i", x, x)


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows divided by max(||row||, eps), as torch.nn.functional.normalize does."""
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(eps)


class DistanceChunks:
    """Query-row blocks of the query x gallery distance, computed on demand."""

    def __init__(self, q: torch.Tensor, g: torch.Tensor, metric: str) -> None:
        if metric not in METRICS:
            raise StrongReIDError(
                f"unknown metric {metric!r} (config key TEST.METRIC): use 'euclidean' or 'cosine'"
            )
        self.q, self.g, self.metric = q, g, metric
        self.g_t = g.t()
        q_sq, g_sq = squared_norms(q), squared_norms(g)
        # With finite squared norms every distance is finite (|2 q.g| <= |q|^2 + |g|^2), so
        # the evaluator can skip its NaN scan of each block.
        if not bool(torch.isfinite(q_sq.max() + g_sq.max())):
            raise StrongReIDError(
                "features are too large: their squared norms overflow float32; "
                "L2-normalise them (TEST.FEAT_NORM yes) or check the model output"
            )
        if metric == "euclidean":
            self.q_aux, self.g_aux = q_sq, g_sq
        else:
            # 1/||x||: scaling the small query block before the product and the result's columns
            # after it avoids a normalised copy of the whole gallery.
            self.q_aux = 1.0 / torch.linalg.vector_norm(q, dim=1).clamp_min(1e-12)
            self.g_aux = 1.0 / torch.linalg.vector_norm(g, dim=1).clamp_min(1e-12)

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.g.shape[0]

    def block(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Distances of queries start..stop-1 to every gallery item (float32)."""
        q = self.q[start:stop]
        n = q.shape[0]
        if out is None or out.shape[0] < n:
            out = torch.empty(n, self.g.shape[0], dtype=torch.float32, device=q.device)
        out = out[:n]
        if self.metric == "euclidean":
            # The original's order of operations: (||q||^2 + ||g||^2) then -2 q.g in one addmm.
            torch.add(self.q_aux[start:stop, None], self.g_aux[None, :], out=out)
            out.addmm_(q, self.g_t, alpha=-2.0)
        else:
            torch.mm(q * self.q_aux[start:stop, None], self.g_t, out=out)
            out.mul_(-self.g_aux[None, :]).add_(1.0)
        return out

    def blocks(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, block) pairs covering all queries; the block buffer is reused."""
        buf = None
        num_q = self.q.shape[0]
        for start in range(0, num_q, rows):
            stop = min(num_q, start + rows)
            buf_block = self.block(start, stop, buf)
            if buf is None:
                buf = buf_block
            yield start, buf_block


def pairwise_distance(
    q_feats: Any,
    g_feats: Any,
    metric: str = "euclidean",
    *,
    chunk_size: int | None = None,
    device: Any = None,
) -> torch.Tensor:
    """The full query x gallery distance matrix (float32), block by block like the evaluator."""
    q, g = feature_pair(q_feats, g_feats, device)
    dev = q.device
    chunks = DistanceChunks(q, g, metric)
    out = torch.empty(chunks.shape, dtype=torch.float32, device=dev)
    rows = block_rows(g.shape[0], dev, chunk_size, gemm=True)
    for start in range(0, q.shape[0], rows):
        stop = min(q.shape[0], start + rows)
        chunks.block(start, stop, out[start:stop])
    return out
