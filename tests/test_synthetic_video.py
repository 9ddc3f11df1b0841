"""The synthetic multi-camera footage: ground truth that agrees with the pixels and itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av", reason="the footage is encoded with PyAV: pip install 'strongreid[search]'")

from strongreid.cli import main  # noqa: E402
from strongreid.data.synthetic import _CH, _PANORAMA_W, _SS  # noqa: E402
from strongreid.data.synthetic_video import (  # noqa: E402
    BOX_FILL,
    FRAME_HEIGHT,
    FRAME_WIDTH,
    MIN_VISIBILITY,
    Pass,
    box_of,
    generate_footage,
    plan_passes,
    render_frame,
)
from strongreid.errors import StrongReIDError  # noqa: E402
from strongreid.search.ingest import find_sequences, read_mot  # noqa: E402


@pytest.fixture(scope="module")
def footage(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("footage") / "f"
    generate_footage(out, people=3, cams=2, frames=20, fps=5.0, seed=2)
    return out


def test_box_of_a_hand_computed_pass() -> None:
    # A person 200 canvas px tall at top 20, walking right over 10 frames: at frame 0 the body
    # axis is at -margin + (W + 2 margin) * 0.05 with margin 0.2 * 200 = 40 (canvas pixels).
    p = Pass(mot_id=1, cam=1, start=0, frames=10, direction=1, view=2, mirror=1, height=200.0, top=20.0)
    left, top, w, h, vis = box_of(p, 0)
    cx = -40 + (_PANORAMA_W + 80) * 0.05
    box_h = 200 / BOX_FILL
    assert h == pytest.approx(box_h / _SS)
    assert w == pytest.approx(box_h / 2 / _SS)
    assert left == pytest.approx((cx - box_h / 4) / _SS)
    assert top == pytest.approx((20 - (box_h - 200) / 2) / _SS)
    inside_w = left + w  # the box starts left of the frame
    inside_h = min(top + h, FRAME_HEIGHT) - max(top, 0.0)
    assert vis == pytest.approx(inside_w * inside_h / (w * h))
    # Walking left mirrors the path: frame 9 going left is where frame 0 going right is.
    q = Pass(1, 1, 0, 10, -1, 2, -1, 200.0, 20.0)
    assert box_of(q, 9)[0] == pytest.approx(left)


def test_every_person_crosses_two_cameras_one_after_another() -> None:
    passes = plan_passes(people=12, cams=4, frames=100, fps=5.0, seed=0)
    for mot_id in range(1, 13):
        mine = sorted((p for p in passes if p.mot_id == mot_id), key=lambda p: p.start)
        assert 2 <= len(mine) <= 3
        assert len({p.cam for p in mine}) == len(mine)
        for a, b in zip(mine, mine[1:]):
            assert a.start + a.frames <= b.start  # never in two places at once
        assert all(0 <= p.start and p.start + p.frames <= 100 for p in mine)
    assert plan_passes(12, 4, 100, 5.0, 0) == passes  # the plan is a function of its arguments


def test_files_agree_with_the_plan(footage: Path) -> None:
    manifest = json.loads((footage / "footage.json").read_text())
    assert manifest["frame_size"] == [FRAME_HEIGHT, FRAME_WIDTH] == [_CH // _SS, _PANORAMA_W // _SS]
    seqs = find_sequences(footage, "gt")
    assert [s.name for s in seqs] == ["cam1", "cam2"]
    for seq in seqs:
        assert seq.fps == 5.0
        assert seq.start == pytest.approx(1767600000.0)  # 2026-01-05T08:00:00Z
        passes = [p for p in manifest["passes"] if p["camera"] == seq.name]
        rows = seq.rows
        assert rows, seq.name
        # Every row lies inside one of the person's passes in this camera, and is visible.
        for frame, mot_id, *_box, _score in rows:
            assert any(p["mot_id"] == mot_id and p["start"] < frame <= p["start"] + p["frames"]
                       for p in passes)
        vis = np.loadtxt(seq.video.parent / "gt" / "gt.txt", delimiter=",", ndmin=2)[:, 8]
        assert vis.min() >= MIN_VISIBILITY and vis.max() <= 1.0
        det = read_mot(seq.video.parent / "det" / "det.txt")
        assert 0 < len(det) <= len(rows) and {r[1] for r in det} == {-1}

    import av

    with av.open(str(seqs[0].video)) as c:
        frames = [f.to_ndarray(format="rgb24", threads=1) for f in c.decode(video=0)]
    assert len(frames) == 20 and frames[0].shape == (FRAME_HEIGHT, FRAME_WIDTH, 3)


def test_a_person_is_where_the_ground_truth_says(footage: Path) -> None:
    """Inside a gt box the decoded frame differs from the same frame drawn without people;
    away from every box of that frame it does not (beyond the codec's error)."""
    import av

    seq = find_sequences(footage, "gt")[0]
    with av.open(str(seq.video)) as c:
        frames = [f.to_ndarray(format="rgb24", threads=1).astype(np.float32) for f in c.decode(video=0)]
    frame, _mot, left, top, w, h, _ = seq.rows[len(seq.rows) // 2]
    scene = np.asarray(render_frame(2, 1, frame - 1, []), np.float32)
    x0, x1 = int(max(0, left)), int(min(FRAME_WIDTH, left + w))
    y0, y1 = int(max(0, top)), int(min(FRAME_HEIGHT, top + h))
    diff = np.abs(frames[frame - 1] - scene).mean(axis=2)
    outside = np.ones_like(diff, bool)
    for f, _m, bl, bt, bw, bh, _s in seq.rows:
        if f == frame:
            outside[int(max(0, bt)):int(bt + bh) + 1, int(max(0, bl)):int(bl + bw) + 1] = False
    assert diff[y0:y1, x0:x1].mean() > 15
    assert diff[outside].mean() < 6


def test_generation_is_deterministic(footage: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_footage(again, people=3, cams=2, frames=20, fps=5.0, seed=2)
    for name in ("cam1/gt/gt.txt", "cam2/det/det.txt", "footage.json"):
        assert (again / name).read_bytes() == (footage / name).read_bytes()


def test_cli_and_errors(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    assert main(["synth-video", "--out", str(out), "--people", "2", "--cams", "2",
                 "--frames", "20"]) == 0
    assert "2 cameras x 20 frames" in capsys.readouterr().out
    assert main(["synth-video", "--out", str(out), "--people", "2"]) == 2  # not empty
    assert "not an empty folder" in capsys.readouterr().err
    with pytest.raises(StrongReIDError, match="--frames 5 is too short"):
        plan_passes(2, 2, 5, 5.0, 0)
    with pytest.raises(StrongReIDError, match="--cams 1"):
        plan_passes(2, 1, 50, 5.0, 0)


def test_a_process_forked_beside_a_video_thread_exits(footage: Path, tmp_path: Path) -> None:
    """A thread that decoded and encoded video is still alive when the process forks (what a
    DataLoader does for its workers): the child must not hang freeing that thread's scaler."""
    import os
    import signal
    import threading
    import time

    from strongreid.data.footage import iter_frames
    from strongreid.data.synthetic_video import write_video

    video = find_sequences(footage, "gt")[0].video
    done, release = threading.Event(), threading.Event()

    def work() -> None:
        frames = [img for _, img in iter_frames(video, last=3)]
        write_video(tmp_path / "again.mp4", frames, 5.0)
        done.set()
        release.wait(60)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        assert done.wait(60), "decoding and encoding 3 frames took over 60 s"
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        deadline = time.monotonic() + 30
        while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if waited[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung: a scaler with FFmpeg threads was freed in it")
        assert os.waitstatus_to_exitcode(waited[1]) == 0
    finally:
        release.set()
        thread.join(60)
