"""layumi's prepared folders, DG-Market, VehicleID, Market gt_bbox and the validation split."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import _layouts as layouts
import pytest
from hypothesis import given
from hypothesis import strategies as st

from strongreid.cli import main as cli_main
from strongreid.config import get_cfg_defaults
from strongreid.data.datasets import ImageRecord, build_dataset, layumi_camera
from strongreid.data.splits import load_splits
from strongreid.data.validation import first_image_split
from strongreid.errors import DatasetError

needs_layouts = pytest.mark.skipif(not layouts.have_layouts(), reason="reference layouts not found")


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def prepare_like_layumi(src: dict[str, list[str]], out: Path) -> None:
    """What layumi's prepare.py writes from Market names: <split>/<pid>/<name>, val = first."""
    dest = {"query": "query", "gallery": "gallery", "multi-query": "multi-query"}
    for split, names in src.items():
        if split == "train":
            seen: set[str] = set()
            for name in names:
                pid = name.split("_")[0]
                _touch(out / "train_all" / pid / name)
                if pid in seen:
                    _touch(out / "train" / pid / name)
                else:
                    seen.add(pid)
                    (out / "train" / pid).mkdir(parents=True, exist_ok=True)
                    _touch(out / "val" / pid / name)
        else:
            for name in names:
                _touch(out / dest[split] / name.split("_")[0] / name)


SMALL = {
    "train": ["0002_c1s1_000451_03.jpg", "0002_c1s1_000551_01.jpg", "0002_c2s1_000301_01.jpg",
              "0007_c2s3_070952_01.jpg", "0007_c3s3_077419_03.jpg"],
    "query": ["0001_c1s1_001051_00.jpg", "0001_c2s1_000301_00.jpg", "0003_c1s6_015971_00.jpg"],
    "gallery": ["-1_c1s1_000401_03.jpg", "0000_c1s1_000151_01.jpg", "0001_c1s1_001101_03.jpg",
                "0001_c5s1_001426_02.jpg", "0003_c4s6_015641_02.jpg"],
    "multi-query": ["0001_c1s1_001051_00.jpg", "0001_c1s1_009376_00.jpg", "0001_c2s1_000301_00.jpg",
                    "0003_c1s6_015971_00.jpg"],
}


def test_layumi_prepared_folder_exact_records(tmp_path):
    base = tmp_path / "Market" / "pytorch"
    prepare_like_layumi(SMALL, base)
    ds = build_dataset("layumi", tmp_path)
    assert ds.dataset_dir == str(base)
    # train/ lacks each identity's first image, which val/ holds (labels of the train split).
    assert [(os.path.basename(r.path), r.pid, r.camid) for r in ds.train] == [
        ("0002_c1s1_000551_01.jpg", 0, 0), ("0002_c2s1_000301_01.jpg", 0, 1),
        ("0007_c3s3_077419_03.jpg", 1, 2),
    ]
    assert [(os.path.basename(r.path), r.pid) for r in ds.val] == [
        ("0002_c1s1_000451_03.jpg", 0), ("0007_c2s3_070952_01.jpg", 1),
    ]
    # -1 junk dropped, 0000 distractors kept; cameras 0-based.
    assert [(r.pid, r.camid) for r in ds.gallery] == [(0, 0), (1, 0), (1, 4), (3, 3)]
    assert [(r.pid, r.camid) for r in ds.query] == [(1, 0), (1, 1), (3, 0)]
    assert [(r.pid, r.camid) for r in ds.multi_query] == [(1, 0), (1, 0), (1, 1), (3, 0)]
    full = build_dataset("layumi", tmp_path, train_all=True)
    assert len(full.train) == 5 and full.num_train_pids == 2


def test_layumi_test_only_folder_and_bad_identity_folder(tmp_path):
    prepare_like_layumi({k: v for k, v in SMALL.items() if k in ("query", "gallery")}, tmp_path / "pytorch")
    ds = build_dataset("layumi", tmp_path)
    assert ds.train == [] and len(ds.query) == 3
    (tmp_path / "pytorch" / "gallery" / "thumbs").mkdir()
    with pytest.raises(DatasetError, match=r"gallery/thumbs is not an identity folder"):
        build_dataset("layumi", tmp_path)


def test_layumi_missing_folder_names_the_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"(?s)layumi prepared folder not found.*prepare\.py"):
        build_dataset("layumi", tmp_path)


