"""The synthetic pedestrian data set: layout, names, determinism, splits, CLI, errors."""

from __future__ import annotations

import importlib.util
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from strongreid.cli import main
from strongreid.data import synthetic as syn
from strongreid.errors import StrongReIDError

NAME = re.compile(r"^(\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")
ROOT = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, list[tuple[int, int, str]]]:
    """split -> [(pid, cam, name)], parsed with the Market pattern (fails on any other name)."""
    out = {}
    for split in syn.SPLITS:
        rows = []
        for path in sorted((root / split).iterdir()):
            m = NAME.match(path.name)
            assert m is not None, path.name
            rows.append((int(m.group(1)), int(m.group(2)), path.name))
        out[split] = rows
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("syn") / "synthetic"
    counts = syn.generate(root, ids=12, cams=3, images_per_id=5, seed=3)
    return root, counts


def test_market_name_format():
    assert syn.market_name(7, 3, 2, 1234) == "0007_c3s2_001234_01.jpg"
    assert syn.market_name(1501, 6, 6, 999_999, 12) == "1501_c6s6_999999_12.jpg"


def test_tree_counts_and_names(small):
    root, counts = small
    tree = _tree(root)
    assert counts["train_images"] == len(tree["bounding_box_train"]) == 6 * 5
    assert counts["query_images"] == len(tree["query"])
    assert counts["gallery_images"] == len(tree["bounding_box_test"])
    assert counts["images"] == sum(len(v) for v in tree.values())
    # 12 ids: 6 train, 6 test, each with exactly 5 images; 12 // 8 = 1 distractor.
    assert (counts["ids"], counts["train_ids"], counts["test_ids"]) == (12, 6, 6)
    assert counts["distractors"] == 1
    per_pid = defaultdict(int)
    for rows in tree.values():
        for pid, cam, _ in rows:
            assert 1 <= cam <= 3
            per_pid[pid] += 1
    assert per_pid.pop(0) == 1
    assert sorted(per_pid) == list(range(1, 13))
    assert set(per_pid.values()) == {5}


def test_images_are_128x64_rgb_jpegs(small):
    root, _ = small
    for path in root.rglob("*.jpg"):
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (64, 128))


def test_train_and_test_ids_disjoint(small):
    tree = _tree(small[0])
    train = {pid for pid, _, _ in tree["bounding_box_train"]}
    test = {pid for pid, _, _ in tree["query"] + tree["bounding_box_test"]}
    assert 0 not in train and not train & test
    assert {pid for pid, _, _ in tree["query"]} == test - {0}


def test_every_query_has_a_gallery_match_in_another_camera(small):
    tree = _tree(small[0])
    gallery = {(pid, cam) for pid, cam, _ in tree["bounding_box_test"]}
    for pid, cam, name in tree["query"]:
        assert any(p == pid and c != cam for p, c in gallery), name


def test_deterministic_bytes_whatever_the_workers(tmp_path, small):
    root, _ = small
    again = tmp_path / "again"
    syn.generate(again, ids=12, cams=3, images_per_id=5, seed=3, workers=2)
    assert _files(again) == _files(root)
    assert (again / "synthetic.json").read_text() == (root / "synthetic.json").read_text()


def test_another_seed_gives_other_images(tmp_path, small):
    other = tmp_path / "other"
    syn.generate(other, ids=12, cams=3, images_per_id=5, seed=4)
    a, b = _files(small[0]), _files(other)
    assert len(a) == len(b)
    assert not set(a.values()) & set(b.values())


def test_an_image_depends_on_seed_pid_camera_and_index_only():
    """Not on the split or the file name, so growing --ids keeps every existing person."""
    assert syn.make_identity(5, 9) == syn.make_identity(5, 9)
    assert syn.make_identity(5, 9) != syn.make_identity(5, 10)
    a = syn.render(5, syn.Shot(9, 2, 0, syn.SPLITS[0], "x.jpg"))
    b = syn.render(5, syn.Shot(9, 2, 0, syn.SPLITS[2], "y.jpg"))
    c = syn.render(5, syn.Shot(9, 2, 1, syn.SPLITS[0], "x.jpg"))
    assert a.size == (64, 128) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def _nearest(colour, names):
    return min(names, key=lambda n: sum((a - b) ** 2 for a, b in zip(colour, syn.CLOTH[n])))


def test_colours_are_shared_but_identities_are_not():
    """Colour alone must not name a person: many share a top/bottom pair, few share everything."""
    idents = [syn.make_identity(0, pid) for pid in range(1, 301)]
    tops = [n for n, _ in syn.TOP_COLOURS]
    bottoms = [n for n, _ in syn.BOTTOM_COLOURS]
    pairs = defaultdict(int)
    signatures = set()
    for ident in idents:
        pair = (_nearest(ident.top, tops), _nearest(ident.bottom, bottoms))
        pairs[pair] += 1
        signatures.add(
            (
                *pair,
                ident.top_kind,
                ident.top_pattern,
                ident.bottom_kind,
                ident.bottom_stripe,
                ident.bag,
                ident.hair_style,
                ident.scarf is None,
            )
        )
    assert len(pairs) <= len(tops) * len(bottoms)
    # The commonest colour pair is worn by many people...
    assert max(pairs.values()) >= 15
    # ...yet nearly everyone differs in garment shape, pattern, bag or hair.
    assert len(signatures) >= 0.9 * len(idents)


