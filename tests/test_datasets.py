"""Dataset loaders: published statistics on trees with the real file names, name parsing,
layouts, options, error messages, the registry and combined training."""

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
from strongreid.data.datasets import (
    DATASETS,
    ImageRecord,
    Option,
    ReIDDataset,
    build_dataset,
    combine_train,
    dataset_options,
    dataset_stats,
    format_stats,
    parse_msmt_camera,
    parse_pid_cam,
    relabel,
    split_stats,
)
from strongreid.errors import DatasetError, StrongReIDError

needs_layouts = pytest.mark.skipif(
    not layouts.have_layouts(), reason=f"reference name lists not found in {layouts.LAYOUTS}"
)

# Published statistics, (ids, images, cameras) per split, as each dataset's paper or
# release states them; the reference name lists reproduce every row exactly.
PUBLISHED = {
    "market1501": {"train": (751, 12936, 6), "query": (750, 3368, 6), "gallery": (751, 15913, 6)},
    "dukemtmc": {"train": (702, 16522, 8), "query": (702, 2228, 8), "gallery": (1110, 17661, 8)},
    "occluded_duke": {
        "train": (702, 15618, 8),
        "query": (519, 2210, 8),
        "gallery": (1110, 17661, 8),
    },
    "msmt17": {
        "train": (1041, 30248, 15),
        "query": (3060, 11659, 15),
        "gallery": (3060, 82161, 15),
    },
    "msmt17+val": {
        "train": (1041, 32621, 15),
        "query": (3060, 11659, 15),
        "gallery": (3060, 82161, 15),
    },
    "cuhk03-labeled": {"train": (767, 7368, 2), "query": (700, 1400, 2), "gallery": (700, 5328, 2)},
    "cuhk03-detected": {
        "train": (767, 7365, 2),
        "query": (700, 1400, 2),
        "gallery": (700, 5332, 2),
    },
    "veri": {"train": (576, 37778, 20), "query": (200, 1678, 19), "gallery": (200, 11579, 19)},
}


def as_table(dataset: ReIDDataset) -> dict[str, tuple[int, int, int]]:
    return {
        split: (s["ids"], s["images"], s["cams"]) for split, s in dataset_stats(dataset).items()
    }


# -- the real-name trees (built once per session) -------------------------------------------


@pytest.fixture(scope="session")
def tree_base(tmp_path_factory):
    base, owned = layouts.scratch_root(tmp_path_factory.mktemp("layouts"))
    yield base
    if owned:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def link_sources(tree_base):
    return layouts.write_tiny_images(tree_base / "tiny")


def _tree(tree_base, name, build, *args):
    root = tree_base / name
    root.mkdir()
    build(root, *args)
    return root


@pytest.fixture(scope="session")
def market_root(tree_base, link_sources):
    return _tree(tree_base, "market", layouts.build_market, link_sources[0])


@pytest.fixture(scope="session")
def duke_root(tree_base, link_sources):
    return _tree(tree_base, "duke", layouts.build_duke, link_sources[0])


@pytest.fixture(scope="session")
def occluded_duke_root(tree_base, link_sources):
    return _tree(tree_base, "occ", layouts.build_occluded_duke, link_sources[0])


@pytest.fixture(scope="session")
def msmt_v1_root(tree_base, link_sources):
    return _tree(tree_base, "msmt1", layouts.build_msmt17, link_sources[0], "V1")


@pytest.fixture(scope="session")
def msmt_v2_root(tree_base, link_sources):
    return _tree(tree_base, "msmt2", layouts.build_msmt17, link_sources[0], "V2")


@pytest.fixture(scope="session")
def cuhk03_mat_root(tree_base, link_sources):
    return _tree(tree_base, "cuhkmat", layouts.build_cuhk03_mat, link_sources[1])


@pytest.fixture(scope="session")
def cuhk03_np_root(tree_base, link_sources):
    return _tree(tree_base, "cuhknp", layouts.build_cuhk03_np, link_sources[1])


@pytest.fixture(scope="session")
def veri_root(tree_base, link_sources):
    return _tree(tree_base, "veri", layouts.build_veri, link_sources[0])


