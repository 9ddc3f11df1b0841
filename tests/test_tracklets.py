"""`strongreid tracklets`: synthetic footage cut into an unlabelled training set of tracklets.

The footage is tiny (five people, three cameras, 30 frames at 5 fps); the trackers are
BoxMOT's real ByteTrack and OC-SORT, fed det.txt frame by frame.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from strongreid.cli import main
from strongreid.data.datasets import build_dataset
from strongreid.data.footage import MIN_BOX, find_sequences, iter_frames, read_mot
from strongreid.data.synthetic_video import generate_footage
from strongreid.data.tracklets import (
    CSV_COLUMNS,
    crop_name,
    cut_tracklets,
    sample_evenly,
    tracklet_purity,
)
from strongreid.errors import DatasetError, StrongReIDError

PEOPLE, CAMS, FRAMES, FPS, SEED = 5, 3, 30, 5.0, 3
PER, MIN_LENGTH = 4, 3
NAME = re.compile(r"^(\d{6})_c(\d+)s1_(\d{6})_00\.jpg$")


@pytest.fixture(scope="module")
def footage(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("footage") / "fx"
    generate_footage(out, people=PEOPLE, cams=CAMS, frames=FRAMES, fps=FPS, seed=SEED)
    return out


@pytest.fixture(scope="module")
def gt_out(footage, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gt") / "tracklets"
    cut_tracklets(footage, out, boxes="gt", per_tracklet=PER, min_length=MIN_LENGTH)
    return out


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "tracklets.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _files(out: Path) -> list[str]:
    return sorted(os.listdir(out / "bounding_box_train"))


def _gt_runs(footage: Path) -> dict[tuple[int, int], int]:
    """(camera, gt id) -> boxes, straight from the gt.txt files (cameras in name order)."""
    runs: Counter = Counter()
    for camera, folder in enumerate(sorted(p for p in footage.iterdir() if p.is_dir()), 1):
        for line in (folder / "gt" / "gt.txt").read_text().splitlines():
            runs[(camera, int(line.split(",")[1]))] += 1
    return dict(runs)


# -- the sampler -------------------------------------------------------------------------------


def test_sample_evenly_hand_computed() -> None:
    assert sample_evenly(10, 1) == [5]
    assert sample_evenly(10, 2) == [2, 7]
    assert sample_evenly(9, 3) == [1, 4, 7]
    assert sample_evenly(3, 10) == [0, 1, 2]
    assert sample_evenly(0, 4) == []
    with pytest.raises(ValueError):
        sample_evenly(5, 0)


@settings(max_examples=300, deadline=None)
@given(length=st.integers(0, 5000), count=st.integers(1, 300))
def test_sample_evenly_properties(length: int, count: int) -> None:
    picks = sample_evenly(length, count)
    k = min(length, count)
    assert len(picks) == k
    assert picks == sorted(set(picks))  # increasing, no repeats
    assert all(0 <= p < length for p in picks)
    # one pick per k equal segments: the floor of the segment's middle, so at or after the
    # segment's first whole index and before its end
    assert all((i * length) // k <= p and p * k < (i + 1) * length for i, p in enumerate(picks))
    if count >= length:
        assert picks == list(range(length))
    assert sample_evenly(length, count) == picks


# -- ground-truth tracklets --------------------------------------------------------------------


def test_gt_tracklets_counts_names_and_ids(footage, gt_out) -> None:
    rows = _rows(gt_out)
    assert list(rows[0]) == list(CSV_COLUMNS)
    # the folder holds exactly the crops the table lists, named after their row
    assert _files(gt_out) == sorted(Path(r["image"]).name for r in rows)
    for r in rows:
        tracklet, camera, frame = (int(g) for g in NAME.match(Path(r["image"]).name).groups())
        assert (tracklet, camera, frame) == (int(r["tracklet"]), int(r["camera"]), int(r["frame"]))
        assert Path(r["image"]).name == crop_name(tracklet, camera, frame)

    runs = _gt_runs(footage)
    expected = {key: n for key, n in runs.items() if n >= MIN_LENGTH}
    by_source = {(int(r["camera"]), int(r["source_track"])) for r in rows}
    assert by_source == set(expected)
    # one tracklet per (camera, gt id); ids 1..N, each in one camera only
    tracklet_of: dict[tuple[int, int], set[int]] = {}
    cameras_of: dict[int, set[int]] = {}
    for r in rows:
        tracklet_of.setdefault((int(r["camera"]), int(r["source_track"])), set()).add(int(r["tracklet"]))
        cameras_of.setdefault(int(r["tracklet"]), set()).add(int(r["camera"]))
    assert all(len(t) == 1 for t in tracklet_of.values())
    assert sorted(cameras_of) == list(range(1, len(expected) + 1))
    assert all(len(c) == 1 for c in cameras_of.values())
    # the footage's gt ids do cross cameras; the tracklets built from them do not
    crossing = [i for i in {i for _, i in runs} if sum(1 for c, j in runs if j == i) > 1]
    assert crossing
    for person in crossing:
        ids = [next(iter(t)) for (c, i), t in tracklet_of.items() if i == person]
        assert len(ids) == len(set(ids)) > 1
    # crops per tracklet: min(--per-tracklet, boxes), at the frames the sampler picks
    per = Counter(int(r["tracklet"]) for r in rows)
    for (camera, person), t in tracklet_of.items():
        assert per[next(iter(t))] == min(PER, expected[(camera, person)])
    manifest = json.loads((gt_out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"] == {
        "cameras": CAMS, "tracklets": len(expected), "crops": len(rows)}
    assert manifest["boxes"] == "gt" and manifest["tracker"] is None
    assert tracklet_purity(gt_out, footage) == {"crops": len(rows), "tracklets": len(expected),
                                                "purity": 1.0, "fragmentation": 1.0}


def test_gt_crops_match_their_boxes_and_frames(footage, gt_out) -> None:
    rows = _rows(gt_out)
    seqs = find_sequences(footage, "gt")
    gt = {}
    for camera, seq in enumerate(seqs, 1):
        for frame, tid, left, top, w, h, _ in read_mot(seq.table):
            gt[(camera, tid, frame)] = (round(left), round(top), round(w), round(h))
    for camera, seq in enumerate(seqs, 1):
        mine = [r for r in rows if int(r["camera"]) == camera]
        frames = dict(iter_frames(seq.video, max(int(r["frame"]) for r in mine)))
        for r in mine:
            box = tuple(int(r[k]) for k in ("left", "top", "width", "height"))
            left, top, w, h = gt[(camera, int(r["source_track"]), int(r["frame"]))]
            # the gt box, clipped to the 320x128 frame
            assert box[0] == max(0, left) and box[1] == max(0, top)
            assert box[0] + box[2] == min(320, left + w) and box[1] + box[3] == min(128, top + h)
            assert min(box[2:]) >= MIN_BOX
            with Image.open(gt_out / r["image"]) as saved:
                crop = np.asarray(saved.convert("RGB"), np.float32)
            want = np.asarray(frames[int(r["frame"])].crop(
                (box[0], box[1], box[0] + box[2], box[1] + box[3])), np.float32)
            assert crop.shape == want.shape
            assert np.abs(crop - want).mean() < 4.0  # JPEG quality 95


def test_the_dataset_reads_tracklets_as_identities(gt_out) -> None:
    rows = _rows(gt_out)
    ds = build_dataset("tracklets", gt_out)
    assert ds.query == [] and ds.gallery == []
    assert len(ds.train) == len(rows)
    assert ds.num_train_pids == len({r["tracklet"] for r in rows})
    camera_of = {Path(r["image"]).name: int(r["camera"]) - 1 for r in rows}
    cams_of_pid: dict[int, set[int]] = {}
    for rec in ds.train:
        assert rec.camid == camera_of[Path(rec.path).name]
        cams_of_pid.setdefault(rec.pid, set()).add(rec.camid)
    assert all(len(c) == 1 for c in cams_of_pid.values())
    # found under ROOT/tracklets too, as DATASETS.ROOT_DIR holds several datasets
    assert len(build_dataset("tracklets", gt_out.parent).train) == len(rows)


def test_img1_frames_give_the_same_training_set(footage, gt_out, tmp_path) -> None:
    frames = tmp_path / "frames"
    for seq in sorted(p for p in footage.iterdir() if p.is_dir()):
        shutil.copytree(seq / "gt", frames / seq.name / "gt")
        shutil.copy(seq / "seqinfo.ini", frames / seq.name / "seqinfo.ini")
        (frames / seq.name / "img1").mkdir()
        for index, img in iter_frames(seq / "video.mp4"):
            img.save(frames / seq.name / "img1" / f"{index:06d}.png")  # lossless: same pixels
    out = tmp_path / "out"
    cut_tracklets(frames, out, boxes="gt", per_tracklet=PER, min_length=MIN_LENGTH)
    assert (out / "tracklets.csv").read_bytes() == (gt_out / "tracklets.csv").read_bytes()
    for name in _files(gt_out):
        assert (out / "bounding_box_train" / name).read_bytes() == \
            (gt_out / "bounding_box_train" / name).read_bytes()


# -- detections linked by BoxMOT ---------------------------------------------------------------


@pytest.mark.parametrize("tracker", ["bytetrack", "ocsort"])
def test_detections_linked_by_a_real_tracker(footage, gt_out, tmp_path, tracker) -> None:
    pytest.importorskip("boxmot", reason="BoxMOT is not installed: pip install 'strongreid[tracking]'")
    out = tmp_path / tracker
    stats = cut_tracklets(footage, out, boxes="det", tracker=tracker, per_tracklet=PER,
                          min_length=MIN_LENGTH)
    rows = _rows(out)
    gt_tracklets = len({r["tracklet"] for r in _rows(gt_out)})
    assert stats.tracklets == len({r["tracklet"] for r in rows})
    # OC-SORT (BoxMOT's defaults) reports a track only after 3 hits in a row, so on 5 fps
    # footage it keeps fewer, shorter tracklets than ByteTrack (4 and 10 here, of 13 passes)
    assert 3 <= stats.tracklets <= 2 * gt_tracklets
    # every crop is one of the detector's boxes (rounded, clipped), never a tracker estimate
    seqs = find_sequences(footage, "det")
    dets = {}
    for camera, seq in enumerate(seqs, 1):
        for frame, _, left, top, w, h, _ in seq.rows:
            x0, y0 = max(0, round(left)), max(0, round(top))
            box = (x0, y0, min(320, round(left) + round(w)) - x0, min(128, round(top) + round(h)) - y0)
            dets.setdefault((camera, frame), set()).add(box)
    for r in rows:
        box = tuple(int(r[k]) for k in ("left", "top", "width", "height"))
        assert box in dets[(int(r["camera"]), int(r["frame"]))]
    cameras_of: dict[str, set[str]] = {}
    for r in rows:
        cameras_of.setdefault(r["tracklet"], set()).add(r["camera"])
    assert all(len(c) == 1 for c in cameras_of.values())
    # A motion tracker on 5 fps footage swaps people who cross; most crops still agree.
    report = tracklet_purity(out, footage)
    assert report["purity"] >= 0.75, report
    assert _files(out) == sorted(Path(r["image"]).name for r in rows)


def test_tracklet_purity_hand_computed(tmp_path) -> None:
    """Three crops of one tracklet on persons 7, 7 and 8 (IoU 1, 1, 1); one crop matching no one."""
    footage, out = tmp_path / "fx", tmp_path / "out"
    (footage / "cam1" / "gt").mkdir(parents=True)
    (footage / "cam1" / "gt" / "gt.txt").write_text(
        "1,7,10,10,20,40,1\n2,7,12,10,20,40,1\n3,8,14,10,20,40,1\n4,7,100,10,20,40,1\n")
    out.mkdir()
    (out / "manifest.json").write_text('{"format": "strongreid-tracklets/1", '
                                       '"sequences": [{"camera": 1, "name": "cam1"}]}')
    lines = ["image,camera,tracklet,source_track,frame,left,top,width,height,score"]
    lines += [f"x{f}.jpg,1,1,0,{f},{10 + 2 * (f - 1)},10,20,40,1.000" for f in (1, 2, 3)]
    lines += ["y.jpg,1,2,1,4,10,10,20,40,1.000"]  # person 7 is at x=100 in frame 4
    (out / "tracklets.csv").write_text("\n".join(lines) + "\n")
    report = tracklet_purity(out, footage)
    assert report["purity"] == pytest.approx(2 / 4)
    assert report["fragmentation"] == pytest.approx(2 / 2)  # tracklets 1,2 over (cam1,7),(cam1,8)


# -- resuming ----------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_files(footage, gt_out, tmp_path,
                                                      monkeypatch) -> None:
    pytest.importorskip("boxmot", reason="BoxMOT is not installed: pip install 'strongreid[tracking]'")
    opts = {"boxes": "det", "tracker": "bytetrack", "per_tracklet": PER, "min_length": MIN_LENGTH}
    whole = tmp_path / "whole"
    cut_tracklets(footage, whole, **opts)

    def stop_after_first(name: str, tracklets: int, crops: int) -> None:
        raise _Stop(name)

    out = tmp_path / "resumed"
    with pytest.raises(_Stop):
        cut_tracklets(footage, out, on_camera=stop_after_first, **opts)
    manifest = (out / "manifest.json").read_text()
    assert '"complete": false' in manifest and len(_files(out)) < len(_files(whole))
    # what a kill in the middle of camera 2 leaves: some of its crops, written but not committed
    shutil.copy(out / "bounding_box_train" / _files(out)[0],
                out / "bounding_box_train" / crop_name(999, 2, 1))
    with pytest.raises(DatasetError, match="unfinished"):
        build_dataset("tracklets", out)
    stats = cut_tracklets(footage, out, **opts)
    assert stats.resumed == 1
    assert _files(out) == _files(whole)
    for name in ("tracklets.csv", "manifest.json"):
        assert (out / name).read_bytes() == (whole / name).read_bytes()
    for name in _files(whole):
        assert (out / "bounding_box_train" / name).read_bytes() == \
            (whole / "bounding_box_train" / name).read_bytes()
    # killed inside camera 1, its crops written but nothing committed
    import strongreid.data.tracklets as tracklets_module

    real_cut = tracklets_module._cut_camera

    def cut_then_die(*args, **kwargs):
        real_cut(*args, **kwargs)
        raise _Stop("killed before the commit")

    early = tmp_path / "early"
    monkeypatch.setattr(tracklets_module, "_cut_camera", cut_then_die)
    with pytest.raises(_Stop):
        cut_tracklets(footage, early, **opts)
    monkeypatch.setattr(tracklets_module, "_cut_camera", real_cut)
    assert _files(early) and not (early / "tracklets.csv").exists()
    assert cut_tracklets(footage, early, **opts).resumed == 0
    assert _files(early) == _files(whole)
    assert (early / "tracklets.csv").read_bytes() == (whole / "tracklets.csv").read_bytes()

    # a finished folder: a rerun changes nothing
    again = cut_tracklets(footage, out, **opts)
    assert again.resumed == CAMS and _files(out) == _files(whole)

    # other options refuse; --overwrite cuts again
    with pytest.raises(StrongReIDError, match="per_tracklet: 4 before, 2 now"):
        cut_tracklets(footage, out, **{**opts, "per_tracklet": 2})
    cut_tracklets(footage, out, boxes="gt", per_tracklet=PER, min_length=MIN_LENGTH,
                  overwrite=True)
    assert _files(out) == _files(gt_out)
    assert (out / "tracklets.csv").read_bytes() == (gt_out / "tracklets.csv").read_bytes()


def test_a_killed_cli_run_resumes(footage, tmp_path) -> None:
    """SIGKILL of the CLI once one camera is committed; the rerun completes it."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "strongreid", "tracklets", "--footage", str(footage), "--out",
           str(out), "--per-tracklet", str(PER), "--min-length", str(MIN_LENGTH)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = proc.stdout.readline()  # printed after camera 1 is committed
    proc.kill()
    proc.wait()
    assert first.startswith("cam1:"), first + proc.stderr.read()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    whole = tmp_path / "whole"
    cut_tracklets(footage, whole, boxes="gt", per_tracklet=PER, min_length=MIN_LENGTH)
    assert _files(out) == _files(whole)
    assert (out / "tracklets.csv").read_bytes() == (whole / "tracklets.csv").read_bytes()


