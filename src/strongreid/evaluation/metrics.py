"""CMC, mAP and mINP: exact, tie-stable, and memory-bounded at any dataset size.

Protocol (Market-1501, as reid-strong-baseline, torchreid and fast-reid evaluate):
  * for each query, gallery items with the same pid AND the same camera are removed ("junk");
    so are gallery items with pid -1 (JUNK_PID: Market's junk boxes), for every query, as the
    official Market script and layumi's evaluate_gpu.py do and as the peers' loaders do by
    dropping them; everything else stays, pid 0 distractors included. A query with pid -1 is
    refused (it has no identity to find);
  * the remaining items are ranked by distance, ascending. Ties are broken by gallery index,
    ascending (a stable sort), so results never depend on the sort algorithm;
  * a query whose remaining list holds no item of its pid has no valid match. With
    unmatched="skip" it is left out of every mean (the common convention); with "fail" it
    counts as a miss (CMC 0, AP 0, INP 0), which is what an honest number on your own data
    needs. `num_skipped` always says how many were left out.

AP: "plain" is the non-interpolated AP of the peers, (1/R) sum_i i / r_i over the 1-based ranks
r_i of the R positives; "trapezoid" is the official Market-1501 script's rule (layumi),
(1/R) sum_i (i / r_i + (i - 1) / (r_i - 1)) / 2, with (i - 1)/(r_i - 1) taken as 1 when r_i = 1.
INP (Ye et al.) is R / r_R, the precision at the hardest positive.
cuhk03=True gives the single-gallery-shot CMC: 10 repeats, each drawing one random gallery image
per identity (seeded), the CMC averaged over repeats; AP and INP use the full list.

How it stays fast without ranking whole rows: per block of queries, the positives come from
a pid-grouped view of the gallery, and the farthest positive bounds the part of each row that
matters. The items under that bound are sorted (one int64 sort of order-preserving keys);
rows where the bound admits much of the gallery (a weak model) instead count, for each
positive, the items below it with one searchsorted pass. Nothing of size Q x G is allocated:
memory is O(block x G) plus per-query results.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from strongreid.errors import StrongReIDError
from strongreid.evaluation.distance import (
    DistanceChunks,
    block_rows,
    feature_pair,
    serial_cpu,
)
from strongreid.evaluation.selection import (
    order_within_rows,
    ragged_arange,
    segment_starts,
    sparse_nonzero,
)

logger = logging.getLogger(__name__)

AP_MODES = ("plain", "trapezoid")
# The pid of Market-1501's junk boxes (file names starting with -1): never ranked.
JUNK_PID = -1
UNMATCHED_MODES = ("skip", "fail")
CUHK03_REPEATS = 10
# Columns used to bound the top-k threshold before the full-row pass (see `_topk_bound`).
_TOPK_PROBE_COLUMNS = 2048
# A row goes to the counting path when more than 1/_DENSE_FRACTION of it are candidates.
_DENSE_FRACTION = 8
_DENSE_SAMPLE_STEP = 64


@dataclass
class EvalResult:
    """Metrics of one evaluation. Fractions in [0, 1]; per-query arrays in query order."""

    cmc: np.ndarray  # (max_rank,) float64: fraction of queries matched within rank k+1
    mAP: float
    mINP: float
    ap: np.ndarray  # (Q,) float64, NaN for skipped queries
    inp: np.ndarray  # (Q,) float64, NaN for skipped queries
    num_query: int
    num_gallery: int
    num_valid: int  # queries with at least one valid match
    num_skipped: int  # queries left out of the means (unmatched="skip")
    num_junk: int = 0  # gallery items with pid -1, left out of every ranking
    topk_index: np.ndarray | None = field(default=None, repr=False)  # (Q, K) int64, -1 = none
    topk_dist: np.ndarray | None = field(default=None, repr=False)  # (Q, K) float32, inf = none

    def rank(self, k: int) -> float | None:
        """CMC at rank k (1-based), or None when k > max_rank."""
        if k < 1 or k > len(self.cmc):
            return None
        return _json_float(self.cmc[k - 1])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary; NaN (no valid query) becomes None."""
        return {
            "mAP": _json_float(self.mAP),
            "mINP": _json_float(self.mINP),
            "cmc": [_json_float(v) for v in self.cmc],
            "rank1": self.rank(1),
            "rank5": self.rank(5),
            "rank10": self.rank(10),
            "num_query": self.num_query,
            "num_gallery": self.num_gallery,
            "num_valid": self.num_valid,
            "num_skipped": self.num_skipped,
            "num_junk": self.num_junk,
        }