@needs_layouts
@pytest.mark.parametrize(
    ("name", "root_fixture", "options", "published"),
    [
        ("market1501", "market_root", {}, "market1501"),
        ("dukemtmc", "duke_root", {}, "dukemtmc"),
        ("occluded_duke", "occluded_duke_root", {}, "occluded_duke"),
        ("msmt17", "msmt_v1_root", {}, "msmt17"),
        ("msmt17", "msmt_v1_root", {"merge_val": True}, "msmt17+val"),
        ("msmt17", "msmt_v2_root", {"merge_val": "false"}, "msmt17"),
        ("msmt17", "msmt_v2_root", {"merge_val": "true"}, "msmt17+val"),
        ("cuhk03", "cuhk03_mat_root", {"kind": "labeled"}, "cuhk03-labeled"),
        ("cuhk03", "cuhk03_mat_root", {"kind": "detected"}, "cuhk03-detected"),
        ("cuhk03", "cuhk03_np_root", {"kind": "labeled"}, "cuhk03-labeled"),
        ("cuhk03", "cuhk03_np_root", {"kind": "detected"}, "cuhk03-detected"),
        ("veri", "veri_root", {}, "veri"),
    ],
)
def test_published_statistics(request, name, root_fixture, options, published):
    root = request.getfixturevalue(root_fixture)
    dataset = build_dataset(name, str(root), **options)
    assert as_table(dataset) == PUBLISHED[published]
    assert dataset.num_train_pids == PUBLISHED[published]["train"][0]
    assert dataset.num_train_cams == PUBLISHED[published]["train"][2]
    # Train labels are 0..N-1; camids are 0-based everywhere.
    assert {r.pid for r in dataset.train} == set(range(dataset.num_train_pids))
    for split in ("train", "query", "gallery"):
        records = getattr(dataset, split)
        assert min(r.camid for r in records) == 0
        assert all(os.path.isabs(r.path) and r.path.startswith(str(root)) for r in records)


@needs_layouts
def test_cli_stats_json_matches_published(market_root, capsys):
    status = cli_main(["datasets", "stats", "market1501", "--root", str(market_root), "--json"])
    assert status == 0
    printed = json.loads(capsys.readouterr().out)
    expected = {
        split: dict(zip(("ids", "images", "cams"), row, strict=True))
        for split, row in PUBLISHED["market1501"].items()
    }
    assert printed == expected