# -- errors ------------------------------------------------------------------------------------


def _copy(footage: Path, dest: Path) -> Path:
    shutil.copytree(footage, dest)
    return dest


def test_errors_name_the_file_and_what_to_do(footage, gt_out, tmp_path, capsys) -> None:
    out = tmp_path / "out"

    def fails(source, match, **kw):
        with pytest.raises(StrongReIDError, match=match):
            cut_tracklets(source, out, **kw)
        # input the run can check up front leaves no output folder behind
        assert not out.exists() or "ends before frame" in match

    fails(tmp_path / "nowhere", "footage folder .*nowhere does not exist")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "no MOT sequence under")

    bad = _copy(footage, tmp_path / "no_gt")
    (bad / "cam2" / "gt" / "gt.txt").unlink()
    fails(bad, r"cam2: no gt/gt\.txt beside video\.mp4")
    fails(footage, "--tracker 'sort' is not known", boxes="det", tracker="sort")
    fails(footage, "leave --tracker out", boxes="gt", tracker="ocsort")
    fails(footage, "--per-tracklet 0 must be >= 1", per_tracklet=0)
    fails(footage, "--boxes 'all'", boxes="all")

    bad = _copy(footage, tmp_path / "empty_gt")
    (bad / "cam1" / "gt" / "gt.txt").write_text("")
    fails(bad, r"cam1/gt/gt\.txt holds no boxes")
    bad = _copy(footage, tmp_path / "malformed")
    lines = (bad / "cam3" / "det" / "det.txt").read_text().splitlines()
    lines[2] = "5,-1,12.0,oops,30,60,0.9"
    (bad / "cam3" / "det" / "det.txt").write_text("\n".join(lines) + "\n")
    fails(bad, r"cam3/det/det\.txt line 3: expected frame,id,left,top,width,height", boxes="det")
    bad = _copy(footage, tmp_path / "no_video")
    (bad / "cam2" / "video.mp4").unlink()
    fails(bad, r"cam2 holds gt/gt\.txt but no footage")
    bad = _copy(footage, tmp_path / "broken_video")
    (bad / "cam1" / "video.mp4").write_bytes(b"not a video at all")
    fails(bad, r"cannot open the video .*cam1/video\.mp4")
    bad = _copy(footage, tmp_path / "short_video")
    with open(bad / "cam1" / "gt" / "gt.txt", "a") as f:
        f.writelines(f"{FRAMES + 5 + i},99,10,10,40,80,1,1,1\n" for i in range(MIN_LENGTH + 4))
    fails(bad, rf"cam1/video\.mp4 ends before frame {FRAMES + 5}")

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StrongReIDError, match="holds other files and no manifest.json"):
        cut_tracklets(footage, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"  # never deleted

    # through the CLI: one line, exit status 2, no traceback
    assert main(["tracklets", "--footage", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the footage folder") and "Traceback" not in err


def test_cli_end_to_end_and_training_on_tracklets(footage, tiny_synthetic_root, tmp_path,
                                                 capsys) -> None:
    from _train_utils import tiny_train_opts

    root = tmp_path / "data"
    root.mkdir()
    (root / "synthetic").symlink_to(tiny_synthetic_root / "synthetic")
    assert main(["tracklets", "--footage", str(footage), "--out", str(root / "tracklets"),
                 "--boxes", "det", "--tracker", "ocsort", "--per-tracklet", "4",
                 "--min-length", "3"]) == 0
    printed = capsys.readouterr().out
    assert "cam1:" in printed and f"{CAMS} cameras:" in printed
    assert "DATASETS.NAMES tracklets" in printed
    opts = tiny_train_opts(root, tmp_path / "run", **{
        "DATASETS.NAMES": "tracklets", "DATASETS.TEST_NAME": "synthetic",
        "SOLVER.MAX_EPOCHS": 1, "SOLVER.IMS_PER_BATCH": 8, "DATALOADER.NUM_INSTANCE": 2})
    assert main(["train", *opts]) == 0
    assert (tmp_path / "run" / "last.pt").is_file()
