"""Ranked-list pictures: each row a query and its top-k gallery images, framed by correctness.

A frame is green for a gallery image of the query's identity from another camera (a correct
match), red for another identity, and grey for the query's identity seen by the query's own
camera, which the Market protocol leaves out of CMC and mAP. Distances are written
under the gallery images, the query's AP under the query.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from strongreid.errors import StrongReIDError
from strongreid.viz.curves import (
    DPI,
    cmc_label,
    new_figure,
    plot_cmc,
    plot_training_curves,
    read_json,
    read_metrics,
    save_figure,
)

logger = logging.getLogger("strongreid")

GOOD_COLOR = (0, 160, 0)
BAD_COLOR = (220, 0, 0)
IGNORED_COLOR = (150, 150, 150)
QUERY_COLOR = (30, 80, 200)
MISSING_FILL = (225, 225, 225)
KIND_COLORS = {"good": GOOD_COLOR, "bad": BAD_COLOR, "ignored": IGNORED_COLOR, "query": QUERY_COLOR}

RANKING_KEYS = ("q_paths", "g_paths", "q_pids", "g_pids", "q_camids", "g_camids",
                "topk_index", "topk_dist", "ap")
SELECTIONS = ("worst", "best", "random")


@dataclass(frozen=True)
class RankedLayout:
    """Pixel geometry of a ranked-list picture (origin top-left, boxes end-exclusive).

    Column 0 is the query; columns 1..cols-1 are ranks 1..k. Tests read it to find each frame.
    """

    rows: int
    cols: int
    image_w: int = 64
    image_h: int = 128
    border: int = 5
    label_h: int = 30
    gap: int = 6
    query_gap: int = 18
    margin: int = 10
    title_h: int = 24

    @property
    def cell_w(self) -> int:
        return self.image_w + 2 * self.border

    @property
    def cell_h(self) -> int:
        return self.image_h + 2 * self.border

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the PNG in pixels."""
        width = 2 * self.margin + self.cols * self.cell_w + (self.cols - 1) * self.gap + self.query_gap
        height = self.margin + self.title_h + self.rows * (self.cell_h + self.label_h) \
            + (self.rows - 1) * self.gap + self.margin
        return width, height

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the framed image in the cell at `row`, `col`."""
        x0 = self.margin + col * (self.cell_w + self.gap) + (self.query_gap if col > 0 else 0)
        y0 = self.margin + self.title_h + row * (self.cell_h + self.label_h + self.gap)
        return x0, y0, x0 + self.cell_w, y0 + self.cell_h


def match_kind(q_pid: int, q_camid: int, g_pid: int, g_camid: int) -> str:
    """'good' (same identity, other camera), 'ignored' (same identity and camera) or 'bad'."""
    if g_pid != q_pid:
        return "bad"
    return "ignored" if g_camid == q_camid else "good"


def load_ranking(results_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """RESULTS/ranking.npz (written by `strongreid test`) as a dict of checked arrays."""
    path = Path(results_dir) / "ranking.npz"
    if not Path(results_dir).is_dir():
        raise StrongReIDError(f"results folder {results_dir} does not exist; pass the OUTPUT_DIR of a run")
    if not path.is_file():
        raise StrongReIDError(
            f"{path} does not exist; run `strongreid test` with this OUTPUT_DIR first (it writes ranking.npz)"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise StrongReIDError(f"cannot read {path} ({exc}); rerun `strongreid test` to rewrite it") from None
    missing = [key for key in RANKING_KEYS if key not in arrays]
    if missing:
        raise StrongReIDError(f"{path} lacks {', '.join(missing)}; rerun `strongreid test` to rewrite it")
    num_query = len(arrays["q_paths"])
    index, dist = arrays["topk_index"], arrays["topk_dist"]
    if index.ndim != 2 or index.shape != dist.shape or index.shape[0] != num_query \
            or len(arrays["ap"]) != num_query:
        raise StrongReIDError(
            f"{path}: topk_index {index.shape}, topk_dist {dist.shape} and ap {arrays['ap'].shape} do "
            f"not fit {num_query} queries; rerun `strongreid test`"
        )
    # -1 marks the end of a list shorter than K (a small gallery, junk removed).
    if index.size and (index.min() < -1 or index.max() >= len(arrays["g_paths"])):
        raise StrongReIDError(f"{path}: topk_index points outside the {len(arrays['g_paths'])} gallery images")
    return arrays


def select_queries(ap: np.ndarray, count: int, how: str, seed: int = 0) -> list[int]:
    """Query indices to draw: 'worst'/'best' by AP among evaluated queries (ties by index),
    'random' among all queries with a seeded generator, returned in ascending order."""
    ap = np.asarray(ap, dtype=np.float64)
    if how == "random":
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(ap), size=min(count, len(ap)), replace=False)
        return sorted(int(i) for i in chosen)
    valid = np.flatnonzero(~np.isnan(ap))
    if how == "worst":
        order = valid[np.argsort(ap[valid], kind="stable")]
    elif how == "best":
        order = valid[np.argsort(-ap[valid], kind="stable")]
    else:
        raise ValueError(f"unknown selection {how!r}; use one of {SELECTIONS}")
    return [int(i) for i in order[:count]]


def resolve_queries(ranking: dict[str, np.ndarray], wanted: list[str]) -> list[int]:
    """Query indices of `wanted`, in order: a 0-based index into the ranking's queries (layumi
    demo.py's --query_index), or an image named by its path, a path suffix or its file name."""
    paths = [str(p) for p in ranking["q_paths"]]
    num = len(paths)
    chosen: list[int] = []
    for item in wanted:
        text = str(item).strip()
        if text.lstrip("-").isdigit():
            index = int(text)
            if not 0 <= index < num:
                raise StrongReIDError(
                    f"--query {text}: the ranking has {num} queries, so an index is 0..{num - 1}"
                )
            chosen.append(index)
            continue
        norm = text.replace(os.sep, "/")
        matches = [i for i, p in enumerate(paths)
                   if p == text or p.replace(os.sep, "/").endswith("/" + norm.lstrip("/"))]
        if not matches:
            example = os.path.basename(paths[0]) if paths else "none"
            raise StrongReIDError(
                f"--query {text!r} is neither a query index (0..{num - 1}) nor the name of a query "
                f"image of this ranking (e.g. {example})"
            )
        if len(matches) > 1:
            shown = ", ".join(paths[i] for i in matches[:3])
            raise StrongReIDError(
                f"--query {text!r} names {len(matches)} query images ({shown}); give more of the "
                "path or the index"
            )
        chosen.append(matches[0])
    return chosen


