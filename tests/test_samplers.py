"""Identity, distributed and shuffled samplers: invariants, hand-worked epochs, determinism."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strongreid.data.samplers import (
    DistributedIdentitySampler,
    RandomIdentitySampler,
    ShuffledSampler,
)
from strongreid.errors import ConfigError, DatasetError


def make_records(counts: list[int], order: list[int] | None = None) -> list[tuple[str, int, int]]:
    """`counts[p]` images for pid p; `order` optionally permutes the record list."""
    records = [(f"p{pid}_{i}.jpg", pid, i % 3) for pid, n in enumerate(counts) for i in range(n)]
    if order is not None:
        records = [records[i] for i in order]
    return records


@st.composite
def pk_setups(draw: st.DrawFn, max_world: int = 1) -> tuple:
    k = draw(st.integers(1, 5))
    world = draw(st.integers(1, max_world))
    p = world * draw(st.integers(1, max(1, 8 // world)))
    counts = draw(st.lists(st.integers(1, 12), min_size=p, max_size=p + 25))
    total = sum(counts)
    order = draw(st.permutations(range(total)))
    seed = draw(st.integers(0, 2**31 - 1))
    epoch = draw(st.integers(0, 1000))
    return make_records(counts, order), p, k, world, seed, epoch


def check_pk_epoch(records: list, indices: list[int], p: int, k: int) -> None:
    """Assert the P x K sampler's invariants for one emitted epoch."""
    pids = [records[i][1] for i in indices]
    assert all(0 <= i < len(records) for i in indices)
    assert len(indices) % (p * k) == 0
    for start in range(0, len(indices), p * k):
        batch = pids[start : start + p * k]
        # P consecutive chunks of K images of one identity each, all identities distinct.
        chunk_pids = [batch[j] for j in range(0, p * k, k)]
        assert len(set(chunk_pids)) == p
        for j, pid in enumerate(chunk_pids):
            assert batch[j * k : (j + 1) * k] == [pid] * k

    by_pid: dict[int, list[int]] = {}
    for i, rec in enumerate(records):
        by_pid.setdefault(rec[1], []).append(i)
    emitted = Counter(pids)
    pids_with_chunks_left = 0
    for pid, own in by_pid.items():
        chunks_total = max(len(own), k) // k
        chunks_used = emitted[pid] // k
        assert chunks_used <= chunks_total
        pids_with_chunks_left += chunks_used < chunks_total
        mine = [i for i in indices if records[i][1] == pid]
        assert set(mine) <= set(own)
        if len(own) >= k:
            # Drawn without replacement: an image appears at most once per epoch.
            assert len(mine) == len(set(mine))
    # The epoch only ends when fewer than P identities still have a chunk (step 3).
    assert pids_with_chunks_left < p


@settings(max_examples=80, deadline=None)
@given(pk_setups())
def test_identity_sampler_invariants(setup: tuple) -> None:
    records, p, k, _, seed, epoch = setup
    sampler = RandomIdentitySampler(records, p * k, k, seed=seed)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    assert len(sampler) == len(indices)
    assert len(indices) <= sampler.length_upper_bound()
    check_pk_epoch(records, indices, p, k)
    again = RandomIdentitySampler(records, p * k, k, seed=seed)
    again.set_epoch(epoch)
    assert list(again) == indices


def test_hand_worked_epoch_always_two_batches() -> None:
    # K=2, P=2. A: 5 images -> 2 chunks (1 dropped); B: 1 image -> 2 draws with replacement ->
    # 1 chunk; C: 4 images -> 2 chunks. 5 chunks in all, upper bound 4 + 2 + 4 = 10 indices.
    # Each batch uses 2 of the 5 chunks; after any first batch, 3 chunks remain spread over at
    # least 2 identities, and after the second at most 1 chunk (one identity) remains, so every
    # epoch has exactly 2 batches = 8 indices. B is left out when both batches are {A, C}.
    records = make_records([5, 1, 4])
    b_seen = 0
    for seed in range(20):
        sampler = RandomIdentitySampler(records, batch_size=4, num_instances=2, seed=seed)
        assert sampler.length_upper_bound() == 10
        indices = list(sampler)
        assert len(indices) == len(sampler) == 8
        b_images = [i for i in indices if records[i][1] == 1]
        assert b_images in ([], [5, 5])  # B's single image, drawn twice
        b_seen += bool(b_images)
    assert 0 < b_seen < 20


