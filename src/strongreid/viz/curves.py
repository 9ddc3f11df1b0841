"""CMC curves and training curves (loss terms, accuracy, lr, mAP over epochs) as PNG files."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from strongreid.errors import StrongReIDError

DPI = 100
CMC_SIZE = (800, 600)
TRAINING_SIZE = (1200, 800)
EVAL_KEYS = ("mAP", "rank1", "mINP", "reranked_mAP", "reranked_rank1")


def new_figure(size: tuple[int, int], **kwargs: Any) -> Figure:
    """A figure of exactly `size` = (width, height) pixels when saved with `save_figure`."""
    width, height = size
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Save at the figure's own dpi and without tight cropping, so the pixel size is the one asked for."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white", format="png")
    return path


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A results.json-style file as a dict; errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StrongReIDError(f"{path} does not exist; run `strongreid test` to write it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StrongReIDError(f"cannot read {path}: {exc}; rerun `strongreid test` to rewrite it") from None
    if not isinstance(data, dict):
        raise StrongReIDError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (one JSON object a line; blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise StrongReIDError(f"{path} does not exist; training writes it into OUTPUT_DIR")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                # A run killed mid-write leaves a partial last line: say where, so it can be cut.
                raise StrongReIDError(
                    f"{path}, line {number} is not JSON ({exc.msg}); delete that line and rerun"
                ) from None
            if not isinstance(record, dict):
                raise StrongReIDError(f"{path}, line {number} is not a JSON object")
            records.append(record)
    return records


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def epoch_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, float]]:
    """Per-epoch series from metrics.jsonl records.

    Train records give the mean of every `loss*` key and of `acc` over the epoch's log lines and
    the last `lr` (the scheduler steps once per epoch, so it is constant within one).
    Eval records give `mAP`, `rank1` and `mINP` of their epoch (the last one if repeated); val
    records (DATASETS.VALIDATION) `val_loss` and `val_acc` (1 - their `val_error`).
    """
    sums: dict[str, dict[int, list[float]]] = {}
    out: dict[str, dict[int, float]] = {}
    for record in records:
        epoch = record.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            continue
        kind = record.get("type")
        if kind == "train":
            for key, value in record.items():
                number = _number(value)
                if number is None:
                    continue
                if key == "lr":
                    out.setdefault("lr", {})[epoch] = number
                elif key.startswith("loss") or key == "acc":
                    sums.setdefault(key, {}).setdefault(epoch, []).append(number)
        elif kind == "val":  # DATASETS.VALIDATION: held-out loss and top-1 accuracy
            for key, name in (("val_loss", "val_loss"), ("val_error", "val_acc")):
                number = _number(record.get(key))
                if number is not None:
                    out.setdefault(name, {})[epoch] = 1.0 - number if name == "val_acc" else number
        elif kind == "eval":
            for key in EVAL_KEYS:
                number = _number(record.get(key))
                if number is not None:
                    out.setdefault(key, {})[epoch] = number
    for key, by_epoch in sums.items():
        out[key] = {e: sum(v) / len(v) for e, v in by_epoch.items()}
    return {key: dict(sorted(series.items())) for key, series in out.items()}


def _plot_series(ax: Any, series: Mapping[str, Mapping[int, float]], keys: Sequence[str],
                 scale: float = 1.0) -> bool:
    drawn = False
    for key in keys:
        points = series.get(key)
        if not points:
            continue
        epochs = list(points)
        ax.plot(epochs, [points[e] * scale for e in epochs], marker="o", markersize=3, label=key)
        drawn = True
    if drawn:
        ax.legend(loc="best", fontsize=8)
        ax.grid(True, alpha=0.3)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return drawn


def plot_training_curves(records: Sequence[Mapping[str, Any]], out_png: str | os.PathLike,
                         size: tuple[int, int] = TRAINING_SIZE) -> Path | None:
    """Loss terms, ID accuracy, learning rate and evaluation results over epochs (2 x 2 panels).

    Returns None (and writes nothing) when the records hold neither train nor eval entries.
    """
    series = epoch_summary(records)
    if not series:
        return None
    fig = new_figure(size, layout="constrained")
    axes = fig.subplots(2, 2)
    loss_keys = sorted(k for k in series if k.startswith("loss"))
    # The total first, then its terms, so the colours stay the same from run to run.
    if "loss" in loss_keys:
        loss_keys.remove("loss")
        loss_keys.insert(0, "loss")
    _plot_series(axes[0][0], series, loss_keys + ["val_loss"])
    axes[0][0].set_title("loss (mean per epoch)")
    _plot_series(axes[0][1], series, ["acc", "val_acc"], scale=100.0)
    axes[0][1].set_title("ID accuracy (%)")
    if _plot_series(axes[1][0], series, ["lr"]):
        axes[1][0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[1][0].set_title("learning rate")
    _plot_series(axes[1][1], series, EVAL_KEYS, scale=100.0)
    axes[1][1].set_title("evaluation (%)")
    return save_figure(fig, out_png)


def plot_cmc(curves: Mapping[str, Sequence[float]], out_png: str | os.PathLike,
             max_rank: int = 50, size: tuple[int, int] = CMC_SIZE) -> Path:
    """One CMC line per entry of `curves` (label -> CMC fractions, rank 1 first), in percent."""
    if not curves:
        raise StrongReIDError("no CMC curve to draw: results.json has no 'cmc' list")
    fig = new_figure(size, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for label, cmc in curves.items():
        values = [100.0 * float(v) for v in list(cmc)[:max_rank]]
        if not values:
            raise StrongReIDError(f"the CMC curve {label!r} is empty; rerun `strongreid test`")
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
    ax.set_xlabel("rank")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("matching rate (%)")
    ax.set_title("CMC")
    ax.set_ylim(0, 100.5)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return save_figure(fig, out_png)


def cmc_label(name: str, results: Mapping[str, Any]) -> str:
    """Legend text: the curve's name with its rank-1 and mAP."""
    parts = []
    for key, short in (("rank1", "R1"), ("mAP", "mAP")):
        number = _number(results.get(key))
        if number is not None:
            parts.append(f"{short} {100 * number:.1f}%")
    return f"{name} ({', '.join(parts)})" if parts else name
