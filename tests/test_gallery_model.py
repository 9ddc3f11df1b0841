"""A gallery records the model its features came from; ingest, serve and demo check it.

And the gallery commands' other user errors: a file that is not a gallery, --start-time,
--min-score, --port, --max-upload. Every one ends in exit status 2 with one `error:` line that
names the flag or file, and nothing written or lost. Everything runs through the CLI as a user
would (`serve` with uvicorn.run replaced: the checks all happen before it).
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the service needs pip install 'strongreid[search]'")
pytest.importorskip("av", reason="video ingest needs PyAV (strongreid[search])")

from _search_utils import make_footage, tiny_model  # noqa: E402

from strongreid.cli import main  # noqa: E402
from strongreid.deploy.extractor import FeatureExtractor  # noqa: E402
from strongreid.search.model_identity import check_serve, model_identity  # noqa: E402
from strongreid.search.service import _records_no_model  # noqa: E402
from strongreid.search.store import StoreError, open_store  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery-model")
    make_footage(root / "footage")
    make_footage(root / "footage2", people=2, cams=2, frames=20, seed=4)
    m0 = tiny_model(root / "run5-best.pt", seed=0)
    copy = root / "elsewhere" / "renamed.pt"
    copy.parent.mkdir()
    shutil.copy(m0, copy)
    m1 = tiny_model(root / "run1-best.pt", seed=1)
    gallery = root / "g" / "gallery.db"
    assert main(["gallery", "ingest", "--gallery", str(gallery), "--model", str(m0),
                 "--videos", str(root / "footage"), "--device", "cpu"]) == 0
    return {"root": root, "m0": m0, "copy": copy, "m1": m1, "gallery": gallery,
            "footage": root / "footage", "footage2": root / "footage2"}


@pytest.fixture
def served(monkeypatch):
    """uvicorn.run replaced: `serve` does everything up to listening, then returns."""
    import uvicorn

    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    return calls


def keys(db: Path) -> list[str]:
    """The gallery's row keys, read without opening the store."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return sorted(r[0] for r in con.execute("SELECT key FROM crops"))
    finally:
        con.close()


def copy_gallery(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".db", ".faiss"):
        if src.with_suffix(suffix).exists():
            shutil.copy(src.with_suffix(suffix), dst.with_suffix(suffix))
    shutil.copytree(src.with_name(src.stem + ".thumbs"), dst.with_name(dst.stem + ".thumbs"))
    return dst