def _resolve(path: str, base_dirs: list[Path]) -> Path | None:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if not candidate.is_absolute():
        for base in base_dirs:
            if (base / candidate).is_file():
                return base / candidate
    return None


def _cell_image(path: str, base_dirs: list[Path], layout: RankedLayout,
                color: tuple[int, int, int]) -> tuple[np.ndarray, bool]:
    """The image resized to the cell and framed; a grey tile when the file is missing or unreadable."""
    size = (layout.image_w, layout.image_h)
    found = _resolve(path, base_dirs)
    img = None
    if found is not None:
        try:
            with Image.open(found) as raw:
                img = raw.convert("RGB").resize(size, Image.Resampling.BILINEAR)
        except (UnidentifiedImageError, OSError, ValueError):
            img = None
    ok = img is not None
    if img is None:
        img = Image.new("RGB", size, MISSING_FILL)
    framed = ImageOps.expand(img, border=layout.border, fill=color)
    return np.asarray(framed), ok


def draw_ranked_lists(ranking: dict[str, np.ndarray], query_indices: list[int],
                      out_png: str | os.PathLike, topk: int = 10, title: str = "",
                      base_dirs: list[Path] | None = None,
                      layout: RankedLayout | None = None) -> Path:
    """One PNG with a row per query: the query, then its top-k gallery images framed by match kind."""
    if not query_indices:
        raise StrongReIDError("no query to draw: the ranking has no (evaluated) queries")
    k = min(int(topk), ranking["topk_index"].shape[1])
    if layout is None:
        layout = RankedLayout(rows=len(query_indices), cols=k + 1)
    width, height = layout.size
    fig = new_figure((width, height))
    bases = list(base_dirs or [])
    missing: list[str] = []

    def place(img: np.ndarray, box: tuple[int, int, int, int]) -> None:
        x0, y0, x1, y1 = box
        ax = fig.add_axes((x0 / width, 1 - y1 / height, (x1 - x0) / width, (y1 - y0) / height))
        # Pixel-for-pixel: the framed tile is exactly the axes' size, so no resampling blurs the frame.
        ax.imshow(img, interpolation="nearest", aspect="auto")
        ax.set_axis_off()

    def label(box: tuple[int, int, int, int], text: str) -> None:
        x0, _, x1, y1 = box
        fig.text((x0 + x1) / 2 / width, 1 - (y1 + 2) / height, text, ha="center", va="top",
                 fontsize=7, linespacing=1.1)

    if title:
        fig.text(layout.margin / width, 1 - layout.margin / height, title, ha="left", va="top",
                 fontsize=11, fontweight="bold")
    for row, q in enumerate(query_indices):
        q_pid, q_cam = int(ranking["q_pids"][q]), int(ranking["q_camids"][q])
        box = layout.cell_box(row, 0)
        img, ok = _cell_image(str(ranking["q_paths"][q]), bases, layout, QUERY_COLOR)
        if not ok:
            missing.append(str(ranking["q_paths"][q]))
        place(img, box)
        ap = float(ranking["ap"][q])
        ap_text = "AP n/a" if np.isnan(ap) else f"AP {ap:.2f}"
        label(box, f"query, id {q_pid}\n{ap_text}")
        for rank in range(k):
            g = int(ranking["topk_index"][q, rank])
            if g < 0:  # the list ends early: leave the rest of the row empty
                break
            kind = match_kind(q_pid, q_cam, int(ranking["g_pids"][g]), int(ranking["g_camids"][g]))
            box = layout.cell_box(row, rank + 1)
            img, ok = _cell_image(str(ranking["g_paths"][g]), bases, layout, KIND_COLORS[kind])
            if not ok:
                missing.append(str(ranking["g_paths"][g]))
            place(img, box)
            label(box, f"{float(ranking['topk_dist'][q, rank]):.3f}\nid {int(ranking['g_pids'][g])}")
    if missing:
        logger.warning("%d image(s) of the ranking could not be read and are drawn grey, e.g. %s",
                       len(missing), missing[0])
    return save_figure(fig, out_png)