def test_hand_worked_epoch_discards_lonely_identity() -> None:
    # K=4, P=2. A: 9 images -> 2 chunks; B: 3 -> 1 chunk (with replacement); C: 4 -> 1 chunk.
    # First batch {B, C}: A is left alone with 2 chunks -> 8 indices. First batch {A, B} or
    # {A, C}: A and the identity left out make a second batch -> 16 indices.
    records = make_records([9, 3, 4])
    lengths = set()
    for seed in range(60):
        sampler = RandomIdentitySampler(records, batch_size=8, num_instances=4, seed=seed)
        assert sampler.length_upper_bound() == 16
        indices = list(sampler)
        assert len(sampler) == len(indices)
        lengths.add(len(indices))
        if len(indices) == 8:
            assert {records[i][1] for i in indices} == {1, 2}
        else:
            assert len(indices) == 16
            # A gave both its chunks (one per batch), B and C one each.
            assert Counter(records[i][1] for i in indices) == {0: 8, 1: 4, 2: 4}
    assert lengths == {8, 16}


def test_epochs_and_seeds_change_the_order() -> None:
    records = make_records([8] * 20)
    sampler = RandomIdentitySampler(records, batch_size=16, num_instances=4, seed=3)
    orders = []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert len({tuple(o) for o in orders}) == 5
    sampler.set_epoch(2)
    assert list(sampler) == orders[2]
    other_seed = RandomIdentitySampler(records, batch_size=16, num_instances=4, seed=4)
    other_seed.set_epoch(2)
    assert list(other_seed) != orders[2]


def test_identity_sampler_errors() -> None:
    records = make_records([4, 4, 4])
    with pytest.raises(ConfigError, match="IMS_PER_BATCH=6 must be a multiple"):
        RandomIdentitySampler(records, batch_size=6, num_instances=4)
    with pytest.raises(ConfigError, match="has 3 identities but a batch needs P = 4"):
        RandomIdentitySampler(records, batch_size=16, num_instances=4)
    with pytest.raises(ConfigError, match="NUM_INSTANCE"):
        RandomIdentitySampler(records, batch_size=4, num_instances=0)
    with pytest.raises(DatasetError, match="empty"):
        RandomIdentitySampler([], batch_size=4, num_instances=2)


@settings(max_examples=60, deadline=None)
@given(pk_setups(max_world=4))
def test_distributed_union_is_single_process_epoch(setup: tuple) -> None:
    records, p, k, world, seed, epoch = setup
    single = RandomIdentitySampler(records, p * k, k, seed=seed)
    single.set_epoch(epoch)
    expected = list(single)
    shards = []
    for rank in range(world):
        sampler = DistributedIdentitySampler(records, p * k, k, rank, world, seed=seed)
        sampler.set_epoch(epoch)
        shard = list(sampler)
        assert len(sampler) == len(shard) == len(expected) // world
        # Each rank's batch is P/W whole identities × K images.
        check_pk_epoch_blocks(records, shard, p // world, k)
        shards.append(shard)
    share = p * k // world
    rebuilt = []
    for batch in range(len(expected) // (p * k)):
        for shard in shards:
            rebuilt.extend(shard[batch * share : (batch + 1) * share])
    assert rebuilt == expected


def check_pk_epoch_blocks(records: list, indices: list[int], p: int, k: int) -> None:
    pids = [records[i][1] for i in indices]
    assert len(indices) % (p * k) == 0
    for start in range(0, len(indices), p * k):
        batch = pids[start : start + p * k]
        assert len(set(batch)) == p
        assert all(c == k for c in Counter(batch).values())


def test_distributed_errors_and_epoch() -> None:
    records = make_records([4] * 12)
    with pytest.raises(ConfigError, match="P = 3 identities .* not divisible by the world size 2"):
        DistributedIdentitySampler(records, 12, 4, rank=0, world_size=2)
    with pytest.raises(ConfigError, match="invalid distributed rank 2"):
        DistributedIdentitySampler(records, 16, 4, rank=2, world_size=2)
    sampler = DistributedIdentitySampler(records, 16, 4, rank=1, world_size=2, seed=5)
    assert sampler.local_batch_size == 8
    first = list(sampler)
    sampler.set_epoch(1)
    assert sampler.epoch == 1
    assert list(sampler) != first


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    world=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    epoch=st.integers(0, 100),
)
def test_shuffled_sampler_shards(n: int, world: int, seed: int, epoch: int) -> None:
    shards = []
    for rank in range(world):
        sampler = ShuffledSampler(n, seed=seed, rank=rank, world_size=world)
        sampler.set_epoch(epoch)
        shard = list(sampler)
        assert len(shard) == len(sampler) == -(-n // world)
        shards.append(shard)
    merged = [i for shard in shards for i in shard]
    assert set(merged) == set(range(n))
    # Padding repeats at most world - 1 indices.
    assert len(merged) - n == (-n) % world
    if world == 1:
        assert sorted(merged) == list(range(n))


def test_shuffled_sampler_epochs() -> None:
    sampler = ShuffledSampler(50, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second
    sampler.set_epoch(0)
    assert list(sampler) == first
    with pytest.raises(DatasetError, match="empty"):
        ShuffledSampler(0)