def _json_float(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def _as_labels(x: Any, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "iu":
            raise StrongReIDError(
                f"{name} must be integers (one per image), got dtype {arr.dtype}"
            )
        t = torch.from_numpy(np.ascontiguousarray(arr).astype(np.int64, copy=False))
    if t.dim() != 1:
        raise StrongReIDError(f"{name} must be 1-D (one value per image), got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise StrongReIDError(f"{name} must be integers (one per image), got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def _check_options(max_rank: int, ap: str, unmatched: str, topk: int = 0) -> None:
    if ap not in AP_MODES:
        raise StrongReIDError(f"ap must be 'plain' or 'trapezoid' (config key TEST.AP), got {ap!r}")
    if unmatched not in UNMATCHED_MODES:
        raise StrongReIDError(
            f"unmatched must be 'skip' or 'fail' (config key TEST.UNMATCHED), got {unmatched!r}"
        )
    if isinstance(max_rank, bool) or int(max_rank) != max_rank or max_rank < 1:
        raise StrongReIDError(f"max_rank must be a positive integer (TEST.MAX_RANK), got {max_rank!r}")
    if isinstance(topk, bool) or int(topk) != topk or topk < 0:
        raise StrongReIDError(f"topk must be a non-negative integer, got {topk!r}")


def _check_lengths(num_q: int, num_g: int, labels: dict[str, torch.Tensor], what: str) -> None:
    if num_q == 0:
        raise StrongReIDError(f"the query set is empty ({what} has 0 query rows): nothing to evaluate")
    if num_g == 0:
        raise StrongReIDError(f"the gallery is empty ({what} has 0 gallery items): nothing to rank")
    for name, t in labels.items():
        want = num_q if name.startswith("q_") else num_g
        side = "query" if name.startswith("q_") else "gallery"
        if t.shape[0] != want:
            raise StrongReIDError(
                f"{name} has {t.shape[0]} entries but {what} has {want} {side} items; "
                f"give one {name[2:].rstrip('s')} per {side} image, in the same order"
            )


def _without_junk(labels: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Indices of the gallery items that are not junk (pid -1), None when none is; refuses junk
    queries and an all-junk gallery. `labels` is narrowed to the kept gallery items in place."""
    junk_q = torch.nonzero(labels["q_pids"] == JUNK_PID)
    if junk_q.numel():
        raise StrongReIDError(
            f"q_pids[{int(junk_q[0])}] is {JUNK_PID}, the junk label ({junk_q.numel()} such "
            "queries): a query needs its identity; leave junk images out of the query set"
        )
    junk = labels["g_pids"] == JUNK_PID
    if not bool(junk.any()):
        return None
    keep = torch.nonzero(~junk).squeeze(1)
    if keep.numel() == 0:
        raise StrongReIDError(
            f"all {junk.numel()} gallery items have pid {JUNK_PID} (junk, never ranked): nothing to rank"
        )
    labels["g_pids"], labels["g_camids"] = labels["g_pids"][keep], labels["g_camids"][keep]
    return keep


def _with_junk(res: EvalResult, keep: torch.Tensor | None, num_g: int) -> EvalResult:
    """The result in terms of the whole gallery: its size, the junk count, top-k indices into it."""
    if keep is None:
        return res
    res.num_gallery, res.num_junk = num_g, num_g - int(keep.numel())
    if res.topk_index is not None:
        index = keep.cpu().numpy()
        res.topk_index = np.where(res.topk_index >= 0, index[np.maximum(res.topk_index, 0)], -1)
    return res


class _Evaluator:
    """Accumulates per-query results block by block; `result()` reduces them."""

    def __init__(
        self,
        q_pids: torch.Tensor,
        g_pids: torch.Tensor,
        q_cams: torch.Tensor,
        g_cams: torch.Tensor,
        *,
        max_rank: int,
        ap: str,
        unmatched: str,
        cuhk03: bool,
        seed: int,
        topk: int,
    ) -> None:
        # The bookkeeping below is many small ops: one thread beats two fighting (see serial_cpu).
        with serial_cpu(q_pids.device):
            self.q_cams, self.g_cams = q_cams, g_cams
            self.max_rank, self.ap_mode, self.unmatched = int(max_rank), ap, unmatched
            dev = q_pids.device
            num_q, num_g = q_pids.shape[0], g_pids.shape[0]
            self.num_g = num_g
            self.topk = min(int(topk), num_g) if topk else 0
            # Gallery grouped by pid (stable, so each group lists gallery indices ascending).
            self.g_order = torch.sort(g_pids, stable=True).indices
            uniq, counts = torch.unique_consecutive(g_pids[self.g_order], return_counts=True)
            self.g_uniq, self.g_counts, self.g_starts = uniq, counts, segment_starts(counts)
            slot = torch.searchsorted(uniq, q_pids).clamp(max=max(len(uniq) - 1, 0))
            found = uniq[slot] == q_pids
            self.q_group = torch.where(found, slot, torch.full_like(slot, -1))
            self.q_count = torch.where(found, counts[slot], torch.zeros_like(slot))
            self.q_start = self.g_starts[slot]

            self.num_pos = torch.zeros(num_q, dtype=torch.int64, device=dev)
            self.first_rank = torch.zeros(num_q, dtype=torch.int64, device=dev)
            self.ap = torch.zeros(num_q, dtype=torch.float64, device=dev)
            self.inp = torch.zeros(num_q, dtype=torch.float64, device=dev)
            self.cuhk_cmc = (
                torch.zeros(num_q, self.max_rank, dtype=torch.float64, device=dev) if cuhk03 else None
            )
            if self.topk:
                self.topk_index = torch.full((num_q, self.topk), -1, dtype=torch.int64, device=dev)
                self.topk_dist = torch.full((num_q, self.topk), math.inf, dtype=torch.float32, device=dev)
            if cuhk03:
                self._draw_single_shot(seed, dev)

    def _draw_single_shot(self, seed: int, dev: torch.device) -> None:
        """One representative per gallery pid for each repeat, from a seeded generator."""
        gen = torch.Generator().manual_seed(int(seed))
        num_g, num_groups = self.num_g, len(self.g_uniq)
        group_of = torch.empty(num_g, dtype=torch.int64, device=dev)
        group_of[self.g_order] = torch.repeat_interleave(
            torch.arange(num_groups, device=dev), self.g_counts
        )
        self.repeats = []
        for _ in range(CUHK03_REPEATS):
            # A random priority per image; each pid's representative is its highest priority,
            # a uniform draw among the pid's images.
            prio = torch.randperm(num_g, generator=gen).to(dev)
            inv = torch.empty_like(prio)
            inv[prio] = torch.arange(num_g, device=dev)
            best = torch.full((num_groups,), -1, dtype=torch.int64, device=dev)
            best.scatter_reduce_(0, group_of, prio, reduce="amax")
            self.repeats.append((prio, inv, inv[best]))

    def add(self, start: int, d: torch.Tensor, check_nan: bool = True) -> None:
        """Evaluate queries start..start+len(d)-1 given their distance rows `d` (B x G)."""
        with serial_cpu(d.device):
            self._add(start, d, check_nan)

    def _add(self, start: int, d: torch.Tensor, check_nan: bool) -> None:
        if d.dtype not in (torch.float32, torch.float64):
            d = d.to(torch.float32 if d.is_floating_point() else torch.float64)
        # amax propagates NaN: one read-only pass instead of a mask.
        if check_nan and bool(torch.isnan(d.amax())):
            r, c = (int(v) for v in torch.nonzero(torch.isnan(d))[0])
            raise StrongReIDError(
                f"the distance matrix has NaN (first at query {start + r}, gallery {c}); "
                "NaN features or an overflowing distance: check the model's features"
            )
        num_b = d.shape[0]
        pos_r, pos_c, junk_r, junk_c = self._pid_pairs(start, num_b, d.device)
        num_pos = torch.bincount(pos_r, minlength=num_b)
        self.num_pos[start : start + num_b] = num_pos

        # Only items up to the farthest positive (or the top-k bound) affect a query's numbers.
        pos_d = d[pos_r, pos_c]
        bound = torch.full((num_b,), -math.inf, dtype=d.dtype, device=d.device)
        bound.scatter_reduce_(0, pos_r, pos_d, reduce="amax")
        topk_bound = self._topk_bound(d, junk_r, junk_c) if self.topk else None
        if topk_bound is not None:
            bound = torch.maximum(bound, topk_bound)
        mask = d <= bound[:, None]

        # Rows whose bound admits a large part of the gallery (a weak model) are cheaper to
        # rank by counting against their positives than by sorting their candidates. Every
        # 64th column estimates the share of candidates well enough for this choice.
        share = mask[:, ::_DENSE_SAMPLE_STEP].to(torch.float32).mean(dim=1)
        dense = (share * _DENSE_FRACTION > 1) & (num_pos > 0)
        dense_rank = None
        if bool(dense.any()):
            dense_rank, dense = self._dense_ranks(d, dense, pos_r, pos_c, pos_d, junk_r, junk_c)
            rows_d = torch.nonzero(dense).squeeze(1)
            if topk_bound is not None:  # their top-k still comes from the sorted candidates
                mask[rows_d] = d[rows_d] <= topk_bound[rows_d, None]
            else:
                mask.index_fill_(0, rows_d, False)

        # Sorted candidates: 0 = not one, 1 = candidate, 2 = positive (ranked here).
        flags = mask.view(torch.uint8)
        flags[junk_r, junk_c] = 0
        sparse = ~dense[pos_r]
        flags[pos_r[sparse], pos_c[sparse]] = 2
        cand_r, cand_c, cand_f = sparse_nonzero(flags)
        cand_d = d[cand_r, cand_c]
        perm = order_within_rows(cand_r, cand_d)
        cand_r, cand_c, cand_d = cand_r[perm], cand_c[perm], cand_d[perm]
        is_pos = cand_f[perm] == 2
        # 1-based rank of every candidate among the query's non-junk gallery items.
        per_row = torch.bincount(cand_r, minlength=num_b)
        rank = torch.arange(cand_r.shape[0], device=d.device) - segment_starts(per_row)[cand_r] + 1
        p_row, p_rank = cand_r[is_pos], rank[is_pos]
        if dense_rank is not None:
            # Merge the two sources back into (query, rank) order.
            p_row = torch.cat([p_row, dense_rank[0]])
            p_rank = torch.cat([p_rank, dense_rank[1]])
            order = torch.sort(p_row * (d.shape[1] + 1) + p_rank).indices
            p_row, p_rank = p_row[order], p_rank[order]
        self._score(start, num_pos, p_row, p_rank)

        if self.topk:
            keep = rank <= self.topk
            self.topk_index[start + cand_r[keep], rank[keep] - 1] = cand_c[keep]
            self.topk_dist[start + cand_r[keep], rank[keep] - 1] = cand_d[keep].to(torch.float32)
        if self.cuhk_cmc is not None:
            self._single_shot(start, d, pos_r, pos_c, num_pos > 0)

    def _pid_pairs(
        self, start: int, num_b: int, dev: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, gallery index) of every positive and every junk item of queries in the block.

        Both come from the query's pid group of the gallery: other camera = positive, same
        camera = junk. Rows are block-local and listed in order, gallery indices ascending.
        """
        sl = slice(start, start + num_b)
        counts = self.q_count[sl]
        rows = torch.repeat_interleave(torch.arange(num_b, device=dev), counts)
        cols = self.g_order[torch.repeat_interleave(self.q_start[sl], counts) + ragged_arange(counts)]
        same_cam = self.g_cams[cols] == self.q_cams[sl][rows]
        return rows[~same_cam], cols[~same_cam], rows[same_cam], cols[same_cam]

    def _score(
        self, start: int, num_pos: torch.Tensor, p_row: torch.Tensor, p_rank: torch.Tensor
    ) -> None:
        """AP, INP and first-hit rank from the 1-based ranks of every query's positives.

        `p_row`/`p_rank` list the positives query by query, ranks ascending.
        """
        num_b = num_pos.shape[0]
        dev = num_pos.device
        sl = slice(start, start + num_b)
        hit = ragged_arange(num_pos) + 1  # i: this is the query's i-th positive
        p_rank_f = p_rank.to(torch.float64)
        precision = hit.to(torch.float64) / p_rank_f
        if self.ap_mode == "plain":
            term = precision
        else:
            before = torch.where(
                p_rank > 1, (hit - 1).to(torch.float64) / (p_rank_f - 1).clamp_min(1), 1.0
            )
            term = (before + precision) / 2
        ap_sum = torch.zeros(num_b, dtype=torch.float64, device=dev).index_add_(0, p_row, term)
        valid = num_pos > 0
        self.ap[sl] = torch.where(valid, ap_sum / num_pos.clamp_min(1).to(torch.float64), 0.0)
        first = hit == 1
        self.first_rank[start + p_row[first]] = p_rank[first]
        last = hit == num_pos[p_row]
        last_rank = torch.ones(num_b, dtype=torch.float64, device=dev)
        last_rank[p_row[last]] = p_rank_f[last]
        self.inp[sl] = torch.where(valid, num_pos.to(torch.float64) / last_rank, 0.0)

    @staticmethod
    def _dense_ranks(
        d: torch.Tensor,
        dense: torch.Tensor,
        pos_r: torch.Tensor,
        pos_c: torch.Tensor,
        pos_d: torch.Tensor,
        junk_r: torch.Tensor,
        junk_c: torch.Tensor,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Ranks of the positives of the `dense` rows by counting, without sorting the rows.

        For sorted positive distances v_1 <= ... <= v_R, one searchsorted of the whole row
        against [v_1, next(v_1), v_2, next(v_2), ...] (next = the next float up) counts the
        items strictly below and at-or-below every v_i. Where an item other than the positive
        itself sits exactly at v_i, the tie order needs gallery indices: such rows go back to
        the exact sorting path (the returned `dense` has them cleared).
        Returns ((rows, ranks) of the positives, dense rows kept).
        """
        dev = d.device
        num_b = d.shape[0]
        rows_d = torch.nonzero(dense).squeeze(1)
        local = torch.full((num_b,), -1, dtype=torch.int64, device=dev)
        local[rows_d] = torch.arange(rows_d.shape[0], device=dev)
        sel = dense[pos_r]
        pr, pv = local[pos_r[sel]], pos_d[sel]
        order = order_within_rows(pr, pv)
        pr, pv = pr[order], pv[order]
        m = rows_d.shape[0]
        count = torch.bincount(pr, minlength=m)
        width = int(count.max())
        slot = ragged_arange(count)
        vals = torch.full((m, width), math.inf, dtype=d.dtype, device=dev)
        vals[pr, slot] = pv
        up = torch.nextafter(vals, torch.full_like(vals, math.inf))
        bounds = torch.stack([vals, up], dim=2).reshape(m, 2 * width)
        # searchsorted wants contiguous rows (it would copy a strided block itself, and warn).
        sub = (d if m == num_b else d[rows_d]).contiguous()
        bucket = torch.searchsorted(bounds, sub, right=True, out_int32=True)
        bins = 2 * width + 1
        bucket += (torch.arange(m, device=dev, dtype=torch.int32) * bins)[:, None]
        hist = torch.bincount(bucket.view(-1), minlength=m * bins).view(m, bins)
        below = torch.cumsum(hist, dim=1)[:, : 2 * width].view(m, width, 2)
        less, at_most = below[..., 0], below[..., 1]
        valid_slot = torch.arange(width, device=dev)[None, :] < count[:, None]
        tie = ((at_most - less != 1) & valid_slot).any(dim=1)
        tie |= ((vals[:, 1:] == vals[:, :-1]) & valid_slot[:, 1:]).any(dim=1)
        # Junk strictly below v_i is not part of the ranking: count it per slot and remove.
        jsel = dense[junk_r]
        jr = local[junk_r[jsel]]
        jv = d[junk_r[jsel], junk_c[jsel]]
        jslot = torch.searchsorted(bounds[jr], jv[:, None], right=True).squeeze(1)
        junk_hist = torch.zeros(m, bins, dtype=torch.int64, device=dev)
        junk_hist.index_put_((jr, jslot), torch.ones_like(jr), accumulate=True)
        junk_below = torch.cumsum(junk_hist, dim=1)[:, : 2 * width : 2]
        ranks = (less - junk_below + 1)[pr, slot]
        keep = ~tie[pr]
        still_dense = dense.clone()
        still_dense[rows_d[tie]] = False
        return (rows_d[pr[keep]], ranks[keep]), still_dense

    def _topk_bound(self, d: torch.Tensor, junk_r: torch.Tensor, junk_c: torch.Tensor) -> torch.Tensor:
        """An upper bound of each row's k-th smallest non-junk distance.

        The k-th smallest of any column subset is at least the row's k-th smallest, so a probe
        of the first columns gives a cheap, safe bound; rows whose probe has fewer than k
        non-junk items get +inf (everything is a candidate).
        """
        num_b, num_g = d.shape
        k = self.topk
        width = min(num_g, max(_TOPK_PROBE_COLUMNS, 4 * k))
        probe = d[:, :width].clone()
        inside = junk_c < width
        probe[junk_r[inside], junk_c[inside]] = math.inf
        usable = width - torch.bincount(junk_r[inside], minlength=num_b)
        bound = torch.topk(probe, k, dim=1, largest=False, sorted=False).values.amax(dim=1)
        return torch.where(usable >= k, bound, torch.full_like(bound, math.inf))

    def _single_shot(
        self,
        start: int,
        d: torch.Tensor,
        pos_r: torch.Tensor,
        pos_c: torch.Tensor,
        valid: torch.Tensor,
    ) -> None:
        num_b = d.shape[0]
        dev = d.device
        rows = torch.arange(num_b, device=dev)
        own = self.q_group[start : start + num_b]
        has_own = own >= 0
        ranks_to = torch.arange(1, self.max_rank + 1, device=dev)
        acc = torch.zeros(num_b, self.max_rank, dtype=torch.float64, device=dev)
        for prio, inv, reps in self.repeats:
            # The query's own pid: a random one of its valid (other-camera) matches.
            best = torch.full((num_b,), -1, dtype=torch.int64, device=dev)
            best.scatter_reduce_(0, pos_r, prio[pos_c], reduce="amax")
            chosen = inv[best.clamp_min(0)]
            chosen_d = d[rows, chosen][:, None]
            rep_d = d[:, reps]
            ahead = (rep_d < chosen_d) | ((rep_d == chosen_d) & (reps[None, :] < chosen[:, None]))
            ahead[rows[has_own], own[has_own]] = False
            rank = ahead.sum(dim=1) + 1
            acc += (rank[:, None] <= ranks_to[None, :]).to(torch.float64)
        acc /= CUHK03_REPEATS
        acc[~valid] = 0.0
        self.cuhk_cmc[start : start + num_b] = acc

    def result(self) -> EvalResult:
        with serial_cpu(self.num_pos.device):
            return self._result()

    def _result(self) -> EvalResult:
        num_q = self.num_pos.shape[0]
        valid = (self.num_pos > 0).cpu().numpy()
        num_valid = int(valid.sum())
        ap = self.ap.cpu().numpy()
        inp = self.inp.cpu().numpy()
        if self.cuhk_cmc is not None:
            hits = self.cuhk_cmc.cpu().numpy()
        else:
            first = self.first_rank.cpu().numpy()
            hits = None
        if self.unmatched == "skip":
            denom, num_skipped = num_valid, num_q - num_valid
            ap = np.where(valid, ap, np.nan)
            inp = np.where(valid, inp, np.nan)
            m_ap = float(ap[valid].mean()) if num_valid else math.nan
            m_inp = float(inp[valid].mean()) if num_valid else math.nan
        else:
            denom, num_skipped = num_q, 0
            m_ap, m_inp = float(ap.mean()), float(inp.mean())
        if denom == 0:
            cmc = np.full(self.max_rank, np.nan)
        elif hits is not None:
            cmc = hits.sum(axis=0) / denom
        else:
            matched = first[valid]
            hist = np.bincount(np.minimum(matched, self.max_rank + 1), minlength=self.max_rank + 2)
            cmc = np.cumsum(hist[1 : self.max_rank + 1]) / denom
        if num_valid == 0:
            warnings.warn(
                f"none of the {num_q} queries has a valid match in the gallery (same pid on "
                "another camera), so CMC/mAP/mINP are undefined; check that query and gallery "
                "share identities and that their camera ids differ",
                RuntimeWarning,
                stacklevel=4,
            )
        elif num_skipped:
            logger.info("%d of %d queries have no valid match and were skipped", num_skipped, num_q)
        res = EvalResult(
            cmc=cmc.astype(np.float64),
            mAP=m_ap,
            mINP=m_inp,
            ap=ap,
            inp=inp,
            num_query=num_q,
            num_gallery=self.num_g,
            num_valid=num_valid,
            num_skipped=num_skipped,
        )
        if self.topk:
            res.topk_index = self.topk_index.cpu().numpy()
            res.topk_dist = self.topk_dist.cpu().numpy()
        return res


def _as_distmat(distmat: Any) -> torch.Tensor:
    if isinstance(distmat, torch.Tensor):
        t = distmat.detach()
    else:
        arr = np.asarray(distmat)
        if arr.dtype.kind not in "fiu":
            raise StrongReIDError(f"distmat must hold numbers, got dtype {arr.dtype}")
        t = torch.from_numpy(arr if arr.dtype.kind == "f" else arr.astype(np.float64))
    if t.dim() != 2:
        raise StrongReIDError(
            f"distmat must be a 2-D (num_query x num_gallery) matrix, got shape {tuple(t.shape)}"
        )
    if t.is_complex() or t.dtype == torch.bool:
        raise StrongReIDError(f"distmat must hold real numbers, got dtype {t.dtype}")
    return t


def evaluate(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    *,
    max_rank: int = 50,
    ap: str = "plain",
    unmatched: str = "skip",
    cuhk03: bool = False,
    seed: int = 0,
    topk: int = 0,
    chunk_size: int | None = None,
) -> EvalResult:
    """CMC / mAP / mINP from a query x gallery distance matrix (smaller = more similar).

    `distmat` may be a numpy array or a torch tensor (on CUDA it is evaluated there). It is
    read block by block and never copied whole. `topk` > 0 also returns each query's first
    min(topk, G) non-junk gallery indices and distances (the ranked list the metrics saw).
    """
    _check_options(max_rank, ap, unmatched, topk)
    dist = _as_distmat(distmat)
    dev = dist.device
    labels = {
        "q_pids": _as_labels(q_pids, "q_pids", dev),
        "g_pids": _as_labels(g_pids, "g_pids", dev),
        "q_camids": _as_labels(q_camids, "q_camids", dev),
        "g_camids": _as_labels(g_camids, "g_camids", dev),
    }
    num_q, num_g = dist.shape
    _check_lengths(num_q, num_g, labels, "distmat")
    keep = _without_junk(labels)
    ev = _Evaluator(
        labels["q_pids"], labels["g_pids"], labels["q_camids"], labels["g_camids"],
        max_rank=max_rank, ap=ap, unmatched=unmatched, cuhk03=cuhk03, seed=seed, topk=topk,
    )
    rows = block_rows(num_g, dev, chunk_size)
    for start in range(0, num_q, rows):
        block = dist[start : start + rows]
        ev.add(start, block if keep is None else block.index_select(1, keep))
    return _with_junk(ev.result(), keep, num_g)


def evaluate_features(
    q_feats: Any,
    g_feats: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    *,
    metric: str = "euclidean",
    max_rank: int = 50,
    ap: str = "plain",
    unmatched: str = "skip",
    cuhk03: bool = False,
    seed: int = 0,
    topk: int = 0,
    chunk_size: int | None = None,
    device: Any = None,
) -> EvalResult:
    """`evaluate` on features: distances are computed per block of queries, never as a whole.

    metric "euclidean" is the squared Euclidean distance (the original's), "cosine" 1 - cos.
    Runs on `device` (default: the device of `q_feats` when it is a tensor, else the CPU).
    """
    _check_options(max_rank, ap, unmatched, topk)
    q, g = feature_pair(q_feats, g_feats, device)
    dev = q.device
    labels = {
        "q_pids": _as_labels(q_pids, "q_pids", dev),
        "g_pids": _as_labels(g_pids, "g_pids", dev),
        "q_camids": _as_labels(q_camids, "q_camids", dev),
        "g_camids": _as_labels(g_camids, "g_camids", dev),
    }
    num_g = g.shape[0]
    _check_lengths(q.shape[0], num_g, labels, "the features")
    keep = _without_junk(labels)
    if keep is not None:
        g = g.index_select(0, keep)
    chunks = DistanceChunks(q, g, metric)
    ev = _Evaluator(
        labels["q_pids"], labels["g_pids"], labels["q_camids"], labels["g_camids"],
        max_rank=max_rank, ap=ap, unmatched=unmatched, cuhk03=cuhk03, seed=seed, topk=topk,
    )
    sub = block_rows(g.shape[0], dev, chunk_size)
    for start, block in chunks.blocks(block_rows(g.shape[0], dev, chunk_size, gemm=True)):
        for s in range(0, block.shape[0], sub):
            ev.add(start + s, block[s : s + sub], check_nan=False)
    return _with_junk(ev.result(), keep, num_g)