def write_visualizations(results_dir: str | os.PathLike, out_dir: str | os.PathLike,
                         queries: int = 8, topk: int = 10, seed: int = 0,
                         query: list[str] | None = None) -> dict[str, Path]:
    """Every picture the run's files allow: ranked lists (worst/best/random), CMC, training curves.

    Keys of the result: 'worst', 'best', 'random', 'cmc', 'training' for the files written.
    With `query` (indices or file names, see `resolve_queries`) only the ranked lists of those
    queries are drawn, one row each in the order given, to 'query' (ranked_query.png), as
    layumi's demo.py draws the top-10 of one chosen query.
    """
    if query:
        if topk < 1:
            raise StrongReIDError(f"--topk ({topk}) must be at least 1")
        ranking = load_ranking(results_dir)
        chosen = resolve_queries(ranking, list(query))
        title = "query " + ", ".join(str(q) for q in chosen)
        png = draw_ranked_lists(ranking, chosen, Path(out_dir) / "ranked_query.png", topk, title,
                                [Path(results_dir), Path.cwd()])
        return {"query": png}
    if queries < 1 or topk < 1:
        raise StrongReIDError(f"--queries ({queries}) and --topk ({topk}) must be at least 1")
    results = Path(results_dir)
    if not results.is_dir():
        raise StrongReIDError(f"results folder {results} does not exist; pass the OUTPUT_DIR of a run")
    out = Path(out_dir)
    written: dict[str, Path] = {}
    ranking = load_ranking(results) if (results / "ranking.npz").is_file() else None
    if ranking is not None:
        bases = [results, Path.cwd()]
        for how in SELECTIONS:
            chosen = select_queries(ranking["ap"], queries, how, seed)
            if not chosen:
                continue
            title = {"worst": f"{len(chosen)} queries with the lowest AP",
                     "best": f"{len(chosen)} queries with the highest AP",
                     "random": f"{len(chosen)} random queries (seed {seed})"}[how]
            written[how] = draw_ranked_lists(ranking, chosen, out / f"ranked_{how}.png", topk,
                                             title, bases)
    curves: dict[str, list[float]] = {}
    for name, default_label in (("results.json", "without re-ranking"),
                                ("results_reranked.json", "with re-ranking")):
        if (results / name).is_file():
            data = read_json(results / name)
            cmc = data.get("cmc")
            if isinstance(cmc, list) and cmc:
                label = "with re-ranking" if data.get("re_ranking") is True else default_label
                curves[cmc_label(label, data)] = cmc
    if not curves and ranking is not None and "cmc" in ranking and ranking["cmc"].size:
        curves["CMC"] = [float(v) for v in ranking["cmc"]]
    if curves:
        written["cmc"] = plot_cmc(curves, out / "cmc.png")
    if (results / "metrics.jsonl").is_file():
        training = plot_training_curves(read_metrics(results / "metrics.jsonl"), out / "training.png")
        if training is not None:
            written["training"] = training
    if not written:
        raise StrongReIDError(
            f"{results} holds none of ranking.npz, results.json, metrics.jsonl: nothing to draw; "
            "pass the OUTPUT_DIR of a `strongreid train` or `strongreid test` run"
        )
    return written


def visualize_command(results: str, queries: int = 8, topk: int = 10, out: str | None = None,
                      seed: int = 0, query: list[str] | None = None) -> int:
    """`strongreid visualize --results DIR [--queries N] [--topk K] [--out DIR] [--seed S]
    [--query N|FILE ...]`."""
    folder = Path(out) if out else Path(results) / "viz"
    written = write_visualizations(results, folder, int(queries), int(topk), int(seed or 0), query)
    for path in written.values():
        print(path)
    return 0


__all__ = [
    "BAD_COLOR",
    "DPI",
    "GOOD_COLOR",
    "IGNORED_COLOR",
    "QUERY_COLOR",
    "RankedLayout",
    "draw_ranked_lists",
    "load_ranking",
    "match_kind",
    "resolve_queries",
    "select_queries",
    "visualize_command",
    "write_visualizations",
]