def one_error(capsys) -> str:
    """The command's stderr: one `error:` line, no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def ingest_args(gallery: Path, model: Path, videos: Path, *extra: str) -> list[str]:
    return ["gallery", "ingest", "--gallery", str(gallery), "--model", str(model),
            "--videos", str(videos), "--device", "cpu", *extra]


def serve_args(gallery: Path, model: Path, *extra: str) -> list[str]:
    return ["serve", "--gallery", str(gallery), "--model", str(model), "--device", "cpu",
            "--no-calibration", "--runtime", "torch", *extra]


# -- the model identity -------------------------------------------------------------------------


def test_same_weights_same_identity_other_weights_or_settings_another(world) -> None:
    a = model_identity(FeatureExtractor(None, world["m0"], device="cpu"))
    assert model_identity(FeatureExtractor(None, world["copy"], device="cpu")).digest == a.digest
    assert model_identity(FeatureExtractor(None, world["m1"], device="cpu")).digest != a.digest
    flipped = FeatureExtractor(None, world["m0"], device="cpu", opts={"TEST.FLIP_AUG": True})
    other = model_identity(flipped)
    assert other.weights == a.weights and other.digest != a.digest
    store = open_store(str(world["gallery"]), create=False)
    try:
        with pytest.raises(StoreError, match=r"the same weights with other feature settings "
                                             r"\(flip False -> True\)"):
            check_serve(store, other, str(world["gallery"]))
    finally:
        store.close()


def test_ingest_accepts_a_renamed_copy_and_refuses_another_model(world, tmp_path, capsys) -> None:
    gallery = copy_gallery(world["gallery"], tmp_path / "g.db")
    before = keys(gallery)
    capsys.readouterr()
    assert main(ingest_args(gallery, world["copy"], world["footage"])) == 0
    assert capsys.readouterr().out.startswith(f"0 crops added, {len(before)} already stored")
    # Another model: new footage and the same footage alike are refused, nothing is added.
    for videos in (world["footage2"], world["footage"]):
        assert main(ingest_args(gallery, world["m1"], videos)) == 2
        line = one_error(capsys)
        assert f"the gallery {gallery} holds features of the model {world['m0']}" in line
        assert f"--model {world['m1']}" in line and "other weights" in line
        assert "into a new gallery file (--gallery NEW.db)" in line
        assert keys(gallery) == before
    # A migrated copy keeps the record.
    moved = tmp_path / "moved.db"
    assert main(["gallery", "migrate", "--from", str(gallery), "--to", str(moved)]) == 0
    capsys.readouterr()
    assert main(ingest_args(moved, world["m1"], world["footage2"])) == 2
    assert "holds features of the model" in one_error(capsys)


def test_serve_accepts_the_same_weights_and_refuses_another_model(world, served,
                                                                   capsys) -> None:
    gallery = world["gallery"]
    assert main(serve_args(gallery, world["copy"])) == 0
    out = capsys.readouterr().out
    assert len(served) == 1 and "WARNING" not in out
    assert main(serve_args(gallery, world["m1"])) == 2
    line = one_error(capsys)
    assert f"the gallery {gallery} holds features of the model {world['m0']}" in line
    assert f"Serve it with --model {world['m0']}" in line
    assert "ingest the footage into a new gallery file with this model" in line
    assert len(served) == 1  # never listened


def test_the_demo_refuses_a_gallery_of_another_model(world, tmp_path, capsys) -> None:
    gallery = copy_gallery(world["gallery"], tmp_path / "demo.db")
    before = keys(gallery)
    assert main(["demo", "search", "--model", str(world["m1"]), "--footage",
                 str(world["footage"]), "--gallery", str(gallery), "--device", "cpu"]) == 2
    assert "holds features of the model" in one_error(capsys)
    assert keys(gallery) == before


def test_the_demos_own_gallery_is_rebuilt_for_a_new_demo_model(world, tmp_path, monkeypatch,
                                                              capsys) -> None:
    # `make demo` trained a new model; `make demo-search` then rebuilds the demo's gallery (at
    # its default path, derived from the demo footage) instead of refusing it.
    monkeypatch.chdir(tmp_path)
    gallery = copy_gallery(world["gallery"], tmp_path / "runs" / "demo-search" / "gallery.db")
    args = ["demo", "search", "--model", str(world["m1"]), "--footage", str(world["footage"]),
            "--device", "cpu"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"runs/demo-search/gallery.db was built with another model: rebuilt with {world['m1']}" in err
    store = open_store(str(gallery), create=False)
    try:
        assert store.model()["digest"] == model_identity(
            FeatureExtractor(None, world["m1"], device="cpu")).digest
        # The old rows went with it: the demo ingests every second frame, half of what the
        # original gallery held (had they stayed, it would hold at least as many).
        assert 0 < store.count() < len(keys(world["gallery"]))
    finally:
        store.close()
    assert main(args) == 0  # the same model again: kept, nothing added
    assert "rebuilt" not in capsys.readouterr().err


def test_a_gallery_from_before_is_served_with_a_warning_and_adopted_by_ingest(
        world, tmp_path, served, capsys) -> None:
    gallery = copy_gallery(world["gallery"], tmp_path / "old.db")
    con = sqlite3.connect(gallery)  # as written before galleries recorded their model
    con.execute("DELETE FROM info WHERE name = 'model'")
    con.commit()
    con.close()
    before = keys(gallery)
    assert main(serve_args(gallery, world["m1"])) == 0
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if "WARNING" in ln]
    assert len(warnings) == 1 and "does not record which model" in warnings[0], warnings
    assert len(served) == 1
    store = open_store(str(gallery), create=False)
    assert store.model() is None  # serving adopts nothing
    store.close()
    assert _records_no_model(str(gallery), "")  # what `serve --workers N` reads for its warning
    # An ingest whose inputs are not there adopts nothing (else a typo would bind the gallery).
    assert main(ingest_args(gallery, world["m0"], tmp_path / "no-such-footage")) == 2
    capsys.readouterr()
    store = open_store(str(gallery), create=False)
    assert store.model() is None
    store.close()
    # The first ingest adopts its model, says so, and the gallery checks it from then on.
    assert main(ingest_args(gallery, world["m1"], world["footage"])) == 0
    out = capsys.readouterr().out
    assert "did not record its model" in out and f"it now records {world['m1']}" in out
    assert keys(gallery) == before
    assert main(serve_args(gallery, world["m0"])) == 2
    assert f"holds features of the model {world['m1']}" in one_error(capsys)
    assert main(serve_args(gallery, world["m1"])) == 0
    assert "WARNING" not in capsys.readouterr().out
    assert not _records_no_model(str(gallery), "")


def test_milvus_lite_galleries_record_their_model_too(tmp_path) -> None:
    pytest.importorskip("milvus_lite", reason="Milvus Lite (strongreid[search])")
    import numpy as np

    from strongreid.search.store import MilvusStore

    store = MilvusStore(str(tmp_path / "lite.db"))
    try:
        store.open(4)
        store.upsert([{"key": "a" * 40, "vector": np.ones(4)}])
        assert store.model() is None
        assert store.record_model({"digest": "d1", "path": "/a.pt"})["digest"] == "d1"
        assert store.record_model({"digest": "d2", "path": "/b.pt"})["digest"] == "d1"
    finally:
        store.close()
    again = open_store(str(tmp_path / "lite.db"))
    try:
        assert again.model()["digest"] == "d1"
    finally:
        again.close()


# -- other user errors: one message, nothing written ---------------------------------------------


def test_a_file_that_is_not_a_gallery_is_named_and_left_untouched(world, tmp_path, capsys) -> None:
    notes = tmp_path / "notes.db"
    notes.write_text("my notes\n")
    app = tmp_path / "app.db"
    con = sqlite3.connect(app)
    con.execute("CREATE TABLE t (x)")
    con.execute("INSERT INTO t VALUES (1)")
    con.commit()
    con.close()
    for path in (notes, app):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        for args in (ingest_args(path, world["m0"], world["footage2"]),
                     serve_args(path, world["m0"])):
            assert main(args) == 2
            line = one_error(capsys)
            assert f"error: {path} is not a strongreid gallery" in line
            assert "left untouched" in line
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db", "notes.db"]


@pytest.mark.parametrize(("flag", "value", "named"), [
    ("--start-time", "noon", "--start-time 'noon' is neither"),
    ("--start-time", "nan", "--start-time 'nan' is neither"),
    ("--min-score", "7", "--min-score 7.0 must be within [0, 1]"),
    ("--min-score", "-0.5", "--min-score -0.5 must be within [0, 1]"),
])
def test_bad_ingest_options_are_refused_before_anything_is_created(world, tmp_path, capsys,
                                                                   flag, value, named) -> None:
    gallery = tmp_path / "new.db"
    assert main(ingest_args(gallery, world["m0"], world["footage"], flag, value)) == 2
    assert named in one_error(capsys)
    assert list(tmp_path.iterdir()) == []
    # An existing gallery loses and gains nothing.
    before = keys(world["gallery"])
    assert main(ingest_args(world["gallery"], world["m0"], world["footage2"], flag, value)) == 2
    assert named in one_error(capsys)
    assert keys(world["gallery"]) == before


@pytest.mark.parametrize(("flag", "value"), [
    ("--port", "-1"), ("--port", "0"), ("--port", "65536"),
    ("--max-upload", "0"), ("--max-upload", "-5"),
])
def test_bad_serve_options_are_named(world, served, capsys, flag, value) -> None:
    assert main(serve_args(world["gallery"], world["m0"], flag, value)) == 2
    assert one_error(capsys).startswith(f"error: {flag} {value} must be")
    assert served == []
