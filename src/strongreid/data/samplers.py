"""Training samplers: the P×K identity sampler of reid-strong-baseline, its rank-aware form, and a shuffle.

Every sampler draws from its own NumPy generator seeded by (seed, epoch), never from the
global RNGs, so an epoch's order depends only on those two numbers: `set_epoch(e)` moves to
another order and every rank of a distributed run computes the same global sequence.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from strongreid.errors import ConfigError, DatasetError


def _generator(seed: int, epoch: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))


def _check_seed_epoch(seed: int, epoch: int) -> None:
    if seed < 0 or epoch < 0:
        raise ConfigError(f"sampler seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")


class RandomIdentitySampler(Sampler[int]):
    """P identities × K images per batch, with the original's epoch construction.

    Per identity: its indices (K drawn with replacement when it has fewer than K), shuffled,
    cut into chunks of K with the n mod K leftover dropped. Then batches of P distinct
    identities drawn uniformly without replacement each pop one chunk; identities run out of
    chunks, and once fewer than P remain their chunks are discarded. Every P·K consecutive
    indices are therefore P whole identities, and the epoch length is a multiple of P·K.
    """

    def __init__(
        self,
        records: Sequence[Sequence[Any]],
        batch_size: int,
        num_instances: int,
        seed: int = 0,
    ) -> None:
        batch_size, num_instances = int(batch_size), int(num_instances)
        if num_instances < 1:
            raise ConfigError(f"DATALOADER.NUM_INSTANCE (K) must be >= 1, got {num_instances}")
        if batch_size < num_instances or batch_size % num_instances != 0:
            raise ConfigError(
                f"SOLVER.IMS_PER_BATCH={batch_size} must be a multiple of DATALOADER.NUM_INSTANCE="
                f"{num_instances}: batch-hard triplet mining needs whole identities of K images"
            )
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_pids_per_batch = batch_size // num_instances
        self.index_dic: dict[int, list[int]] = {}
        for index, record in enumerate(records):
            self.index_dic.setdefault(int(record[1]), []).append(index)
        self.pids = list(self.index_dic)  # first-appearance order, as the original
        if not self.pids:
            raise DatasetError("the training set is empty; check the dataset folder and its layout")
        if len(self.pids) < self.num_pids_per_batch:
            raise ConfigError(
                f"the training set has {len(self.pids)} identities but a batch needs P = "
                f"{self.num_pids_per_batch} (SOLVER.IMS_PER_BATCH={batch_size} / "
                f"DATALOADER.NUM_INSTANCE={num_instances}); lower IMS_PER_BATCH or add identities"
            )
        _check_seed_epoch(int(seed), 0)
        self.seed = int(seed)
        self.epoch = 0
        self._cache: tuple[int, list[int]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration emits."""
        _check_seed_epoch(self.seed, int(epoch))
        self.epoch = int(epoch)

    def epoch_indices(self) -> list[int]:
        """The full index sequence of the current epoch (computed once per epoch)."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._build(self.epoch))
        return self._cache[1]

    def _build(self, epoch: int) -> list[int]:
        rng = _generator(self.seed, epoch)
        k = self.num_instances
        chunks: dict[int, list[list[int]]] = {}
        for pid in self.pids:
            idxs = self.index_dic[pid]
            if len(idxs) < k:
                drawn = rng.choice(idxs, size=k, replace=True)
            else:
                drawn = rng.permutation(idxs)
            usable = len(drawn) - len(drawn) % k
            chunks[pid] = [drawn[i : i + k].tolist() for i in range(0, usable, k)]

        available = list(self.pids)
        out: list[int] = []
        p = self.num_pids_per_batch
        while len(available) >= p:
            picks = rng.choice(len(available), size=p, replace=False)
            chosen = [available[i] for i in picks]
            for pid in chosen:
                out.extend(chunks[pid].pop(0))
            exhausted = {pid for pid in chosen if not chunks[pid]}
            if exhausted:
                available = [pid for pid in available if pid not in exhausted]
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices())

    def global_positions(self, n: int) -> np.ndarray:
        """One process draws the whole epoch: positions are 0..n-1."""
        return np.arange(n)

    def __len__(self) -> int:
        return len(self.epoch_indices())

    def length_upper_bound(self) -> int:
        """The original's pre-iteration estimate Σ (m − m mod K), m = max(n_pid, K)."""
        k = self.num_instances
        total = 0
        for idxs in self.index_dic.values():
            m = max(len(idxs), k)
            total += m - m % k
        return total


