"""A path that cannot be written is one `error:` line naming the option (or key) and the path,
said before the work; a failed write leaves no temporary file and an earlier result as it was.

Unwritable places that refuse root too: a path under an existing regular file, /proc (which
takes no new files), and an existing folder given where a file is expected.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_utils import tiny_train_opts
from PIL import Image

from strongreid.cli import main
from strongreid.config import load_config
from strongreid.config.loader import dump_config
from strongreid.errors import StrongReIDError
from strongreid.paths import check_output_path

OPTS = {
    "MODEL.DEVICE": "cpu", "MODEL.NAME": "resnet18", "MODEL.PRETRAIN_CHOICE": "none",
    "MODEL.AMP": "off", "MODEL.CHANNELS_LAST": "off", "INPUT.SIZE_TEST": "[32, 16]",
    "DATALOADER.NUM_WORKERS": "0", "TEST.IMS_PER_BATCH": "4",
}
PROC = Path("/proc")
needs_proc = pytest.mark.skipif(not sys.platform.startswith("linux") or not PROC.is_dir(),
                                reason="/proc is Linux's")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-weight ResNet-18 checkpoint at 32x16, its config file and three images."""
    from strongreid.modeling import build_model

    root = tmp_path_factory.mktemp("outpaths")
    cfg = load_config(None, [x for kv in OPTS.items() for x in kv])
    torch.manual_seed(0)
    model = build_model(cfg, 5)
    ckpt = root / "model.pt"
    torch.save({"model": model.state_dict(), "num_classes": 5, "arch": cfg.MODEL.NAME,
                "config": dump_config(cfg)}, ckpt)
    config = root / "cfg.yml"
    config.write_text(dump_config(cfg))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        arr = rng.integers(0, 256, size=(40, 20, 3), dtype=np.uint8)
        Image.fromarray(arr).save(images / f"000{i}_c{i + 1}s1_000001_01.png")
    return {"ckpt": ckpt, "config": config, "images": images}