@pytest.mark.parametrize(
    ("name", "camera"),
    [("0002_c1s1_000451_03.jpg", 1), ("0001_c2_f0046182.jpg", 2), ("0001_c012_00016450_0.jpg", 12),
     ("0000_000_01_0303morning_0015_0.jpg", 1), ("0448_008_14_0113noon_0466_1_ex.jpg", 14),
     ("nocamera.jpg", None)],
)
def test_layumi_camera(name, camera):
    assert layumi_camera(name) == camera


@needs_layouts
def test_layumi_tree_of_all_market_names_has_the_published_statistics(tmp_path, capsys):
    names = {split: [os.path.basename(n) for n in
                     layouts.read_names(layouts.LAYOUTS / "market1501" / f"{src}.txt")]
             for split, src in (("train", "bounding_box_train"), ("query", "query"),
                                ("gallery", "bounding_box_test"))}
    root, made = layouts.scratch_root(tmp_path)  # tmpfs: 36k files in a fraction of the time
    try:
        prepare_like_layumi(names, root / "pytorch")
        assert cli_main(["datasets", "stats", "layumi", "--root", str(root), "--json"]) == 0
        ds = build_dataset("layumi", root, train_all=True)
    finally:
        if made:
            shutil.rmtree(root)
    stats = json.loads(capsys.readouterr().out)
    # train/ = 12,936 - 751 val images; query and gallery as Market-1501 (STATS.md).
    assert stats == {"train": {"ids": 751, "images": 12185, "cams": 6},
                     "query": {"ids": 750, "images": 3368, "cams": 6},
                     "gallery": {"ids": 751, "images": 15913, "cams": 6},
                     "val": {"ids": 751, "images": 751, "cams": 4}}  # first names: c1..c4 only
    assert len(ds.train) == 12936 and len(ds.val) == 751


def test_market_gt_bbox_is_the_multi_query_split(tmp_path):
    base = tmp_path / "market1501"
    for folder, names in (("bounding_box_train", SMALL["train"]), ("query", SMALL["query"]),
                          ("bounding_box_test", SMALL["gallery"]), ("gt_bbox", SMALL["multi-query"])):
        for name in names:
            _touch(base / folder / name)
    ds = build_dataset("market1501", tmp_path)
    assert [(os.path.basename(r.path), r.pid, r.camid) for r in ds.multi_query] == [
        ("0001_c1s1_001051_00.jpg", 1, 0), ("0001_c1s1_009376_00.jpg", 1, 0),
        ("0001_c2s1_000301_00.jpg", 1, 1), ("0003_c1s6_015971_00.jpg", 3, 0),
    ]
    shutil.rmtree(base / "gt_bbox")
    assert build_dataset("market1501", tmp_path).multi_query == []


# DG-Net's test_folder.py: <folder label>/<structure label>_<label>_gan<Market source name>.jpg
DG_NAMES = ["000/027_000_gan0002_c1s1_000451_03.jpg", "000/513_000_gan0002_c2s1_000301_01.jpg",
            "001/004_001_gan0007_c3s3_077419_03.jpg", "750/101_750_gan1500_c6s3_085592_01.jpg"]


def test_dg_market_published_layout_and_combination(tmp_path):
    for rel in DG_NAMES:
        _touch(tmp_path / "DG-Market" / rel)
    ds = build_dataset("dg_market", tmp_path)
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 0), (0, 1), (1, 2), (2, 5)]
    assert ds.query == [] and ds.gallery == []
    # Combined with the layumi folder: labels and cameras stay disjoint.
    prepare_like_layumi(SMALL, tmp_path / "pytorch")
    cfg = get_cfg_defaults()
    cfg.DATASETS.NAMES = "layumi,dg_market"
    cfg.DATASETS.ROOT_DIR = str(tmp_path)
    splits = load_splits(cfg)
    assert splits.test_name == "layumi" and splits.num_classes == 2 + 3
    assert [(r.pid, r.camid) for r in splits.train[-4:]] == [(2, 3), (2, 4), (3, 5), (4, 8)]


def test_dg_market_not_found(tmp_path):
    with pytest.raises(DatasetError, match=r"(?s)DG-Market not found.*NVlabs/DG-Net"):
        build_dataset("dg_market", tmp_path)


def _vehicleid(root: Path) -> Path:
    base = root / "VehicleID_V1.0"
    split = base / "train_test_split"
    split.mkdir(parents=True)
    train = [("0004357", 4), ("0004359", 4), ("0000012", 9)]
    test = [("0000001", 2), ("0000002", 2), ("0000003", 2), ("0000100", 7), ("0000101", 7)]
    (split / "train_list.txt").write_text("".join(f"{n} {v}\n" for n, v in train))
    (split / "test_list_800.txt").write_text("".join(f"{n} {v}\n" for n, v in test))
    (split / "test_list_1600.txt").write_text("".join(f"{n} {v}\n" for n, v in test + [("0000200", 8), ("0000201", 8)]))
    for name, _ in train + test + [("0000200", 8), ("0000201", 8)]:
        _touch(base / "image" / f"{name}.jpg")
    return base


