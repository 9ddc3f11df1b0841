"""Unreadable images: named all at once before a run, skipped with SKIP_CORRUPT, and a bad file
met inside a loader worker still ends in one clean message."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from _train_utils import tiny_train_opts
from torch.utils.data import DataLoader

from strongreid.cli import main
from strongreid.data.image import ImageDataset
from strongreid.data.integrity import LIST_NAME, check_image, find_unreadable
from strongreid.errors import ConfigError, DatasetError, StrongReIDError, _unwrap_worker_message


def _jpeg(root: Path) -> bytes:
    return sorted((root / "synthetic" / "query").glob("*.jpg"))[0].read_bytes()


def test_header_check_finds_broken_files_and_accepts_valid_odd_ones(tiny_synthetic_root, tmp_path):
    blob = _jpeg(tiny_synthetic_root)
    files = {
        "ok.jpg": blob,
        "trailing.jpg": blob + b"\0" * 5000,  # bytes after the end marker: Pillow reads it fine
        "truncated.jpg": blob[: len(blob) // 2],
        "garbage.jpg": b"not an image" * 20,
        "empty.jpg": b"",
        "body.jpg": blob[:600] + b"\0" * 200 + blob[800:],  # header and end intact, body broken
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [str(tmp_path / n) for n in files] + [str(tmp_path / "missing.jpg")]
    header = dict((Path(paths[i]).name, why) for i, why in find_unreadable(paths, "header", workers=3))
    assert set(header) == {"truncated.jpg", "garbage.jpg", "empty.jpg", "missing.jpg"}
    assert "truncated" in header["truncated.jpg"] and header["empty.jpg"] == "empty file"
    assert header["missing.jpg"] == "file not found" and "header" in header["garbage.jpg"]
    full = dict((Path(paths[i]).name, why) for i, why in find_unreadable(paths, "full"))
    assert set(full) == set(header) | {"body.jpg"}  # only a full decode sees a broken body
    assert find_unreadable(paths, "off") == []
    assert check_image(str(tmp_path / "ok.jpg")) is None
    with pytest.raises(ConfigError, match="'header', 'full', 'off'"):
        find_unreadable(paths, "quick")


def _corrupt_copy(root: Path, dest: Path, n_train: int, n_query: int) -> list[Path]:
    shutil.copytree(root / "synthetic", dest / "synthetic")
    bad = sorted((dest / "synthetic" / "bounding_box_train").glob("*.jpg"))[:n_train]
    bad += sorted((dest / "synthetic" / "query").glob("*.jpg"))[:n_query]
    for p in bad:
        p.write_bytes(p.read_bytes()[:300])  # truncated: header intact, data cut
    return bad


def _train(opts: list[str], capsys) -> SimpleNamespace:
    """`strongreid train ...` through the CLI's entry point, in this process (no interpreter start)."""
    capsys.readouterr()
    code = main(["train", *opts])
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def test_train_names_every_unreadable_image_at_once(tiny_synthetic_root, tmp_path, capsys):
    bad = _corrupt_copy(tiny_synthetic_root, tmp_path / "data", n_train=12, n_query=1)
    out = tmp_path / "run"
    proc = _train(tiny_train_opts(tmp_path / "data", out, **{"SOLVER.MAX_EPOCHS": 1}), capsys)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: 13 of ")
    assert "(12 train, 1 query" in proc.stderr and "... and 3 more" in proc.stderr
    assert proc.stderr.lower().count("truncated") >= 10 and str(out / LIST_NAME) in proc.stderr
    listed = (out / LIST_NAME).read_text().splitlines()
    assert sorted(line.split("\t")[1] for line in listed) == sorted(map(str, bad))
    assert not (out / "last.pt").exists()
    # SKIP_CORRUPT skips training images only: the bad query image still stops the run.
    proc = _train(tiny_train_opts(tmp_path / "data", out, **{"SOLVER.MAX_EPOCHS": 1, "DATALOADER.SKIP_CORRUPT": True}), capsys)
    assert proc.returncode == 2 and proc.stderr.startswith("error: 1 of ")
    assert "query, gallery and validation images are never skipped" in proc.stderr


@pytest.mark.parametrize("data_path", ["pil", "device"])
def test_skip_corrupt_trains_without_the_bad_training_images(tiny_synthetic_root, tmp_path, capsys, data_path):
    _corrupt_copy(tiny_synthetic_root, tmp_path / "data", n_train=5, n_query=0)
    out = tmp_path / "run"
    proc = _train(tiny_train_opts(tmp_path / "data", out, **{
        "SOLVER.MAX_EPOCHS": 1, "DATALOADER.SKIP_CORRUPT": True, "DATALOADER.DATA_PATH": data_path,
        "DATALOADER.CACHE_DIR": tmp_path / "cache"}), capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (out / "log.txt").read_text()
    assert "skipping 5 unreadable training images" in log and (out / "results.json").is_file()
    assert len((out / LIST_NAME).read_text().splitlines()) == 5


def test_a_file_gone_bad_in_a_worker_is_reraised_as_itself(tiny_synthetic_root, tmp_path, capsys):
    path = tmp_path / "late.jpg"
    path.write_bytes(_jpeg(tiny_synthetic_root)[:300])
    loader = DataLoader(ImageDataset([(str(path), 0, 0)]), num_workers=1)
    with pytest.raises(DatasetError) as info:
        next(iter(loader))
    msg = str(info.value)
    assert msg.startswith(f"cannot decode image {str(path)!r}") and "Caught" not in msg and "Traceback" not in msg
    # Through the CLI, with the pre-check off: one line, exit 2.
    _corrupt_copy(tiny_synthetic_root, tmp_path / "data", n_train=10_000, n_query=0)  # the first batch fails
    proc = _train(tiny_train_opts(tmp_path / "data", tmp_path / "run", **{
        "SOLVER.MAX_EPOCHS": 1, "DATALOADER.CHECK_IMAGES": "off", "DATALOADER.NUM_WORKERS": 1}), capsys)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot decode image")
    assert "Traceback" not in proc.stderr and "Caught" not in proc.stderr


def test_worker_message_unwrapping_keeps_the_original_text():
    wrapped = ("Caught DatasetError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\n    raise DatasetError(msg)\n'
               "strongreid.errors.DatasetError: cannot decode image 'a.jpg' (bad)\nsecond line\n")
    assert _unwrap_worker_message(wrapped, "DatasetError") == "cannot decode image 'a.jpg' (bad)\nsecond line"
    assert str(DatasetError(wrapped)) == "cannot decode image 'a.jpg' (bad)\nsecond line"
    assert str(ConfigError("Caught my eye")) == "Caught my eye"  # only torch's format is rewritten
    assert str(StrongReIDError(wrapped.replace("DatasetError", "StrongReIDError"))).startswith("cannot decode")
