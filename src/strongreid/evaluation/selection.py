"""Exact, tie-stable ordering helpers shared by the evaluator, re-ranking and the ranking files.

Everything here orders by (distance, gallery index): equal distances keep the gallery order,
which is what a stable sort gives. The trick that keeps it cheap is an integer key whose order
is the float order, so one int64 sort replaces a lexicographic sort.
"""

from __future__ import annotations

import torch

_LOW31 = 0x7FFFFFFF
_LOW32 = 0xFFFFFFFF


def orderable_int32(values: torch.Tensor) -> torch.Tensor:
    """int32 keys whose integer order is the float32 order of `values` (NaN-free input).

    -0.0 and +0.0 get the same key, so they tie like the floats do.
    """
    v = values.to(torch.float32)
    v = torch.where(v == 0, torch.zeros_like(v), v)
    bits = v.view(torch.int32)
    # Negative floats order backwards by their bit pattern: flip the 31 low bits of those.
    return bits ^ ((bits >> 31) & _LOW31)


def float_from_orderable(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of `orderable_int32`."""
    bits = keys ^ ((keys >> 31) & _LOW31)
    return bits.view(torch.float32)


def value_index_keys(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering by float32 value, then by index (index must be in [0, 2**32))."""
    return (orderable_int32(values).to(torch.int64) << 32) + index.to(torch.int64)


def split_value_index_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 values, int64 indices) of keys made by `value_index_keys`."""
    values = float_from_orderable((keys >> 32).to(torch.int32))
    return values, keys & _LOW32


def order_within_rows(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Permutation sorting entries by (row, value), keeping the input order among ties.

    The caller lists each row's entries in gallery order (as `nonzero` does), so ties end up
    ordered by gallery index.
    """
    if values.dtype in (torch.float32, torch.float16, torch.bfloat16):
        # One sort: row in the high 32 bits, the value's order-preserving bits below.
        low = orderable_int32(values).to(torch.int64) + (1 << 31)
        return torch.sort((rows.to(torch.int64) << 32) + low, stable=True).indices
    # float64 keeps all its bits: two stable sorts (by value, then by row) do the same job.
    by_value = torch.sort(values, stable=True).indices
    by_row = torch.sort(rows[by_value], stable=True).indices
    return by_value[by_row]


def segment_starts(counts: torch.Tensor) -> torch.Tensor:
    """Offsets of consecutive segments with the given lengths."""
    return torch.cumsum(counts, 0) - counts


def ragged_arange(counts: torch.Tensor) -> torch.Tensor:
    """[0..c0-1, 0..c1-1, ...] for the given counts."""
    total = int(counts.sum())
    starts = segment_starts(counts)
    return torch.arange(total, device=counts.device) - torch.repeat_interleave(starts, counts)


def sparse_nonzero(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, values) of the non-zero entries of a contiguous 2-D uint8 tensor, in
    row-major order.

    The masks here are sparse, so it scans them 8 bytes at a time as int64 words and only
    looks inside the few non-zero words: several times faster than `nonzero` on the bytes.
    """
    num_cols = flags.shape[1]
    flat = flags.reshape(-1)
    whole = flat.numel() - flat.numel() % 8
    words = torch.nonzero(flat[:whole].view(torch.int64)).squeeze(1)
    word_r, byte = torch.nonzero(flat[:whole].view(-1, 8)[words], as_tuple=True)
    tail = torch.nonzero(flat[whole:]).squeeze(1) + whole
    pos = torch.cat([words[word_r] * 8 + byte, tail])
    return pos // num_cols, pos % num_cols, flat[pos]