def test_vehicleid_official_lists_first_image_is_the_gallery(tmp_path):
    base = _vehicleid(tmp_path)
    ds = build_dataset("vehicleid", tmp_path)
    assert [(os.path.basename(r.path), r.pid, r.camid) for r in ds.gallery] == [
        ("0000001.jpg", 2, 1), ("0000100.jpg", 7, 1)]
    assert [(os.path.basename(r.path), r.pid, r.camid) for r in ds.query] == [
        ("0000002.jpg", 2, 0), ("0000003.jpg", 2, 0), ("0000101.jpg", 7, 0)]
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 0), (0, 0), (1, 0)]
    bigger = build_dataset("vehicleid", tmp_path, test_size="1600")
    assert {r.pid for r in bigger.gallery} == {2, 7, 8} and len(bigger.query) == 4
    rand = build_dataset("vehicleid", tmp_path, gallery_pick="random")
    assert len(rand.gallery) == 2 and len(rand.query) == 3
    assert {r.pid for r in rand.gallery} == {2, 7}
    with pytest.raises(DatasetError, match=r"test_size='3200' is not one of 800, 1600, 2400"):
        build_dataset("vehicleid", tmp_path, test_size="3200")
    (base / "image" / "0000101.jpg").unlink()
    with pytest.raises(DatasetError, match=r"test_list_800.txt"):
        build_dataset("vehicleid", tmp_path)


def test_vehicleid_test_size_from_the_config(tmp_path):
    _vehicleid(tmp_path)
    cfg = get_cfg_defaults()
    cfg.DATASETS.NAMES = "vehicleid"
    cfg.DATASETS.ROOT_DIR = str(tmp_path)
    cfg.DATASETS.VEHICLEID_TEST_SIZE = 1600
    assert len(load_splits(cfg).gallery) == 3


def test_first_image_split_exact():
    records = [ImageRecord("b/2.jpg", 0, 0), ImageRecord("a/9.jpg", 0, 1),
               ImageRecord("c/1.jpg", 1, 0), ImageRecord("c/0.jpg", 2, 0), ImageRecord("c/5.jpg", 2, 1)]
    train, val = first_image_split(records)
    assert val == [ImageRecord("a/9.jpg", 0, 1), ImageRecord("c/0.jpg", 2, 0)]
    # identity 1 has one image: it stays in training.
    assert train == [ImageRecord("b/2.jpg", 0, 0), ImageRecord("c/1.jpg", 1, 0), ImageRecord("c/5.jpg", 2, 1)]
    train_all, val_all = first_image_split(records, train_all=True)
    assert train_all == records and val_all == val


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 50)), max_size=40, unique=True))
def test_first_image_split_properties(items):
    records = [ImageRecord(f"{pid}/{n:03d}.jpg", pid, 0) for pid, n in items]
    train, val = first_image_split(records)
    assert sorted(train + val) == sorted(records)
    assert {r.pid for r in train} == {r.pid for r in records}  # no identity loses all images
    assert len({r.pid for r in val}) == len(val)


def test_validation_key_with_a_derived_and_the_layumi_split(tmp_path):
    prepare_like_layumi(SMALL, tmp_path / "pytorch")
    cfg = get_cfg_defaults()
    cfg.DATASETS.NAMES = "layumi"
    cfg.DATASETS.ROOT_DIR = str(tmp_path)
    assert load_splits(cfg).val == []
    cfg.DATASETS.VALIDATION = "first"
    splits = load_splits(cfg)
    assert [os.path.basename(r.path) for r in splits.val] == ["0002_c1s1_000451_03.jpg", "0007_c2s3_070952_01.jpg"]
    assert len(splits.train) == 3 and len(splits.multi_query) == 4
    cfg.DATASETS.TRAIN_ALL = True
    splits = load_splits(cfg)
    assert len(splits.train) == 5 and len(splits.val) == 2
    # A dataset without its own val/: the first image of each identity is derived.
    shutil.rmtree(tmp_path / "pytorch" / "val")
    cfg.DATASETS.TRAIN_ALL = False
    cfg.DATASETS.LIST_TRAIN = ""
    splits = load_splits(cfg)
    assert [os.path.basename(r.path) for r in splits.val] == ["0002_c1s1_000551_01.jpg"]
    assert len(splits.train) == 2
