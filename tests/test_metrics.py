"""CMC / mAP / mINP: hand-computed cases, a per-query reference, and the config pipeline."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strongreid.config import get_cfg_defaults
from strongreid.errors import StrongReIDError
from strongreid.evaluation import (
    evaluate,
    evaluate_features,
    evaluate_from_config,
    l2_normalize,
    pairwise_distance,
    query_expansion,
    re_ranking,
    save_ranking,
)


def reference(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=50, ap="plain", unmatched="skip"):
    """The textbook evaluator: full stable sort and a loop over queries."""
    distmat = np.asarray(distmat, dtype=np.float64)
    cmcs, aps, inps = [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        junk = (g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i])
        order = order[~junk]
        rel = g_pids[order] == q_pids[i]
        if not rel.any():
            if unmatched == "skip":
                aps.append(np.nan)
                inps.append(np.nan)
            else:
                cmcs.append(np.zeros(max_rank))
                aps.append(0.0)
                inps.append(0.0)
            continue
        ranks = np.nonzero(rel)[0] + 1
        cmc = np.zeros(max_rank)
        if ranks[0] <= max_rank:
            cmc[ranks[0] - 1 :] = 1.0
        cmcs.append(cmc)
        ap_sum = 0.0
        for i_hit, r in enumerate(ranks, start=1):
            if ap == "plain":
                ap_sum += i_hit / r
            else:
                before = (i_hit - 1) / (r - 1) if r > 1 else 1.0
                ap_sum += (i_hit / r + before) / 2
        aps.append(ap_sum / len(ranks))
        inps.append(len(ranks) / ranks[-1])
    cmc = np.mean(cmcs, axis=0) if cmcs else np.full(max_rank, np.nan)
    return cmc, np.array(aps), np.array(inps), order_lists(distmat, q_pids, g_pids, q_cams, g_cams)


def order_lists(distmat, q_pids, g_pids, q_cams, g_cams):
    out = []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        junk = (g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i])
        out.append(order[~junk])
    return out


def quiet_evaluate(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return evaluate(*args, **kwargs)


# ------------------------------------------------------------------ hand-computed cases


def test_worked_example_plain_and_trapezoid():
    # Relevance after sorting: [0, 1, 0, 1, 0] -> CMC [0, 1, 1, 1, 1], AP (1/2 + 2/4) / 2.
    d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]], dtype=np.float32)
    args = (d, [7], [3, 7, 4, 7, 5], [0], [1, 1, 1, 1, 1])
    r = evaluate(*args, max_rank=5)
    np.testing.assert_array_equal(r.cmc, [0, 1, 1, 1, 1])
    assert r.mAP == pytest.approx(0.5)
    assert r.mINP == pytest.approx(2 / 4)
    # Trapezoid: hit 1 at rank 2 -> (1/2 + 0/1)/2; hit 2 at rank 4 -> (2/4 + 1/3)/2.
    t = evaluate(*args, max_rank=5, ap="trapezoid")
    assert t.mAP == pytest.approx(((0.5 + 0.0) / 2 + (0.5 + 1 / 3) / 2) / 2)
    np.testing.assert_array_equal(t.cmc, r.cmc)


def test_trapezoid_first_hit_at_rank_one_counts_precision_one():
    d = np.array([[0.1, 0.2, 0.3]])
    r = evaluate(d, [1], [1, 2, 1], [0], [1, 1, 1], max_rank=3, ap="trapezoid")
    # hit 1 at rank 1: (1 + 1)/2; hit 2 at rank 3: (2/3 + 1/2)/2
    assert r.mAP == pytest.approx((1.0 + (2 / 3 + 1 / 2) / 2) / 2)


def test_same_pid_same_camera_is_removed_but_other_camera_and_distractors_stay():
    # gallery: same pid same cam (junk) nearest, then distractor pid 0, then the true match.
    d = np.array([[0.1, 0.2, 0.3]], dtype=np.float32)
    r = evaluate(d, [5], [5, 0, 5], [2], [2, 0, 1], max_rank=3, topk=3)
    np.testing.assert_array_equal(r.cmc, [0, 1, 1])  # distractor first, then the match
    assert r.mAP == pytest.approx(0.5)
    np.testing.assert_array_equal(r.topk_index, [[1, 2, -1]])
    np.testing.assert_array_equal(r.topk_dist[0, :2], np.array([0.2, 0.3], np.float32))
    assert math.isinf(r.topk_dist[0, 2])


def test_pid_minus_one_gallery_items_are_junk_for_every_query():
    # Query 0 (pid 1, cam 0) and query 1 (pid 2, cam 1) rank the gallery in index order:
    #   0: pid -1   1: pid 2 cam 0   2: pid 1 cam 1   3: pid -1   4: pid 1 cam 0   5: pid 1 cam 2
    # Query 0 without junk (0, 3: pid -1; 4: its own camera): [1, 2, 5], positives at ranks 2, 3.
    # Query 1 without junk (0, 3): [1, 2, 4, 5], its positive (index 1, camera 0) at rank 1.
    d = np.tile(np.arange(6, dtype=np.float32), (2, 1))
    g_pids, g_cams = [-1, 2, 1, -1, 1, 1], [0, 0, 1, 2, 0, 2]
    args = (d, [1, 2], g_pids, [0, 1], g_cams)
    plain = evaluate(*args, max_rank=3, topk=3)
    np.testing.assert_array_equal(plain.cmc, [0.5, 1.0, 1.0])
    np.testing.assert_allclose(plain.ap, [(1 / 2 + 2 / 3) / 2, 1.0])
    assert plain.num_gallery == 6 and plain.num_junk == 2 and plain.to_dict()["num_junk"] == 2
    np.testing.assert_array_equal(plain.topk_index, [[1, 2, 5], [1, 2, 4]])  # whole-gallery indices
    # layumi's evaluate_gpu.py / the Market script: trapezoid AP over the same list.
    trap = evaluate(*args, max_rank=3, ap="trapezoid")
    np.testing.assert_allclose(trap.ap, [((1 / 2 + 0 / 1) / 2 + (2 / 3 + 1 / 2) / 2) / 2, 1.0])
    assert trap.mAP == pytest.approx((0.4166666667 + 1.0) / 2)
    feats = evaluate_features(np.eye(2, dtype=np.float32), np.zeros((6, 2), np.float32) + np.arange(6)[:, None],
                              *args[1:], max_rank=3, topk=3)
    assert feats.num_junk == 2 and (feats.topk_index >= 0).all() and 0 not in feats.topk_index
    assert 3 not in feats.topk_index


def test_junk_queries_and_an_all_junk_gallery_are_refused():
    d = np.zeros((2, 2), np.float32)
    with pytest.raises(StrongReIDError, match=r"q_pids\[1\] is -1, the junk label"):
        evaluate(d, [3, -1], [3, 3], [0, 0], [1, 1])
    with pytest.raises(StrongReIDError, match="all 2 gallery items have pid -1"):
        evaluate(d, [3, 4], [-1, -1], [0, 0], [1, 1])


@settings(max_examples=60, deadline=None)
@given(case=st.data())
def test_junk_items_change_nothing_but_the_indices(case):
    rng = np.random.default_rng(case.draw(st.integers(0, 10_000)))
    num_q, num_g = case.draw(st.integers(1, 5)), case.draw(st.integers(1, 20))
    junk = np.array(case.draw(st.lists(st.booleans(), min_size=num_g, max_size=num_g)))
    if junk.all():
        junk[0] = False
    q_pids, g_pids = rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)
    q_cams, g_cams = rng.integers(0, 2, num_q), rng.integers(0, 2, num_g)
    d = rng.standard_normal((num_q, num_g)).astype(np.float32)
    with_junk = quiet_evaluate(d, q_pids, np.where(junk, -1, g_pids), q_cams, g_cams, max_rank=5, topk=5)
    kept = np.flatnonzero(~junk)
    without = quiet_evaluate(d[:, kept], q_pids, g_pids[kept], q_cams, g_cams[kept], max_rank=5, topk=5)
    np.testing.assert_array_equal(with_junk.ap, without.ap)
    np.testing.assert_array_equal(with_junk.cmc, without.cmc)
    mapped = np.where(without.topk_index >= 0, kept[np.maximum(without.topk_index, 0)], -1)
    np.testing.assert_array_equal(with_junk.topk_index, mapped)
    assert with_junk.num_junk == int(junk.sum()) and with_junk.num_gallery == num_g


def test_ties_are_broken_by_gallery_index():
    d = np.array([[0.5, 0.5, 0.5]], dtype=np.float32)
    first = evaluate(d, [1], [1, 2, 3], [0], [1, 1, 1], max_rank=3)
    last = evaluate(d, [1], [2, 3, 1], [0], [1, 1, 1], max_rank=3)
    assert first.mAP == 1.0 and first.cmc[0] == 1.0
    assert last.mAP == pytest.approx(1 / 3)
    np.testing.assert_array_equal(last.cmc, [0, 0, 1])
    # -0.0 and +0.0 tie as well.
    z = np.array([[0.0, -0.0]], dtype=np.float32)
    assert evaluate(z, [1], [2, 1], [0], [1, 1], max_rank=2).mAP == pytest.approx(0.5)


def test_minp_is_positives_over_rank_of_last_positive():
    # Relevance [1, 0, 0, 1, 0, 1]: INP = 3 / 6.
    d = np.arange(6, dtype=np.float32)[None]
    r = evaluate(d, [1], [1, 2, 3, 1, 4, 1], [0], [1] * 6, max_rank=6)
    assert r.mINP == pytest.approx(0.5)
    assert r.mAP == pytest.approx((1 + 2 / 4 + 3 / 6) / 3)


def test_unmatched_queries_skip_versus_fail():
    d = np.array([[0.1, 0.2], [0.1, 0.2]], dtype=np.float32)
    # query 0 matches at rank 2; query 1 (pid 9) has no match in the gallery.
    args = (d, [1, 9], [2, 1], [0, 0], [1, 1])
    skip = evaluate(*args, max_rank=2)
    assert skip.num_valid == 1 and skip.num_skipped == 1
    assert skip.mAP == pytest.approx(0.5)
    np.testing.assert_array_equal(skip.cmc, [0, 1])
    assert math.isnan(skip.ap[1]) and math.isnan(skip.inp[1])
    fail = evaluate(*args, max_rank=2, unmatched="fail")
    assert fail.num_valid == 1 and fail.num_skipped == 0
    assert fail.mAP == pytest.approx(0.25)
    np.testing.assert_array_equal(fail.cmc, [0, 0.5])
    assert fail.ap[1] == 0.0


def test_query_seen_only_by_its_own_camera_has_no_valid_match():
    d = np.array([[0.1, 0.2], [0.3, 0.1]], dtype=np.float32)
    r = evaluate(d, [1, 2], [1, 2], [0, 0], [0, 1], max_rank=2)
    assert r.num_valid == 1 and r.num_skipped == 1
    assert r.mAP == 1.0


def test_no_valid_query_warns_and_returns_nan():
    d = np.array([[0.1, 0.2]], dtype=np.float32)
    with pytest.warns(RuntimeWarning, match="none of the 1 queries"):
        r = evaluate(d, [1], [1, 1], [0], [0, 0], max_rank=2)
    assert r.num_valid == 0 and r.num_skipped == 1
    assert math.isnan(r.mAP) and math.isnan(r.mINP) and np.isnan(r.cmc).all()
    summary = r.to_dict()
    assert summary["mAP"] is None and summary["rank1"] is None and summary["num_valid"] == 0


def test_gallery_smaller_than_max_rank_keeps_the_curve_flat():
    d = np.array([[0.2, 0.1]], dtype=np.float32)
    r = evaluate(d, [1], [1, 2], [0], [1, 1], max_rank=10, topk=10)
    assert r.cmc.shape == (10,)
    np.testing.assert_array_equal(r.cmc, [0] + [1] * 9)
    assert r.topk_index.shape == (1, 2)  # k is capped at the gallery size
    np.testing.assert_array_equal(r.topk_index, [[1, 0]])
    d = r.to_dict()
    assert d["rank1"] == 0.0 and d["rank5"] == 1.0 and d["rank10"] == 1.0 and len(d["cmc"]) == 10
    assert set(d) >= {"mAP", "mINP", "cmc", "rank1", "rank5", "rank10", "num_query",
                      "num_valid", "num_skipped"}
    assert evaluate(np.zeros((1, 2)), [1], [1, 2], [0], [1, 1], max_rank=3).rank(10) is None


def test_cuhk03_single_shot_with_one_image_per_pid_is_the_plain_cmc():
    rng = np.random.default_rng(3)
    d = rng.random((6, 8)).astype(np.float32)
    q_pids, g_pids = np.array([0, 1, 2, 3, 4, 5]), np.arange(8)
    q_cams, g_cams = np.zeros(6, int), np.ones(8, int)
    plain = evaluate(d, q_pids, g_pids, q_cams, g_cams, max_rank=8)
    single = evaluate(d, q_pids, g_pids, q_cams, g_cams, max_rank=8, cuhk03=True)
    np.testing.assert_allclose(single.cmc, plain.cmc)
    assert single.mAP == pytest.approx(plain.mAP)


def test_cuhk03_single_shot_draws_one_image_per_identity():
    # pid 1 has two valid images (distances 0.2 and 0.4); the other pids one each at 0.1, 0.3,
    # 0.5. Picking the near one gives rank 2, the far one rank 3: over 10 seeded draws the
    # rank-2 CMC is the share of draws that picked it, a multiple of 0.1.
    d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]], dtype=np.float32)
    args = (d, [1], [2, 1, 3, 1, 4], [0], [1, 1, 1, 1, 1])
    r = evaluate(*args, max_rank=5, cuhk03=True, seed=0)
    share = r.cmc[1]
    assert r.cmc[0] == 0.0 and r.cmc[2] == 1.0
    assert share * 10 == pytest.approx(round(share * 10))
    assert r.mAP == pytest.approx(0.5)  # AP is from the full list
    again = evaluate(*args, max_rank=5, cuhk03=True, seed=0)
    np.testing.assert_array_equal(again.cmc, r.cmc)
    shares = {evaluate(*args, max_rank=5, cuhk03=True, seed=s).cmc[1] for s in range(8)}
    assert len(shares) > 1  # the seed matters


def test_distmat_types_torch_float64_and_integers_agree():
    rng = np.random.default_rng(0)
    d = rng.integers(0, 50, (5, 30))
    q_pids, g_pids = rng.integers(0, 4, 5), rng.integers(0, 4, 30)
    q_cams, g_cams = rng.integers(0, 2, 5), rng.integers(0, 3, 30)
    want = quiet_evaluate(d.astype(np.float32), q_pids, g_pids, q_cams, g_cams, max_rank=10)
    for variant in (d, d.astype(np.float64), torch.from_numpy(d.astype(np.float32)),
                    torch.from_numpy(d).to(torch.bfloat16)):
        got = quiet_evaluate(variant, q_pids, g_pids, q_cams, g_cams, max_rank=10)
        np.testing.assert_allclose(got.ap, want.ap)
        np.testing.assert_allclose(got.cmc, want.cmc)
    labels = [torch.as_tensor(x) for x in (q_pids, g_pids, q_cams, g_cams)]
    got = quiet_evaluate(d, *labels, max_rank=10)
    np.testing.assert_allclose(got.ap, want.ap)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(q_pids=[1]), "q_pids has 1 entries"),
        (lambda a: a.update(g_camids=[0, 0, 0, 0]), "g_camids has 4 entries"),
        (lambda a: a.update(distmat=np.zeros((0, 3))), "query set is empty"),
        (lambda a: a.update(distmat=np.zeros((2, 0))), "gallery is empty"),
        (lambda a: a.update(distmat=np.zeros(3)), "2-D"),
        (lambda a: a.update(q_pids=[1.5, 2.0]), "must be integers"),
        (lambda a: a.update(ap="interpolated"), "ap must be"),
        (lambda a: a.update(unmatched="drop"), "unmatched must be"),
        (lambda a: a.update(max_rank=0), "max_rank"),
        (lambda a: a.update(topk=-1), "topk"),
    ],
)
def test_bad_input_is_one_clear_error(change, message):
    args = {"distmat": np.zeros((2, 3)), "q_pids": [1, 2], "g_pids": [1, 2, 3],
            "q_camids": [0, 0], "g_camids": [1, 1, 1]}
    change(args)
    extra = {k: args.pop(k) for k in ("ap", "unmatched", "max_rank", "topk") if k in args}
    with pytest.raises(StrongReIDError, match=message):
        evaluate(args["distmat"], args["q_pids"], args["g_pids"], args["q_camids"],
                 args["g_camids"], **extra)


def test_nan_distance_names_its_position():
    d = np.zeros((2, 3), dtype=np.float32)
    d[1, 2] = np.nan
    with pytest.raises(StrongReIDError, match="query 1, gallery 2"):
        evaluate(d, [1, 2], [1, 2, 3], [0, 0], [1, 1, 1])


def test_feature_errors():
    q, g = np.ones((2, 4), np.float32), np.ones((3, 4), np.float32)
    labels = ([1, 2], [1, 2, 3], [0, 0], [1, 1, 1])
    bad = q.copy()
    bad[1, 3] = np.nan
    with pytest.raises(StrongReIDError, match="q_feats has NaN"):
        evaluate_features(bad, g, *labels)
    with pytest.raises(StrongReIDError, match="dimension"):
        evaluate_features(q, g[:, :3], *labels)
    with pytest.raises(StrongReIDError, match="g_feats is empty"):
        evaluate_features(q, g[:0], [1, 2], [], [0, 0], [])
    with pytest.raises(StrongReIDError, match="metric"):
        evaluate_features(q, g, *labels, metric="manhattan")
    with pytest.raises(StrongReIDError, match="too large"):
        evaluate_features(q * 1e20, g, *labels)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error():
    q = np.ones((2, 4), np.float32)
    with pytest.raises(StrongReIDError, match="CUDA is not available"):
        evaluate_features(q, q, [1, 2], [1, 2], [0, 0], [1, 1], device="cuda")


# ------------------------------------------------------------------ distances and features


def test_distances_are_squared_euclidean_and_one_minus_cosine():
    q = np.array([[0.0, 0.0], [1.0, 0.0]], np.float32)
    g = np.array([[3.0, 4.0], [0.0, 2.0]], np.float32)
    np.testing.assert_allclose(pairwise_distance(q, g).numpy(), [[25, 4], [20, 5]])
    cos = pairwise_distance(q[1:], g, "cosine").numpy()
    np.testing.assert_allclose(cos, [[1 - 0.6, 1.0]], atol=1e-7)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_evaluate_features_equals_evaluate_on_the_same_distances(metric):
    rng = np.random.default_rng(1)
    q, g = rng.standard_normal((37, 8)), rng.standard_normal((120, 8))
    labels = (rng.integers(0, 6, 37), rng.integers(0, 6, 120), rng.integers(0, 3, 37),
              rng.integers(0, 3, 120))
    dist = pairwise_distance(q, g, metric, chunk_size=5)
    want = quiet_evaluate(dist, *labels, max_rank=20, topk=20)
    got = evaluate_features(torch.from_numpy(q), g, *labels, metric=metric, max_rank=20,
                            chunk_size=5, topk=20)
    np.testing.assert_array_equal(got.ap, want.ap)
    np.testing.assert_array_equal(got.cmc, want.cmc)
    np.testing.assert_array_equal(got.topk_index, want.topk_index)
    cmc, aps, inps, _ = reference(dist.numpy(), *labels, max_rank=20)
    np.testing.assert_allclose(got.cmc, cmc)
    np.testing.assert_allclose(got.ap, aps)


def test_weak_model_rows_take_the_counting_path_and_agree_with_the_reference():
    # Random float distances: the farthest positive bounds most of each row, so these rows
    # are ranked by counting rather than by sorting candidates.
    rng = np.random.default_rng(7)
    d = rng.random((40, 3000)).astype(np.float32)
    labels = (rng.integers(0, 30, 40), rng.integers(0, 30, 3000), rng.integers(0, 4, 40),
              rng.integers(0, 4, 3000))
    for ap in ("plain", "trapezoid"):
        got = evaluate(d, *labels, ap=ap, topk=50, chunk_size=16)
        cmc, aps, inps, orders = reference(d, *labels, ap=ap)
        np.testing.assert_allclose(got.cmc, cmc)
        np.testing.assert_allclose(got.ap, aps)
        np.testing.assert_allclose(got.inp, inps)
        np.testing.assert_array_equal(got.topk_index, np.stack([o[:50] for o in orders]))


# ------------------------------------------------------------------ property tests


@st.composite
def eval_cases(draw):
    num_q = draw(st.integers(1, 6))
    num_g = draw(st.integers(1, 25))
    ids = draw(st.integers(1, 5))
    cams = draw(st.integers(1, 3))
    ints = st.lists(st.integers(0, ids - 1), min_size=num_q + num_g, max_size=num_q + num_g)
    pids = np.array(draw(ints))
    camids = np.array(draw(st.lists(st.integers(0, cams - 1), min_size=num_q + num_g,
                                    max_size=num_q + num_g)))
    tied = draw(st.booleans())
    values = st.integers(0, 4) if tied else st.floats(-2, 2, allow_nan=False, width=32)
    flat = draw(st.lists(values, min_size=num_q * num_g, max_size=num_q * num_g))
    dist = np.array(flat, dtype=np.float32).reshape(num_q, num_g)
    return (dist, pids[:num_q], pids[num_q:], camids[:num_q], camids[num_q:],
            draw(st.integers(1, 30)), draw(st.integers(1, 4)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=eval_cases(), ap=st.sampled_from(["plain", "trapezoid"]),
       unmatched=st.sampled_from(["skip", "fail"]), with_topk=st.booleans())
def test_matches_the_reference_on_random_inputs(case, ap, unmatched, with_topk):
    dist, q_pids, g_pids, q_cams, g_cams, max_rank, chunk = case
    got = quiet_evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank, ap=ap,
                         unmatched=unmatched, chunk_size=chunk, topk=max_rank * with_topk)
    cmc, aps, inps, orders = reference(dist, q_pids, g_pids, q_cams, g_cams, max_rank, ap, unmatched)
    np.testing.assert_allclose(got.ap, aps, equal_nan=True)
    np.testing.assert_allclose(got.inp, inps, equal_nan=True)
    if got.num_valid or unmatched == "fail":
        np.testing.assert_allclose(got.cmc, cmc)
        assert got.mAP == pytest.approx(np.nanmean(aps))
    assert got.num_valid == int(np.sum([len(o) and (g_pids[o] == p).any()
                                        for o, p in zip(orders, q_pids)]))
    if not with_topk:
        assert got.topk_index is None
        return
    k = min(max_rank, len(g_pids))
    for row, order in zip(got.topk_index, orders):
        want = np.full(k, -1)
        want[: min(k, len(order))] = order[:k]
        np.testing.assert_array_equal(row, want)


@settings(max_examples=60, deadline=None)
@given(case=eval_cases())
def test_chunking_and_single_shot_invariants(case):
    dist, q_pids, g_pids, q_cams, g_cams, max_rank, chunk = case
    whole = quiet_evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank, cuhk03=True)
    parts = quiet_evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank, cuhk03=True,
                           chunk_size=chunk)
    np.testing.assert_array_equal(whole.cmc, parts.cmc)
    if whole.num_valid:
        assert np.all(np.diff(whole.cmc) >= -1e-12)  # a CMC never decreases
        assert 0.0 <= whole.cmc[-1] <= 1.0
        plain = quiet_evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)
        assert whole.mAP == pytest.approx(plain.mAP)


# ------------------------------------------------------------------ query expansion


def test_query_expansion_hand_computed():
    q = np.array([[1.0, 0.0]], np.float32)
    g = np.array([[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    # k=3: itself (weight 1) and the two most similar gallery items (cos 0.6 and 0), alpha 2.
    out = query_expansion(q, g, k=3, alpha=2.0)
    np.testing.assert_allclose(out, [[(1 + 0.36 * 0.6) / 3, (0.36 * 0.8) / 3]], rtol=1e-6)
    np.testing.assert_allclose(query_expansion(q, g, k=1), q)
    # A negative similarity gets weight 0; k larger than the gallery uses all of it.
    many = query_expansion(torch.from_numpy(q), g, k=10, alpha=1.0)
    assert isinstance(many, torch.Tensor)
    np.testing.assert_allclose(many.numpy(), [[(1 + 0.36) / 4, 0.48 / 4]], rtol=1e-6)
    with pytest.raises(StrongReIDError, match="TEST.QE_K"):
        query_expansion(q, g, k=0)


# ------------------------------------------------------------------ config pipeline and files


def _pipeline_data():
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((8, 16))
    q_pids, g_pids = rng.integers(0, 8, 20), rng.integers(0, 8, 60)
    q = centers[q_pids] + 0.7 * rng.standard_normal((20, 16))
    g = centers[g_pids] + 0.7 * rng.standard_normal((60, 16))
    return q.astype(np.float32), g.astype(np.float32), q_pids, g_pids, np.zeros(20, int), np.ones(60, int)


def test_evaluate_from_config_applies_norm_qe_metric_and_reranking(tmp_path):
    q, g, q_pids, g_pids, q_cams, g_cams = _pipeline_data()
    labels = (q_pids, g_pids, q_cams, g_cams)
    cfg = get_cfg_defaults()
    cfg.TEST.MAX_RANK = 10
    cfg.TEST.RE_RANKING = "yes"
    cfg.TEST.QUERY_EXPANSION = True
    cfg.TEST.AP = "trapezoid"
    out = evaluate_from_config(cfg, q, g, *labels)
    assert set(out) == {"plain", "reranked"}
    qn, gn = l2_normalize(torch.from_numpy(q)), l2_normalize(torch.from_numpy(g))
    qe = l2_normalize(query_expansion(qn, gn, k=5, alpha=3.0))
    plain = evaluate_features(qe, gn, *labels, max_rank=10, ap="trapezoid")
    np.testing.assert_array_equal(out["plain"].ap, plain.ap)
    reranked = evaluate(re_ranking(qe, gn), *labels, max_rank=10, ap="trapezoid")
    np.testing.assert_array_equal(out["reranked"].ap, reranked.ap)
    assert out["plain"].topk_index.shape == (20, 10)

    cfg.TEST.RE_RANKING = "no"
    cfg.TEST.QUERY_EXPANSION = False
    cfg.TEST.FEAT_NORM = "no"
    cfg.TEST.METRIC = "cosine"
    only = evaluate_from_config(cfg, q, g, *labels)
    assert set(only) == {"plain"}
    want = evaluate_features(q, g, *labels, metric="cosine", max_rank=10, ap="trapezoid")
    np.testing.assert_array_equal(only["plain"].ap, want.ap)

    path = tmp_path / "run" / "ranking.npz"
    q_paths = [f"q/{i}.jpg" for i in range(20)]
    g_paths = [f"g/{i}.jpg" for i in range(60)]
    save_ranking(str(path), only["plain"], q_paths, g_paths, *labels)
    with np.load(path, allow_pickle=False) as f:
        assert f["topk_index"].shape == (20, 10) and f["topk_index"].dtype == np.int64
        assert f["topk_dist"].dtype == np.float32
        np.testing.assert_array_equal(f["ap"], only["plain"].ap)
        assert list(f["g_paths"][:2]) == ["g/0.jpg", "g/1.jpg"]
        np.testing.assert_array_equal(f["q_pids"], q_pids)
        np.testing.assert_array_equal(f["cmc"], only["plain"].cmc)
    assert [p.name for p in path.parent.iterdir()] == ["ranking.npz"]
    no_lists = evaluate(np.zeros((1, 1)), [1], [1], [0], [1])
    with pytest.raises(StrongReIDError, match="no ranked lists"):
        save_ranking(str(path), no_lists, ["a"], ["b"], [1], [1], [0], [1])
    with pytest.raises(StrongReIDError, match="q_paths has 3 entries"):
        save_ranking(str(path), only["plain"], q_paths[:3], g_paths, *labels)


# ------------------------------------------------------------------ ordering helpers


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=60))
def test_orderable_keys_sort_like_the_floats(values):
    from strongreid.evaluation.selection import (
        orderable_int32,
        split_value_index_keys,
        value_index_keys,
    )

    v = torch.tensor(values, dtype=torch.float32)
    keys = orderable_int32(v)
    for i in range(len(values)):
        np.testing.assert_array_equal((keys[i] < keys).numpy(), (v[i] < v).numpy())
        np.testing.assert_array_equal((keys[i] == keys).numpy(), (v[i] == v).numpy())
    index = torch.arange(len(values))
    back_v, back_i = split_value_index_keys(value_index_keys(v, index))
    np.testing.assert_array_equal(back_v.numpy(), (v + 0.0).numpy())  # -0.0 comes back as 0.0
    np.testing.assert_array_equal(back_i.numpy(), index.numpy())


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 23), density=st.floats(0, 1), seed=st.integers(0, 99))
def test_sparse_nonzero_equals_nonzero(rows, cols, density, seed):
    from strongreid.evaluation.selection import sparse_nonzero

    gen = torch.Generator().manual_seed(seed)
    flags = (torch.rand(rows, cols, generator=gen) < density).to(torch.uint8)
    flags *= torch.randint(1, 3, (rows, cols), generator=gen, dtype=torch.uint8)
    r, c, v = sparse_nonzero(flags)
    want = torch.nonzero(flags)
    np.testing.assert_array_equal(r.numpy(), want[:, 0].numpy())
    np.testing.assert_array_equal(c.numpy(), want[:, 1].numpy())
    np.testing.assert_array_equal(v.numpy(), flags[want[:, 0], want[:, 1]].numpy())


def test_config_switch_selects_the_single_gallery_shot_cmc():
    from strongreid.config import load_config
    from strongreid.evaluation import evaluate, evaluate_from_config

    rng = np.random.default_rng(5)
    q, g = rng.standard_normal((6, 8)).astype(np.float32), rng.standard_normal((30, 8)).astype(np.float32)
    q_pids, g_pids = np.arange(6) % 3, np.arange(30) % 3
    q_cams, g_cams = np.zeros(6, np.int64), np.ones(30, np.int64)
    plain = evaluate_from_config(load_config(None, ["TEST.FEAT_NORM", "no"]), q, g, q_pids, g_pids, q_cams, g_cams)
    sgs = evaluate_from_config(load_config(None, ["TEST.FEAT_NORM", "no", "TEST.CUHK03_METRIC", "True"]),
                               q, g, q_pids, g_pids, q_cams, g_cams)
    dist = ((q[:, None] - g[None]) ** 2).sum(-1)
    want = evaluate(dist, q_pids, g_pids, q_cams, g_cams, cuhk03=True, seed=0)
    np.testing.assert_allclose(sgs["plain"].cmc, want.cmc, atol=1e-6)
    assert sgs["plain"].mAP == pytest.approx(plain["plain"].mAP, abs=1e-6)
    assert not np.allclose(sgs["plain"].cmc, plain["plain"].cmc)
