"""Ranked-list pictures, CMC / training curves and the HTML report, on a synthetic run folder."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from strongreid.errors import StrongReIDError
from strongreid.viz import curves as curves_mod
from strongreid.viz import ranked as ranked_mod
from strongreid.viz.curves import epoch_summary, plot_cmc, plot_training_curves, read_metrics
from strongreid.viz.ranked import (
    BAD_COLOR,
    GOOD_COLOR,
    IGNORED_COLOR,
    MISSING_FILL,
    QUERY_COLOR,
    RankedLayout,
    draw_ranked_lists,
    load_ranking,
    match_kind,
    select_queries,
    visualize_command,
)
from strongreid.viz.report import format_percent, report_command, write_report

# Identities, cameras and top-4 lists of the synthetic run; EXPECTED_KINDS is worked out by hand
# from them: same pid + other camera = good, same pid + same camera = ignored, other pid = bad.
Q_PIDS, Q_CAMS = [1, 2, 3], [0, 0, 1]
G_PIDS, G_CAMS = [1, 1, 2, 3, 4, 1], [1, 0, 1, 0, 2, 2]
# -1 ends a ranked list early (save_ranking's padding when junk leaves fewer than K images).
TOPK_INDEX = [[0, 2, 1, 5], [3, 2, 4, 0], [3, 4, 0, -1]]
EXPECTED_KINDS = [
    ["good", "bad", "ignored", "good"],
    ["bad", "good", "bad", "bad"],
    ["good", "bad", "bad", None],
]
KIND_TO_COLOR = {"good": GOOD_COLOR, "bad": BAD_COLOR, "ignored": IGNORED_COLOR}
RESULTS = {"mAP": 0.7654, "mINP": 0.4321, "cmc": [0.5, 0.75, 1.0, 1.0], "rank1": 0.5,
           "rank5": 1.0, "rank10": 1.0, "num_query": 3, "num_gallery": 6, "num_valid": 3,
           "num_skipped": 0, "re_ranking": False}
RESULTS_RERANKED = {**RESULTS, "mAP": 0.8123, "mINP": 0.5012, "cmc": [0.75, 1.0, 1.0, 1.0],
                    "rank1": 0.75, "re_ranking": True}


def query_color(i: int) -> tuple[int, int, int]:
    return (40 + 60 * i, 200, 90)


def gallery_color(j: int) -> tuple[int, int, int]:
    return (10 + 35 * j, 60, 240 - 30 * j)


def write_synthetic_run(root: Path, reranked: bool = True) -> Path:
    """A results folder as `strongreid test` and training leave it, with tiny solid-colour images."""
    root.mkdir(parents=True, exist_ok=True)
    images = root / "images"
    images.mkdir(exist_ok=True)
    q_paths, g_paths = [], []
    for i in range(len(Q_PIDS)):
        Image.new("RGB", (16, 32), query_color(i)).save(images / f"q{i}.png")
        q_paths.append(f"images/q{i}.png")  # relative to the results folder
    for j in range(len(G_PIDS)):
        Image.new("RGB", (16, 32), gallery_color(j)).save(images / f"g{j}.png")
        g_paths.append(str((images / f"g{j}.png").resolve()))
    dist = np.array([[0.1, 0.2, 0.3, 0.4], [0.15, 0.25, 0.35, 0.45], [0.05, 0.5, 0.6, np.inf]],
                    dtype=np.float32)
    np.savez(
        root / "ranking.npz",
        q_paths=np.array(q_paths), g_paths=np.array(g_paths),
        q_pids=np.array(Q_PIDS, dtype=np.int64), g_pids=np.array(G_PIDS, dtype=np.int64),
        q_camids=np.array(Q_CAMS, dtype=np.int64), g_camids=np.array(G_CAMS, dtype=np.int64),
        topk_index=np.array(TOPK_INDEX, dtype=np.int64), topk_dist=dist,
        ap=np.array([0.9, 0.4, 1.0]), cmc=np.array(RESULTS["cmc"]),
    )
    (root / "results.json").write_text(json.dumps(RESULTS))
    if reranked:
        (root / "results_reranked.json").write_text(json.dumps(RESULTS_RERANKED))
    lines = [
        {"type": "train", "epoch": 1, "iter": 10, "lr": 1e-4, "loss": 4.0, "loss_id": 3.0,
         "loss_triplet": 1.0, "acc": 0.1},
        {"type": "train", "epoch": 1, "iter": 20, "lr": 1e-4, "loss": 3.0, "loss_id": 2.5,
         "loss_triplet": 0.5, "acc": 0.3},
        {"type": "train", "epoch": 2, "iter": 10, "lr": 2e-4, "loss": 2.0, "loss_id": 1.5,
         "loss_triplet": 0.5, "acc": 0.6},
        {"type": "eval", "epoch": 2, "mAP": 0.5, "mINP": 0.2, "rank1": 0.6, "rank5": 0.8,
         "rank10": 0.9},
    ]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (root / "config.yaml").write_text("MODEL:\n  NAME: resnet18\n# a <comment> & more\n")
    return root


def png_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


# ---------------------------------------------------------------------------------------------
# ranked lists


def test_match_kind_table() -> None:
    assert match_kind(5, 0, 5, 1) == "good"
    assert match_kind(5, 0, 5, 0) == "ignored"
    assert match_kind(5, 0, 6, 1) == "bad"
    assert match_kind(5, 0, 6, 0) == "bad"


def test_select_queries_hand_example() -> None:
    ap = np.array([0.5, np.nan, 0.2, 1.0, 0.2])
    assert select_queries(ap, 3, "worst") == [2, 4, 0]
    assert select_queries(ap, 2, "best") == [3, 0]
    assert select_queries(ap, 10, "best") == [3, 0, 2, 4]
    chosen = select_queries(ap, 3, "random", seed=7)
    assert chosen == select_queries(ap, 3, "random", seed=7)
    assert len(set(chosen)) == 3 and chosen == sorted(chosen)
    with pytest.raises(ValueError):
        select_queries(ap, 3, "median")


@settings(max_examples=60, deadline=None)
@given(
    ap=st.lists(st.one_of(st.floats(0, 1), st.just(float("nan"))), min_size=0, max_size=30),
    count=st.integers(1, 40),
    seed=st.integers(0, 2**31),
)
def test_select_queries_properties(ap: list[float], count: int, seed: int) -> None:
    arr = np.array(ap, dtype=np.float64)
    valid = [i for i, v in enumerate(ap) if not math.isnan(v)]
    worst = select_queries(arr, count, "worst")
    best = select_queries(arr, count, "best")
    assert len(worst) == len(best) == min(count, len(valid))
    assert set(worst) <= set(valid) and set(best) <= set(valid)
    assert all(arr[a] <= arr[b] for a, b in zip(worst, worst[1:]))
    assert all(arr[a] >= arr[b] for a, b in zip(best, best[1:]))
    if worst:  # nothing left out is lower than the highest AP shown
        left_out = set(valid) - set(worst)
        assert all(arr[i] >= arr[worst[-1]] for i in left_out)
    rand = select_queries(arr, count, "random", seed)
    assert len(rand) == len(set(rand)) == min(count, len(ap))
    assert all(0 <= i < len(ap) for i in rand)


def test_layout_size_by_hand() -> None:
    layout = RankedLayout(rows=2, cols=3)
    # width: 2 margins 10 + 3 cells (64 + 2*5) + 2 gaps 6 + query gap 18
    # height: margin 10 + title 24 + 2 rows of (128 + 2*5 + label 30) + 1 gap 6 + margin 10
    assert layout.size == (20 + 3 * 74 + 12 + 18, 10 + 24 + 2 * 168 + 6 + 10)
    assert layout.cell_box(0, 0) == (10, 34, 84, 172)
    assert layout.cell_box(1, 2) == (10 + 2 * 80 + 18, 34 + 174, 10 + 2 * 80 + 18 + 74, 34 + 174 + 138)


def test_ranked_frames_match_ground_truth(tmp_path: Path) -> None:
    run = write_synthetic_run(tmp_path / "run")
    ranking = load_ranking(run)
    out = draw_ranked_lists(ranking, [0, 1, 2], tmp_path / "ranked.png", topk=4,
                            title="synthetic", base_dirs=[run])
    pixels = png_rgb(out)
    layout = RankedLayout(rows=3, cols=5)
    assert pixels.shape == (layout.size[1], layout.size[0], 3)
    b = layout.border
    for row in range(3):
        for col in range(5):
            x0, y0, x1, y1 = layout.cell_box(row, col)
            if col > 0 and EXPECTED_KINDS[row][col - 1] is None:  # past the end: blank
                assert np.all(pixels[y0:y1 + layout.label_h, x0:x1] == 255), (row, col)
                continue
            expected = QUERY_COLOR if col == 0 else KIND_TO_COLOR[EXPECTED_KINDS[row][col - 1]]
            samples = [pixels[(y0 + y1) // 2, x0 + b // 2], pixels[(y0 + y1) // 2, x1 - 1 - b // 2],
                       pixels[y0 + b // 2, (x0 + x1) // 2], pixels[y1 - 1 - b // 2, (x0 + x1) // 2]]
            for sample in samples:
                assert tuple(int(v) for v in sample) == expected, (row, col)
            # The right image sits inside the frame: each test image is one solid colour.
            inside = tuple(int(v) for v in pixels[(y0 + y1) // 2, (x0 + x1) // 2])
            image_color = query_color(row) if col == 0 else gallery_color(TOPK_INDEX[row][col - 1])
            assert max(abs(a - c) for a, c in zip(inside, image_color)) <= 2, (row, col)


def test_topk_is_clipped_and_missing_images_drawn_grey(tmp_path: Path, caplog) -> None:
    run = write_synthetic_run(tmp_path / "run")
    (run / "images" / "g3.png").unlink()
    ranking = load_ranking(run)
    out = draw_ranked_lists(ranking, [2], tmp_path / "one.png", topk=50, base_dirs=[run])
    layout = RankedLayout(rows=1, cols=5)  # only 4 ranks are stored
    pixels = png_rgb(out)
    assert pixels.shape[:2] == (layout.size[1], layout.size[0])
    x0, y0, x1, y1 = layout.cell_box(0, 1)  # rank 1 of query 2 is gallery image 3
    assert tuple(int(v) for v in pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == MISSING_FILL
    assert "could not be read" in caplog.text


def test_load_ranking_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(StrongReIDError, match="does not exist"):
        load_ranking(tmp_path / "nowhere")
    with pytest.raises(StrongReIDError, match=r"ranking\.npz does not exist.*strongreid test"):
        load_ranking(tmp_path)
    np.savez(tmp_path / "ranking.npz", q_paths=np.array(["a"]))
    with pytest.raises(StrongReIDError, match="lacks g_paths"):
        load_ranking(tmp_path)
    run = write_synthetic_run(tmp_path / "run")
    arrays = dict(np.load(run / "ranking.npz"))
    arrays["topk_index"][0, 0] = 6  # only 6 gallery images
    np.savez(run / "ranking.npz", **arrays)
    with pytest.raises(StrongReIDError, match="outside the 6 gallery images"):
        load_ranking(run)


# ---------------------------------------------------------------------------------------------
# curves


def test_epoch_summary_by_hand(tmp_path: Path) -> None:
    run = write_synthetic_run(tmp_path / "run")
    series = epoch_summary(read_metrics(run / "metrics.jsonl"))
    assert series["loss"] == {1: 3.5, 2: 2.0}
    assert series["loss_id"] == {1: 2.75, 2: 1.5}
    assert series["loss_triplet"] == {1: 0.75, 2: 0.5}
    assert series["acc"] == pytest.approx({1: 0.2, 2: 0.6})
    assert series["lr"] == {1: 1e-4, 2: 2e-4}
    assert series["mAP"] == {2: 0.5} and series["rank1"] == {2: 0.6}


def test_read_metrics_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "train", "epoch": 1}\n\n{"type": "tra')
    with pytest.raises(StrongReIDError, match=r"metrics\.jsonl, line 3 is not JSON"):
        read_metrics(path)


def test_curve_pictures_have_the_expected_size(tmp_path: Path) -> None:
    cmc = plot_cmc({"a": [0.5, 0.7, 0.9], "b": [0.6, 0.8, 1.0]}, tmp_path / "cmc.png")
    assert Image.open(cmc).size == curves_mod.CMC_SIZE == (800, 600)
    records = read_metrics(write_synthetic_run(tmp_path / "run") / "metrics.jsonl")
    training = plot_training_curves(records, tmp_path / "training.png")
    assert training is not None and Image.open(training).size == (1200, 800)
    assert plot_training_curves([{"type": "note"}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    with pytest.raises(StrongReIDError):
        plot_cmc({}, tmp_path / "empty.png")


def test_visualize_command_writes_every_picture(tmp_path: Path, monkeypatch, capsys) -> None:
    run = write_synthetic_run(tmp_path / "run")
    seen: list[list[str]] = []
    real_plot_cmc = ranked_mod.plot_cmc

    def spy(curves, out_png, **kwargs):
        seen.append(list(curves))
        return real_plot_cmc(curves, out_png, **kwargs)

    monkeypatch.setattr(ranked_mod, "plot_cmc", spy)
    assert visualize_command(str(run), queries=2, topk=3, out=None, seed=1) == 0
    names = {"ranked_worst.png", "ranked_best.png", "ranked_random.png", "cmc.png", "training.png"}
    assert {p.name for p in (run / "viz").iterdir()} == names
    assert set(capsys.readouterr().out.split()) == {str(run / "viz" / n) for n in names}
    # Both curves in one figure, each labelled with its own rank-1 and mAP.
    assert seen == [["without re-ranking (R1 50.0%, mAP 76.5%)", "with re-ranking (R1 75.0%, mAP 81.2%)"]]
    width, height = RankedLayout(rows=2, cols=4).size
    assert Image.open(run / "viz" / "ranked_worst.png").size == (width, height)


def test_visualize_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(StrongReIDError, match="does not exist"):
        visualize_command(str(tmp_path / "x"), queries=2, topk=3, out=None, seed=0)
    with pytest.raises(StrongReIDError, match="nothing to draw"):
        visualize_command(str(tmp_path), queries=2, topk=3, out=None, seed=0)
    with pytest.raises(StrongReIDError, match="at least 1"):
        visualize_command(str(tmp_path), queries=0, topk=3, out=None, seed=0)


# ---------------------------------------------------------------------------------------------
# report


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.metric_rows: list[list[str]] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "table":
            self._table = attrs.get("id")
        elif tag == "tr" and self._table == "metrics":
            self.metric_rows.append([])
        elif tag == "td" and self._table == "metrics":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.metric_rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_format_percent() -> None:
    assert format_percent(0.7654) == "76.54"
    assert format_percent(1) == "100.00"
    assert format_percent(None) == "-" and format_percent(float("nan")) == "-"


def test_report_is_self_contained_and_shows_the_numbers(tmp_path: Path, capsys) -> None:
    run = write_synthetic_run(tmp_path / "run")
    assert report_command(str(run), out=None) == 0
    page = run / "report" / "index.html"
    assert capsys.readouterr().out.strip() == str(page.resolve())
    text = page.read_text()
    parser = _Collector()
    parser.feed(text)
    assert len(parser.images) == 5
    for src in parser.images:
        assert not src.startswith(("/", "file:", "http")) and ".." not in src
        assert (page.parent / src).is_file()
    rows = [r for r in parser.metric_rows if r]
    assert rows == [
        ["without re-ranking", "76.54", "43.21", "50.00", "100.00", "100.00", "3 / 3", "6"],
        ["with re-ranking", "81.23", "50.12", "75.00", "100.00", "100.00", "3 / 3", "6"],
    ]
    assert "# a &lt;comment&gt; &amp; more" in text  # the config, escaped
    assert re.search(r"<td>2</td><td>50\.00</td>", text)  # evaluations during training


def test_report_without_ranking_still_written(tmp_path: Path) -> None:
    run = write_synthetic_run(tmp_path / "run", reranked=False)
    (run / "ranking.npz").unlink()
    page = write_report(run, tmp_path / "elsewhere" / "r.html")
    text = page.read_text()
    assert "No ranking.npz" in text
    assert sorted(p.name for p in (page.parent / "assets").iterdir()) == ["cmc.png", "training.png"]
    with pytest.raises(StrongReIDError, match=r"must be an \.html file"):
        write_report(run, tmp_path / "r.txt")