@settings(max_examples=40, deadline=None)
@given(
    ids=st.integers(4, 60),
    cams=st.integers(2, 9),
    k=st.integers(2, 16),
    seed=st.integers(0, 2**31),
)
def test_plan_invariants(ids, cams, k, seed):
    shots = syn.plan(ids, cams, k, seed)
    names = [s.name for s in shots]
    assert len(set(names)) == len(names)
    by_pid = defaultdict(list)
    for s in shots:
        m = NAME.match(s.name)
        assert m is not None and int(m.group(1)) == s.pid and int(m.group(2)) == s.cam
        assert 1 <= s.cam <= cams
        by_pid[s.pid].append(s)
    distractors = by_pid.pop(0)
    assert len(distractors) == max(1, ids // 8)
    assert all(s.split == syn.SPLITS[2] for s in distractors)
    assert sorted(by_pid) == list(range(1, ids + 1))
    train = [p for p, ss in by_pid.items() if ss[0].split == syn.SPLITS[0]]
    assert len(train) == ids // 2
    for pid, ss in by_pid.items():
        assert len(ss) == k
        assert len({s.cam for s in ss}) >= 2
        splits = {s.split for s in ss}
        if pid in train:
            assert splits == {syn.SPLITS[0]}
            continue
        queries = [s for s in ss if s.split == syn.SPLITS[1]]
        gallery = [s for s in ss if s.split == syn.SPLITS[2]]
        assert 1 <= len(queries) <= syn.MAX_QUERIES_PER_ID
        assert len({q.cam for q in queries}) == len(queries)
        for q in queries:
            assert any(g.cam != q.cam for g in gallery)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"ids": 3}, "--ids 3"),
        ({"ids": 10_000}, "--ids 10000"),
        ({"cams": 1}, "--cams 1"),
        ({"cams": 10}, "--cams 10"),
        ({"images_per_id": 1}, "--images-per-id 1"),
        ({"seed": -1}, "--seed -1"),
    ],
)
def test_bad_arguments_name_the_value(tmp_path, kwargs, needle):
    args = {"ids": 8, "cams": 2, "images_per_id": 2, "seed": 0, **kwargs}
    with pytest.raises(StrongReIDError, match=re.escape(needle)):
        syn.generate(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_refuses_a_file_or_a_non_empty_split(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(StrongReIDError, match="not a folder"):
        syn.generate(target, ids=4, cams=2, images_per_id=2)
    (tmp_path / "ds" / "query").mkdir(parents=True)
    (tmp_path / "ds" / "query" / "old.jpg").write_bytes(b"")
    with pytest.raises(StrongReIDError, match="not empty"):
        syn.generate(tmp_path / "ds", ids=4, cams=2, images_per_id=2)


def test_cli_writes_a_tree_and_then_refuses_to_mix(tmp_path, capsys):
    out = tmp_path / "synthetic"
    argv = ["synth", "--out", str(out), "--ids", "8", "--cams", "2", "--images-per-id", "3"]
    assert main([*argv, "--seed", "1"]) == 0
    assert "wrote 25 images" in capsys.readouterr().out
    tree = _tree(out)
    assert len(tree["bounding_box_train"]) == 4 * 3
    assert len(tree["query"]) + len(tree["bounding_box_test"]) == 4 * 3 + 1
    assert main([*argv, "--seed", "1"]) == 2
    assert "error: synthetic data:" in capsys.readouterr().err


def _benchmark():
    spec = importlib.util.spec_from_file_location(
        "histogram_baseline", ROOT / "benchmarks" / "histogram_baseline.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_histogram_stripes_sum_to_one(small, tmp_path):
    bench = _benchmark()
    img = np.zeros((128, 64, 3), np.uint8)
    img[:64] = (255, 0, 0)
    path = tmp_path / "half.png"
    Image.fromarray(img).save(path)
    h = bench.hsv_histogram(path, 2, (8, 4, 4))
    assert h.shape == (2 * 128,)
    # Top stripe: pure red is hue 0, full saturation, full value -> bin (0, 3, 3) = 15.
    # Bottom stripe: black is bin (0, 0, 0) = 0.
    assert h[15] == 1.0 and h[128] == 1.0 and h.sum() == 2.0
    m_ap, rank1 = bench.evaluate_root(small[0])["6 stripes centre sqrt"]
    assert 0.0 <= m_ap <= 1.0 and 0.0 <= rank1 <= 1.0


def test_the_synthetic_loader_reads_the_tree(small):
    from strongreid.data.datasets import build_dataset

    root, counts = small
    ds = build_dataset("synthetic", str(root))
    assert len(ds.train) == counts["train_images"]
    assert len(ds.query) == counts["query_images"]
    assert len(ds.gallery) == counts["gallery_images"]
    assert ds.num_train_pids == counts["train_ids"]
    assert {r.camid for r in ds.train + ds.query + ds.gallery} <= {0, 1, 2}