def _refused(capsys, argv: list[str], *names: str) -> str:
    """Run the CLI; it must exit 2 with one `error:` line naming every one of `names`."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    for name in names:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name or "write-check" in p.name]


def _bad_outs(tmp_path: Path, name: str) -> list[Path]:
    """An out path under a regular file, and one that is an existing folder (with a file in it)."""
    afile = tmp_path / "afile"
    afile.write_text("keep")
    folder = tmp_path / name
    folder.mkdir()
    (folder / "inside.txt").write_text("keep")
    paths = [afile / name, folder]
    if PROC.is_dir():
        paths.append(PROC / name)
    return paths


def _untouched(tmp_path: Path, name: str) -> None:
    assert (tmp_path / "afile").read_text() == "keep"
    assert [p.name for p in (tmp_path / name).iterdir()] == ["inside.txt"]
    assert (tmp_path / name / "inside.txt").read_text() == "keep"
    assert _leftovers(tmp_path) == []


def _never(what: str):
    def called(*args, **kwargs):
        pytest.fail(f"{what} ran before the output path was checked")
    return called


# -- extract --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["f.npz", "f.safetensors"])
def test_extract_checks_out_before_extracting(tiny, tmp_path, capsys, monkeypatch, name):
    from strongreid.deploy import extractor

    monkeypatch.setattr(extractor, "FeatureExtractor", _never("the model"))
    for out in _bad_outs(tmp_path, name):
        _refused(capsys, ["extract", "--config", tiny["config"], "TEST.WEIGHT", tiny["ckpt"],
                          "--images", tiny["images"], "--out", out], "--out", out)
    _untouched(tmp_path, name)


def test_write_features_cleans_up_and_keeps_an_earlier_file(tmp_path, monkeypatch):
    from strongreid.deploy import extractor

    feats, paths = torch.ones(2, 4), ["a.jpg", "b.jpg"]
    ids = np.array([-1, -1])
    folder = tmp_path / "f.npz"
    folder.mkdir()
    with pytest.raises(StrongReIDError, match=f"--out {folder}: cannot write the features"):
        extractor.write_features(folder, feats, paths, ids, ids)
    assert _leftovers(tmp_path) == [] and folder.is_dir()

    earlier = tmp_path / "g.npz"
    earlier.write_bytes(b"earlier result")

    def full_disk(f, **arrays):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(extractor.np, "savez", full_disk)
    with pytest.raises(StrongReIDError, match="--out .*g.npz: cannot write the features "
                                              r"\(No space left on device"):
        extractor.write_features(earlier, feats, paths, ids, ids)
    assert earlier.read_bytes() == b"earlier result"
    assert _leftovers(tmp_path) == []


def test_extract_names_a_corrupt_image_without_training_advice(tiny, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in tiny["images"].iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    bad = folder / "0009_c1s1_000009_01.jpg"
    bad.write_bytes(b"GIF89a not really")
    line = _refused(capsys, ["extract", "--config", tiny["config"], "TEST.WEIGHT", tiny["ckpt"],
                             "--images", folder, "--out", tmp_path / "f.npz"],
                    "cannot decode image", str(bad), "remove or replace", "--images")
    assert "SKIP_CORRUPT" not in line and "DATASETS.ROOT_DIR" not in line
    assert not (tmp_path / "f.npz").exists() and _leftovers(tmp_path) == []


def test_image_lists_name_the_option_that_gave_them(tmp_path):
    from strongreid.deploy.extractor import list_images

    with pytest.raises(StrongReIDError, match="^--images .*nope is neither"):
        list_images(tmp_path / "nope")
    with pytest.raises(StrongReIDError, match="^--crops .*nope is neither"):
        list_images(tmp_path / "nope", "--crops")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StrongReIDError, match="check --crops$"):
        list_images(tmp_path / "empty", flag="--crops")


# -- export ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["m.safetensors", "m.onnx", "m.ts"])
def test_export_checks_out_before_exporting(tiny, tmp_path, capsys, monkeypatch, name):
    from strongreid.deploy import export

    if name.endswith(".onnx"):
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    monkeypatch.setattr(export, "build_inference_model", _never("the model"))
    for out in _bad_outs(tmp_path, name):
        line = _refused(capsys, ["export", "--config", tiny["config"], "TEST.WEIGHT", tiny["ckpt"],
                                 "--out", out], "--out", out)
        assert "--format" not in line  # the path is at fault, not the format
    _untouched(tmp_path, name)


def test_a_failed_export_keeps_the_earlier_file(tiny, tmp_path, capsys, monkeypatch):
    from strongreid.deploy import export

    out = tmp_path / "m.ts"
    out.write_bytes(b"earlier export")

    def full_disk(model, example, path, meta):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "_export_torchscript", full_disk)
    _refused(capsys, ["export", "--config", tiny["config"], "TEST.WEIGHT", tiny["ckpt"],
                      "--out", out], "--out", out, "No space left on device")
    assert out.read_bytes() == b"earlier export"
    assert _leftovers(tmp_path) == []


# -- index build, search, calibrate ---------------------------------------------------------------

def test_search_and_index_check_out_first(tmp_path, capsys, monkeypatch):
    pytest.importorskip("faiss")
    from strongreid.deploy.extractor import write_features
    from strongreid.search import retrieval

    feats = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    paths = [f"{i:04d}_c1s1_000001_01.jpg" for i in range(6)]
    npz = tmp_path / "feats.npz"
    write_features(npz, feats, paths, np.arange(6), np.zeros(6, np.int64))
    index = tmp_path / "index"
    assert main(["index", "build", str(npz), "--out", str(index)]) == 0
    capsys.readouterr()

    monkeypatch.setattr(retrieval, "_query_features", _never("the query"))
    for out in _bad_outs(tmp_path, "s.json"):
        _refused(capsys, ["search", index, "--query", npz, "--out", out], "--out", out)
    _untouched(tmp_path, "s.json")

    monkeypatch.setattr(retrieval, "load_features", _never("reading the features"))
    _refused(capsys, ["index", "build", npz, "--out", tmp_path / "afile" / "index"],
             "--out", tmp_path / "afile" / "index")
    _refused(capsys, ["index", "build", npz, "--out", tmp_path / "afile"],
             "--out", tmp_path / "afile", "is a file, not a folder")
    assert _leftovers(tmp_path) == []


def test_calibrate_checks_out_before_reading_images(tiny, tmp_path, capsys, monkeypatch):
    from strongreid.adapt import calibrate

    monkeypatch.setattr(calibrate, "read_images", _never("reading the images"))
    monkeypatch.setattr(calibrate, "FeatureExtractor", _never("the model"))
    for out in _bad_outs(tmp_path, "c.json"):
        _refused(capsys, ["calibrate", "--model", tiny["ckpt"], "--data", tiny["images"],
                          "--out", out], "--out", out)
    _untouched(tmp_path, "c.json")
    missing = tmp_path / "nowhere" / "c.json"
    _refused(capsys, ["calibrate", "--model", tiny["ckpt"], "--data", tiny["images"],
                      "--out", missing], "--out", missing, "does not exist")


def test_calibrate_names_its_own_image_options(tiny, tmp_path, capsys):
    nope = tmp_path / "nope"
    _refused(capsys, ["calibrate", "--model", tiny["ckpt"], "--data", nope,
                      "--out", tmp_path / "c.json"], f"--data {nope} is neither")
    _refused(capsys, ["calibrate", "--model", tiny["ckpt"], "--from-clusters", nope,
                      "--out", tmp_path / "c.json"], f"--from-clusters {nope} is neither")
    _refused(capsys, ["calibrate", "--model", tiny["ckpt"], "--data", tiny["images"],
                      "--measure-on", nope, "--out", tmp_path / "c.json"],
             f"--measure-on {nope} is neither")


# -- train, test, synth-video ---------------------------------------------------------------------

def test_train_and_test_name_output_dir(tiny, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    # No data at all: OUTPUT_DIR is checked before the data set is read.
    nodata = tmp_path / "nodata"
    bad_dirs = [afile, afile / "run"] + ([PROC / "run"] if PROC.is_dir() else [])
    for out in bad_dirs:
        _refused(capsys, ["train", *tiny_train_opts(nodata, out)], "OUTPUT_DIR", out)
        _refused(capsys, ["test", "--config", tiny["config"], "TEST.WEIGHT", tiny["ckpt"],
                          "DATASETS.ROOT_DIR", nodata, "OUTPUT_DIR", out], "OUTPUT_DIR", out)
    assert afile.read_text() == "keep" and _leftovers(tmp_path) == []


def test_synth_video_checks_out(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    outs = [afile / "footage"] + ([PROC / "footage"] if PROC.is_dir() else [])
    for out in outs:
        _refused(capsys, ["synth-video", "--out", out], "--out", out)
    assert afile.read_text() == "keep" and _leftovers(tmp_path) == []


# -- config files ---------------------------------------------------------------------------------

def test_config_that_is_binary_or_a_folder(tmp_path, capsys):
    binary = tmp_path / "bin.yml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    _refused(capsys, ["config", "--config", binary], f"config file {binary}", "not a text file")
    _refused(capsys, ["config", "--config", tmp_path], f"config file {tmp_path} is a folder")


# -- the helper -----------------------------------------------------------------------------------

def test_check_output_path(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert check_output_path(tmp_path / "new" / "deeper" / "f.npz", "--out") == \
        tmp_path / "new" / "deeper" / "f.npz"
    assert not (tmp_path / "new").exists()  # nothing is created by the check
    with pytest.raises(StrongReIDError, match="the folder .*new does not exist"):
        check_output_path(tmp_path / "new" / "f.npz", "--out", make_parents=False)
    with pytest.raises(StrongReIDError, match="is a folder"):
        check_output_path(tmp_path, "--out")
    with pytest.raises(StrongReIDError, match="afile is a file, so no folder"):
        check_output_path(afile / "a" / "b", "--out", folder=True)
    with pytest.raises(StrongReIDError, match="is a file, not a folder"):
        check_output_path(afile, "OUTPUT_DIR", folder=True)
    assert check_output_path(tmp_path, "OUTPUT_DIR", folder=True) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@needs_proc
def test_check_output_path_under_proc():
    with pytest.raises(StrongReIDError, match=r"^--out /proc/x\.npz: cannot create files in /proc"):
        check_output_path("/proc/x.npz", "--out")


# -- the atomic writes ----------------------------------------------------------------------------

@pytest.mark.parametrize("durable", [True, False])
def test_atomic_write_creates_parents_and_replaces(tmp_path, durable):
    from strongreid.paths import atomic_write

    target = tmp_path / "a" / "b" / "f.bin"
    assert atomic_write(target, lambda f: f.write(b"first"), durable=durable) == target
    assert target.read_bytes() == b"first"
    assert atomic_write(str(target), lambda f: f.write(b"second"), durable=durable) == target
    assert target.read_bytes() == b"second"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   KeyboardInterrupt()])
def test_atomic_write_failure_keeps_the_old_file(tmp_path, error):
    from strongreid.paths import atomic_write

    target = tmp_path / "f.bin"
    target.write_bytes(b"earlier")

    def fails(f):
        f.write(b"partial")
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, fails)
    assert target.read_bytes() == b"earlier"
    assert _leftovers(tmp_path) == []
    with pytest.raises(type(error)):
        atomic_write(tmp_path / "new.bin", fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_atomic_write_text_is_utf8(tmp_path):
    from strongreid.paths import atomic_write_text

    target = tmp_path / "sub" / "t.txt"
    text = "Zürich → 東京\nsecond line\n"
    assert atomic_write_text(target, text, durable=False) == target
    assert target.read_bytes() == text.encode("utf-8")
    assert _leftovers(tmp_path) == []


def test_atomic_path_replaces_on_success_and_cleans_up_on_failure(tmp_path):
    from strongreid.paths import atomic_path

    target = tmp_path / "d" / "video.mp4"
    with atomic_path(target, keep_suffix=True) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".video.mp4.tmp")
        assert tmp.suffix == ".mp4" and not tmp.exists()
        tmp.write_bytes(b"first")
    assert target.read_bytes() == b"first"
    with atomic_path(target, durable=False) as tmp:
        assert tmp.suffix != ".mp4"
        tmp.write_bytes(b"second")
    assert target.read_bytes() == b"second"

    with pytest.raises(RuntimeError, match="encoder died"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("encoder died")
    assert target.read_bytes() == b"second"
    assert _leftovers(tmp_path) == []
    with pytest.raises(FileNotFoundError):  # nothing written under the temporary name
        with atomic_path(tmp_path / "never.bin"):
            pass
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d", "video.mp4"]