class DistributedIdentitySampler(Sampler[int]):
    """The rank-r share of a global P×K identity sequence, so each rank holds whole identities.

    All ranks build the same global sequence (same seed and epoch). Every global batch of P·K
    indices is P consecutive identities; rank r takes the r-th contiguous block of P·K/W of it,
    i.e. P/W identities × K images. The union over ranks is the single-process epoch.
    """

    def __init__(
        self,
        records: Sequence[Sequence[Any]],
        batch_size: int,
        num_instances: int,
        rank: int,
        world_size: int,
        seed: int = 0,
    ) -> None:
        world_size, rank = int(world_size), int(rank)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"invalid distributed rank {rank} for world size {world_size}")
        self.global_sampler = RandomIdentitySampler(records, batch_size, num_instances, seed)
        p = self.global_sampler.num_pids_per_batch
        if p % world_size != 0:
            raise ConfigError(
                f"P = {p} identities per global batch (SOLVER.IMS_PER_BATCH={batch_size} / "
                f"DATALOADER.NUM_INSTANCE={num_instances}) is not divisible by the world size "
                f"{world_size}; set IMS_PER_BATCH to NUM_INSTANCE × a multiple of {world_size}"
            )
        self.rank = rank
        self.world_size = world_size
        self.batch_size = int(batch_size)
        self.local_batch_size = self.batch_size // world_size

    @property
    def epoch(self) -> int:
        return self.global_sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; every rank must be given the same one."""
        self.global_sampler.set_epoch(epoch)

    def epoch_indices(self) -> list[int]:
        """This rank's indices for the current epoch."""
        full = self.global_sampler.epoch_indices()
        share = self.local_batch_size
        start = self.rank * share
        out: list[int] = []
        for batch_start in range(0, len(full), self.batch_size):
            offset = batch_start + start
            out.extend(full[offset : offset + share])
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices())

    def global_positions(self, n: int) -> np.ndarray:
        """Where this rank's i-th index sits in the single-process epoch."""
        i = np.arange(n)
        share = self.local_batch_size
        return (i // share) * self.batch_size + self.rank * share + i % share

    def __len__(self) -> int:
        return len(self.global_sampler) // self.world_size


class ShuffledSampler(Sampler[int]):
    """A seeded random permutation per epoch (the 'softmax' sampler), sharded across ranks.

    With W ranks the permutation is padded by wrapping around to a multiple of W, so every rank
    gets the same number of indices (DDP needs equal batch counts), and rank r takes every W-th.
    """

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        num_samples, rank, world_size = int(num_samples), int(rank), int(world_size)
        if num_samples < 1:
            raise DatasetError("the training set is empty; check the dataset folder and its layout")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"invalid distributed rank {rank} for world size {world_size}")
        _check_seed_epoch(int(seed), 0)
        self.num_samples = num_samples
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration emits."""
        _check_seed_epoch(self.seed, int(epoch))
        self.epoch = int(epoch)

    def epoch_indices(self) -> list[int]:
        perm = _generator(self.seed, self.epoch).permutation(self.num_samples)
        total = len(self) * self.world_size
        if total > self.num_samples:
            perm = np.resize(perm, total)  # repeats from the start to fill the last round
        return perm[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices())

    def global_positions(self, n: int) -> np.ndarray:
        """Where this rank's i-th index sits in the (padded) single-process permutation."""
        return np.arange(n) * self.world_size + self.rank

    def __len__(self) -> int:
        return (self.num_samples + self.world_size - 1) // self.world_size
