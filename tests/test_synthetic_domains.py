"""Synthetic domains: the street look is unchanged, the night look is another domain."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from strongreid.cli import main
from strongreid.data import synthetic as syn
from strongreid.data.datasets import build_dataset
from strongreid.data.synthetic_domains import DOMAINS, NIGHT, STREET, Domain, get_domain
from strongreid.errors import StrongReIDError

# sha256 of the raw pixels of every 7th shot of plan(12, 3, 5, seed 3), as the renderer drew
# them before domains existed: the street look must stay byte-identical for a seed.
STREET_PIXELS = "a98fec61500c9d199a695524109d924b386f381f56b8799cfce7f23c22c2ecd2"


def _pixel_hash(domain: Domain | None) -> str:
    h = hashlib.sha256()
    for shot in syn.plan(12, 3, 5, 3)[::7]:
        img = syn.render(3, shot) if domain is None else syn.render(3, shot, domain)
        h.update(np.asarray(img).tobytes())
    return h.hexdigest()


def test_the_street_draws_what_it_always_drew():
    assert _pixel_hash(None) == STREET_PIXELS
    assert _pixel_hash(STREET) == STREET_PIXELS
    assert _pixel_hash(NIGHT) != STREET_PIXELS


def test_night_has_other_people_and_other_cameras():
    for pid in range(1, 30):
        assert syn.make_identity(0, pid, NIGHT) != syn.make_identity(0, pid)
    coats = sum(syn.make_identity(0, pid, NIGHT).top_kind == "coat" for pid in range(1, 201))
    street_coats = sum(syn.make_identity(0, pid).top_kind == "coat" for pid in range(1, 201))
    assert coats > 1.5 * street_coats  # winter clothing
    for cam in range(1, 7):
        night, street = syn.make_camera(0, cam, NIGHT), syn.make_camera(0, cam)
        assert night.gains[0] > night.gains[2]  # sodium light: red over blue
        assert 0 < night.foreshorten and night.resolution < 1 and night.light_pool > 0
        assert street.foreshorten == 0 and street.resolution == 1 and street.light_pool == 0
        assert night.scale < street.scale  # higher cameras, smaller people


def test_night_images_are_darker():
    shots = [s for s in syn.plan(24, 4, 4, 0) if s.pid > 0][:24]
    night = np.stack([np.asarray(syn.render(0, s, NIGHT), np.float32) for s in shots])
    street = np.stack([np.asarray(syn.render(0, s), np.float32) for s in shots])
    assert night.mean() < 0.6 * street.mean()
    # Orange light: red over blue on average, where the street is balanced.
    assert night[..., 0].mean() > 1.2 * night[..., 2].mean()


def test_unknown_domain_is_one_clear_error(tmp_path: Path, capsys):
    with pytest.raises(StrongReIDError, match="unknown synthetic domain 'nigth'.*night"):
        get_domain("nigth")
    with pytest.raises(StrongReIDError, match="unknown synthetic domain"):
        syn.generate(tmp_path / "x", ids=4, cams=2, images_per_id=2, domain="mars")
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(tmp_path / "y"), "--domain", "mars"])
    assert "invalid choice: 'mars'" in capsys.readouterr().err
    assert {"street", "night"} <= set(DOMAINS.names())


def test_cli_writes_a_night_dataset_the_loader_reads(tmp_path: Path, capsys):
    out = tmp_path / "night" / "synthetic"
    argv = ["synth", "--out", str(out), "--ids", "8", "--cams", "3", "--images-per-id", "3",
            "--domain", "night"]
    assert main(argv) == 0
    assert "domain night" in capsys.readouterr().out
    meta = json.loads((out / "synthetic.json").read_text())
    assert meta["domain"] == "night"
    ds = build_dataset("synthetic", str(tmp_path / "night"))
    assert ds.num_train_pids == 4 and len(ds.train) == 12
    # The street's metadata keeps its old form (no domain key).
    street = tmp_path / "street" / "synthetic"
    assert main(["synth", "--out", str(street), "--ids", "8", "--cams", "3",
                 "--images-per-id", "3"]) == 0
    assert "domain" not in json.loads((street / "synthetic.json").read_text())


def test_night_footage(tmp_path: Path, capsys):
    pytest.importorskip("av", reason="synthetic footage needs PyAV (the search extra)")
    out = tmp_path / "footage"
    assert main(["synth-video", "--out", str(out), "--people", "2", "--cams", "2",
                 "--frames", "20", "--domain", "night"]) == 0
    manifest = json.loads((out / "footage.json").read_text())
    assert manifest["domain"] == "night"
    assert (out / "cam1" / "video.mp4").stat().st_size > 0
    import av

    with av.open(str(out / "cam1" / "video.mp4")) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24", threads=1)
    assert frame.mean() < 90  # night footage is dark