@needs_layouts
def test_cli_stats_options_and_table(msmt_v2_root, capsys):
    argv = ["datasets", "stats", "msmt17", "--root", str(msmt_v2_root), "--option", "merge_val=1"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "Dataset statistics:" in out
    rows = {line.split("|")[0].strip(): line for line in out.splitlines() if "|" in line}
    assert [int(v) for v in rows["train"].split("|")[1:]] == [1041, 32621, 15]
    assert [int(v) for v in rows["gallery"].split("|")[1:]] == [3060, 82161, 15]


@needs_layouts
def test_market_conventions(market_root):
    dataset = build_dataset("market1501", market_root)
    raw = [n.split("/")[-1] for n in layouts.read_names(layouts.LAYOUTS / "market1501/query.txt")]
    # Train labels follow ascending original pid: the first label is the smallest pid.
    first = {}
    for record in dataset.train:
        first.setdefault(record.pid, parse_pid_cam(record.path)[0])
    assert [first[label] for label in sorted(first)] == sorted(first.values())
    # Files are listed in sorted name order, whatever the filesystem returns.
    names = [os.path.basename(r.path) for r in dataset.query]
    assert names == sorted(raw)
    # The 24 real `.jpg.jpg` names parse (identity 1488 sits entirely in them in the query).
    double = [r for r in dataset.query + dataset.gallery if r.path.endswith(".jpg.jpg")]
    assert len([n for n in raw if n.endswith(".jpg.jpg")]) == sum(
        r.path.endswith(".jpg.jpg") for r in dataset.query
    )
    assert {r.pid for r in dataset.query if r.path.endswith(".jpg.jpg")} == {1488}
    assert len(double) == 24 - 2  # the two `-1` junk ones are dropped
    # Distractors stay as pid 0 in the gallery; junk -1 is gone everywhere.
    assert sum(r.pid == 0 for r in dataset.gallery) == 2798
    assert all(r.pid != -1 for r in dataset.train + dataset.query + dataset.gallery)
    # Query/gallery pids keep their values: the query ids are the non-distractor gallery ids.
    assert {r.pid for r in dataset.query} == {r.pid for r in dataset.gallery} - {0}


@needs_layouts
def test_market_accepts_the_dataset_folder_itself(market_root):
    direct = build_dataset("market1501", market_root / "market1501")
    assert as_table(direct) == PUBLISHED["market1501"]


@needs_layouts
def test_occluded_duke_keeps_queries_that_are_also_in_the_gallery(occluded_duke_root):
    dataset = build_dataset("occluded_duke", occluded_duke_root)
    query = {os.path.basename(r.path) for r in dataset.query}
    gallery = {os.path.basename(r.path) for r in dataset.gallery}
    assert len(query & gallery) == 1870


@needs_layouts
def test_msmt17_names_pids_and_cameras(msmt_v1_root):
    dataset = build_dataset("msmt17", msmt_v1_root)
    assert dataset.dataset_dir.endswith("MSMT17_V1")
    assert sum(r.path.endswith("_ex.jpg") for r in dataset.train) == 12699
    assert sum(r.path.endswith("_ex.jpg") for r in dataset.gallery) == 34156
    # Test pids restart at 0 and keep their values; cameras 01..15 become 0..14.
    assert {r.pid for r in dataset.query} == set(range(3060))
    assert {r.camid for r in dataset.gallery} == set(range(15))
    record = dataset.query[1]  # list_query.txt line 2
    assert record.path.endswith("test/0000/0000_001_01_0303morning_0015_0_ex.jpg")
    assert (record.pid, record.camid) == (0, 0)


@needs_layouts
def test_veri_three_digit_cameras_and_queries_in_gallery(veri_root):
    dataset = build_dataset("veri", veri_root)
    assert {r.camid for r in dataset.train} == set(range(20))
    query = {os.path.basename(r.path) for r in dataset.query}
    assert query <= {os.path.basename(r.path) for r in dataset.gallery}


@needs_layouts
def test_cuhk03_layouts_agree_on_identities_and_cameras(cuhk03_mat_root, cuhk03_np_root):
    from_mat = build_dataset("cuhk03", cuhk03_mat_root, kind="detected")
    from_np = build_dataset("cuhk03", cuhk03_np_root, kind="detected")
    for split in ("query", "gallery"):
        a = sorted((r.pid, r.camid) for r in getattr(from_mat, split))
        b = sorted((r.pid, r.camid) for r in getattr(from_np, split))
        assert a == b
    assert from_mat.query[0].path.endswith("images_detected/1_003_1_02.png")


# -- small trees (files hold arbitrary bytes: statistics must never decode an image) ---------


def small_market(base: Path) -> Path:
    return layouts.write_market_tree(
        base,
        {
            "bounding_box_train": ["0007_c1s1_000001_00.jpg", "0003_c2s1_000002_00.jpg",
                                   "0007_c3s1_000003_00.jpg", "-1_c1s1_000004_00.jpg"],
            "query": ["0005_c1s1_000005_00.jpg", "0009_c2s1_000006_00.jpg"],
            "bounding_box_test": ["0005_c4s1_000007_00.jpg", "0000_c1s1_000008_00.jpg",
                                  "-1_c2s1_000009_00.jpg", "0009_c5s1_000010_00.jpg.jpg",
                                  "Thumbs.db"],
        },
    )


def test_small_market_exact_records(tmp_path):
    small_market(tmp_path / "market1501")
    dataset = build_dataset("market1501", tmp_path)
    base = str(tmp_path / "market1501")
    assert dataset.train == [
        ImageRecord(f"{base}/bounding_box_train/0003_c2s1_000002_00.jpg", 0, 1),
        ImageRecord(f"{base}/bounding_box_train/0007_c1s1_000001_00.jpg", 1, 0),
        ImageRecord(f"{base}/bounding_box_train/0007_c3s1_000003_00.jpg", 1, 2),
    ]
    assert [(r.pid, r.camid) for r in dataset.gallery] == [(0, 0), (5, 3), (9, 4)]
    assert dataset.num_train_pids == 2 and dataset.num_train_cams == 3


@pytest.mark.parametrize(
    "folder", ["Market-1501-v15.09.15", "market1501/Market-1501-v15.09.15", "Market-1501", "."]
)
def test_market_alternative_folder_names(tmp_path, folder):
    small_market(tmp_path / folder)
    dataset = build_dataset("market1501", tmp_path)
    assert os.path.normpath(dataset.dataset_dir) == os.path.normpath(tmp_path / folder)
    assert split_stats(dataset.query) == {"ids": 2, "images": 2, "cams": 2}


def test_regex_reads_the_file_name_not_the_parent_folders(tmp_path):
    # The original searched the whole path: "12_c3" in a parent folder won the match.
    small_market(tmp_path / "run_12_c3" / "market1501")
    dataset = build_dataset("market1501", tmp_path / "run_12_c3")
    assert {r.pid for r in dataset.query} == {5, 9}


def test_synthetic_many_cameras(tmp_path):
    layouts.write_market_tree(
        tmp_path / "synthetic",
        {
            "bounding_box_train": ["0001_c12_0001.png", "0002_c1_0002.png"],
            "query": ["0003_c11_0003.jpg"],
            "bounding_box_test": ["0003_c12_0004.jpg", "0004_c3_0005.jpeg"],
        },
    )
    dataset = build_dataset("synthetic", tmp_path)
    assert sorted(r.camid for r in dataset.train) == [0, 11]
    assert [r.camid for r in dataset.gallery] == [11, 2]


def test_folder_loader_with_custom_split_folders(tmp_path):
    layouts.write_market_tree(
        tmp_path,
        {"mine/train": ["0010_c1_a.jpg", "0012_c2_b.png", "notes.txt"],
         "mine/q": ["0020_c1_c.jpg"], "mine/g": ["0020_c2_d.jpg", "-1_c2_e.jpg"]},
    )
    dataset = build_dataset("folder", tmp_path, train="mine/train", query="mine/q", gallery="mine/g")
    assert [(r.pid, r.camid) for r in dataset.train] == [(0, 0), (1, 1)]
    assert [(r.pid, r.camid) for r in dataset.gallery] == [(20, 1)]


def test_unparseable_name_names_the_file(tmp_path):
    small_market(tmp_path)
    (tmp_path / "query" / "cover.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"query/cover\.jpg"):
        build_dataset("market1501", tmp_path)


def test_camera_out_of_range_is_refused(tmp_path):
    small_market(tmp_path)
    (tmp_path / "query" / "0005_c7s1_000005_00.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="camera 7, outside 1..6"):
        build_dataset("market1501", tmp_path)


def test_empty_split_is_an_error(tmp_path):
    small_market(tmp_path)
    for file in (tmp_path / "query").iterdir():
        file.unlink()
    with pytest.raises(DatasetError, match=r"query split is empty .*query"):
        build_dataset("market1501", tmp_path)


BUILT_IN = ["market1501", "dukemtmc", "occluded_duke", "msmt17", "cuhk03", "veri", "synthetic"]


@pytest.mark.parametrize("name", BUILT_IN)
def test_missing_root_names_layout_and_source(tmp_path, name):
    cls = DATASETS.get(name)
    with pytest.raises(DatasetError) as info:
        build_dataset(name, tmp_path / "nowhere")
    message = str(info.value)
    assert "nowhere" in message and "does not exist" in message
    assert cls.LAYOUT.splitlines()[0] in message
    assert cls.URL in message


def test_incomplete_dataset_folder_says_what_is_missing(tmp_path):
    layouts.write_market_tree(tmp_path / "market1501", {"bounding_box_train": ["0001_c1_a.jpg"]})
    with pytest.raises(DatasetError, match=r"market1501 lacks query, bounding_box_test"):
        build_dataset("market1501", tmp_path)


def test_cli_reports_a_missing_root_without_traceback(tmp_path, capsys):
    status = cli_main(["datasets", "stats", "veri", "--root", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: VeRi-776 not found") and "image_train" in err


# -- list files -------------------------------------------------------------------------------


def write_msmt(base: Path, drop: str | None = None) -> Path:
    """A two-identity MSMT17_V2 tree whose lists are written by hand."""
    lines = {
        "list_train.txt": ["0000/0000_000_05_0303morning_0001_0.jpg 0",
                           "0001/0001_001_15_0303noon_0002_1_ex.jpg 1"],
        "list_val.txt": ["0001/0001_002_02_0303noon_0003_0.jpg 1"],
        "list_query.txt": ["0000/0000_003_01_0303afternoon_0004_0.jpg 0"],
        "list_gallery.txt": ["0000/0000_004_03_0303afternoon_0005_0_ex.jpg 0"],
    }
    root = base / "msmt17" / "MSMT17_V2"
    for list_name, entries in lines.items():
        folder = "mask_test_v2" if list_name in ("list_query.txt", "list_gallery.txt") else (
            "mask_train_v2"
        )
        (root / list_name).parent.mkdir(parents=True, exist_ok=True)
        (root / list_name).write_text("\n".join(entries) + "\n")
        for entry in entries:
            rel = entry.split()[0]
            if rel != drop:
                (root / folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / folder / rel).write_bytes(b"")
    return root


def test_msmt17_small_lists_exact(tmp_path):
    root = write_msmt(tmp_path)
    dataset = build_dataset("msmt17", tmp_path, merge_val=True)
    assert [(r.pid, r.camid) for r in dataset.train] == [(0, 4), (1, 14), (1, 1)]
    assert dataset.gallery == [
        ImageRecord(str(root / "mask_test_v2/0000/0000_004_03_0303afternoon_0005_0_ex.jpg"), 0, 2)
    ]


def test_msmt17_list_naming_a_missing_image(tmp_path):
    missing = "0001/0001_002_02_0303noon_0003_0.jpg"
    write_msmt(tmp_path, drop=missing)
    assert len(build_dataset("msmt17", tmp_path).train) == 2  # list_val not read without merge
    with pytest.raises(DatasetError, match=rf"list_val.txt line 1 names .*{missing}"):
        build_dataset("msmt17", tmp_path, merge_val=True)
    dataset = build_dataset("msmt17", tmp_path, merge_val=True, skip_corrupt=True)
    assert len(dataset.train) == 2 and dataset.num_missing == 1


def test_cuhk03_split_file_naming_a_missing_image(tmp_path):
    if not layouts.have_layouts():
        pytest.skip("needs the official .mat split file")
    folder = tmp_path / "cuhk03"
    (folder / "images_labeled").mkdir(parents=True)
    shutil.copyfile(
        layouts.LAYOUTS / "cuhk03-np" / "cuhk03_new_protocol_config_labeled.mat",
        folder / "cuhk03_new_protocol_config_labeled.mat",
    )
    with pytest.raises(DatasetError, match=r"filelist entry 1 names .*images_labeled/1_001_1_01"):
        build_dataset("cuhk03", tmp_path)


def test_cuhk03_corrupt_split_file(tmp_path):
    folder = tmp_path / "cuhk03"
    (folder / "images_detected").mkdir(parents=True)
    (folder / "cuhk03_new_protocol_config_detected.mat").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="cannot read .*config_detected.mat"):
        build_dataset("cuhk03", tmp_path, kind="detected")


def test_list_loader_formats_and_path_resolution(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "lists" / "pics").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "c d.jpg"):
        (tmp_path / "imgs" / name).write_bytes(b"")
    (tmp_path / "lists" / "pics" / "e.jpg").write_bytes(b"")
    # csv with a header; paths relative to ROOT
    (tmp_path / "train.csv").write_text("path,pid,camid\nimgs/a.jpg,40,3\nimgs/b.jpg,12,0\n")
    # whitespace, a comment, a path with a space, junk -1 and a path relative to the list file
    (tmp_path / "lists" / "query.txt").write_text(
        "# query\nimgs/c d.jpg 7 1\n\npics/e.jpg 8 2\nimgs/a.jpg -1 0\n"
    )
    (tmp_path / "lists" / "gallery.txt").write_text(f"{tmp_path}/imgs/b.jpg 7 0\n")
    dataset = build_dataset(
        "list", tmp_path, train="train.csv", query="lists/query.txt", gallery="lists/gallery.txt"
    )
    assert dataset.train == [
        ImageRecord(str(tmp_path / "imgs/a.jpg"), 1, 3),
        ImageRecord(str(tmp_path / "imgs/b.jpg"), 0, 0),
    ]
    assert dataset.query == [
        ImageRecord(str(tmp_path / "imgs/c d.jpg"), 7, 1),
        ImageRecord(str(tmp_path / "lists/pics/e.jpg"), 8, 2),
    ]
    assert dataset.gallery == [ImageRecord(str(tmp_path / "imgs/b.jpg"), 7, 0)]


def test_list_loader_test_only_and_missing_file(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    (tmp_path / "q.txt").write_text("x.jpg 1 0\n")
    (tmp_path / "g.txt").write_text("x.jpg 1 1\nmissing/y.jpg 2 0\n")
    with pytest.raises(DatasetError, match=r"g.txt line 2 names 'missing/y.jpg'"):
        build_dataset("list", tmp_path, query="q.txt", gallery="g.txt")
    dataset = build_dataset("list", tmp_path, query="q.txt", gallery="g.txt", skip_corrupt="yes")
    assert dataset.train == [] and len(dataset.gallery) == 1 and dataset.num_missing == 1
    with pytest.raises(DatasetError, match="has no train split"):
        combine_train([dataset])
    with pytest.raises(DatasetError, match="at least one list file"):
        build_dataset("list", tmp_path)
    with pytest.raises(DatasetError, match="'nope.txt' was not found"):
        build_dataset("list", tmp_path, train="nope.txt")


def test_list_loader_bad_line(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "t.txt").write_text("a.jpg 1 0\nb.jpg one 0\n")
    with pytest.raises(DatasetError, match="t.txt line 2: expected 'path pid camid'"):
        build_dataset("list", tmp_path, train="t.txt")


# -- options, config, registry, combination ---------------------------------------------------


def test_options_are_checked():
    with pytest.raises(DatasetError, match="has no option 'merge'.*merge_val"):
        build_dataset("msmt17", "/nonexistent", merge=True)
    with pytest.raises(DatasetError, match="kind='both' is not one of labeled, detected"):
        build_dataset("cuhk03", "/nonexistent", kind="both")
    with pytest.raises(DatasetError, match="merge_val='maybe' is not a boolean"):
        build_dataset("msmt17", "/nonexistent", merge_val="maybe")
    with pytest.raises(StrongReIDError, match="unknown dataset 'market'.*market1501"):
        build_dataset("market", "/nonexistent")


def test_dataset_options_from_config():
    cfg = get_cfg_defaults()
    assert dataset_options(cfg, "market1501") == {"skip_corrupt": False}
    assert dataset_options(cfg, "folder") == {"skip_corrupt": False}
    cfg.DATASETS.MSMT17_MERGE_VAL = True
    cfg.DATASETS.CUHK03_KIND = "detected"
    cfg.DATASETS.LIST_TRAIN = "train.txt"
    cfg.DATASETS.LIST_GALLERY = "gallery.txt"
    cfg.DATALOADER.SKIP_CORRUPT = True
    assert dataset_options(cfg, "msmt17") == {"merge_val": True, "skip_corrupt": True}
    assert dataset_options(cfg, "cuhk03") == {"kind": "detected", "skip_corrupt": True}
    assert dataset_options(cfg, "list") == {
        "train": "train.txt", "gallery": "gallery.txt", "skip_corrupt": True
    }


class _InMemory(ReIDDataset):
    """Records given as a class attribute; used to test what the base class adds."""

    TITLE = "in-memory"
    SPLITS: tuple = ([], [], [])

    def load(self):
        return tuple(list(s) for s in self.SPLITS)


def test_user_registered_dataset(tmp_path):
    @DATASETS.register("test_user_dataset", override=True)
    class Mine(ReIDDataset):
        TITLE = "mine"
        OPTIONS = {"scale": Option("1", "a user option")}

        def load(self):
            cam = int(self.options["scale"])
            train = [ImageRecord(f"{self.root}/t{i}.jpg", pid, cam) for i, pid in enumerate((9, 4))]
            test = [(f"{self.root}/q.jpg", 9, 0)]  # plain tuples are accepted too
            return train, test, test

    assert "test_user_dataset" in DATASETS.names()
    dataset = build_dataset("test_user_dataset", tmp_path, scale="3")
    assert [(r.pid, r.camid) for r in dataset.train] == [(1, 3), (0, 3)]
    assert isinstance(dataset, Mine) and dataset.num_train_pids == 2
    assert dataset.query == [ImageRecord(f"{tmp_path}/q.jpg", 9, 0)]
    assert dataset.query[0].camid == 0


def test_relabel_and_split_stats_exact():
    records = [ImageRecord("a", 30, 2), ImageRecord("b", -5, 0), ImageRecord("c", 30, 1)]
    assert relabel(records) == [ImageRecord("a", 1, 2), ImageRecord("b", 0, 0),
                                ImageRecord("c", 1, 1)]
    assert split_stats(records) == {"ids": 2, "images": 3, "cams": 3}
    assert split_stats([]) == {"ids": 0, "images": 0, "cams": 0}


record_lists = st.lists(
    st.tuples(st.integers(0, 40), st.integers(0, 9)), min_size=1, max_size=30
)


@given(st.lists(record_lists, min_size=1, max_size=4))
def test_combine_train_keeps_datasets_disjoint(parts):
    datasets = []
    for i, part in enumerate(parts):
        cls = type(f"Part{i}", (_InMemory,), {"SPLITS": (
            [ImageRecord(f"d{i}/{j}", pid, cam) for j, (pid, cam) in enumerate(part)],
            [ImageRecord("q", 0, 0)], [ImageRecord("g", 0, 0)],
        )})
        datasets.append(cls("/data"))
    combined = combine_train(datasets)
    assert len(combined) == sum(len(p) for p in parts)
    start = 0
    pid_sets, cam_sets = [], []
    for dataset in datasets:
        chunk = combined[start:start + len(dataset.train)]
        start += len(dataset.train)
        assert [r.path for r in chunk] == [r.path for r in dataset.train]
        # The same offset is added to every record of a dataset.
        assert len({c.pid - r.pid for c, r in zip(chunk, dataset.train, strict=True)}) == 1
        assert len({c.camid - r.camid for c, r in zip(chunk, dataset.train, strict=True)}) == 1
        pid_sets.append({r.pid for r in chunk})
        cam_sets.append({r.camid for r in chunk})
    for a in range(len(parts)):
        for b in range(a + 1, len(parts)):
            assert not pid_sets[a] & pid_sets[b]
            assert not cam_sets[a] & cam_sets[b]
    # Relabelled pids stay contiguous across datasets: the classifier sees 0..N-1.
    assert {r.pid for r in combined} == set(range(sum(d.num_train_pids for d in datasets)))


def test_format_stats_is_the_original_table(tmp_path):
    small_market(tmp_path)
    table = format_stats(build_dataset("market1501", tmp_path)).splitlines()
    assert table[1:5] == [
        "Dataset statistics:",
        "  ----------------------------------------",
        "  subset   | # ids | # images | # cameras",
        "  ----------------------------------------",
    ]
    assert table[5] == "  train    |     2 |        3 |         3"


# -- name parsers -----------------------------------------------------------------------------

# What follows the camera number must not start with a digit (it would extend the number).
suffixes = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from(["s", "_", ".", "s1_"]),
    st.text(alphabet="abcdefs0123456789_.", max_size=12),
)


@given(
    pid=st.integers(-1, 99999),
    cam=st.integers(0, 999),
    width=st.integers(1, 5),
    rest=suffixes,
    ext=st.sampled_from([".jpg", ".jpg.jpg", ".png"]),
    folder=st.sampled_from(["", "bounding_box_test/", "x/7_c9/"]),
)
def test_parse_pid_cam_round_trip(pid, cam, width, rest, ext, folder):
    name = f"{folder}{pid:0{width}d}_c{cam}{rest}{ext}"
    assert parse_pid_cam(name) == (pid, cam)


@given(st.text(alphabet="abc_-.c", max_size=15))
def test_parse_pid_cam_rejects_names_without_a_pid(name):
    assert parse_pid_cam(name) is None


@given(
    pid=st.integers(0, 4100),
    index=st.integers(0, 999),
    cam=st.integers(1, 15),
    time=st.sampled_from(["0303morning", "0113noon", "0302afternoon"]),
    ex=st.booleans(),
)
def test_parse_msmt_camera_round_trip(pid, index, cam, time, ex):
    name = f"{pid:04d}/{pid:04d}_{index:03d}_{cam:02d}_{time}_0019_2{'_ex' if ex else ''}.jpg"
    assert parse_msmt_camera(name) == cam


def test_parse_msmt_camera_rejects_other_names():
    assert parse_msmt_camera("0001_c1s1_000451_03.jpg") is None
    assert parse_msmt_camera("0000_045.jpg") is None
