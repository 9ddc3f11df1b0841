"""One static HTML page of a run: metrics table, curves, ranked lists and the config.

Every picture is written into `assets/` beside the page and linked relatively, so the report
folder can be zipped and opened anywhere. The page needs no network and no script.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from strongreid.errors import StrongReIDError
from strongreid.paths import atomic_write_text
from strongreid.viz.curves import read_json, read_metrics
from strongreid.viz.ranked import (
    BAD_COLOR,
    GOOD_COLOR,
    IGNORED_COLOR,
    QUERY_COLOR,
    write_visualizations,
)

METRIC_COLUMNS = (("mAP", "mAP"), ("mINP", "mINP"), ("rank1", "Rank-1"), ("rank5", "Rank-5"),
                  ("rank10", "Rank-10"))

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f2f2f2; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
.note { color: #777; font-style: italic; }
.legend span { display: inline-block; padding: 0 6px; margin-right: 8px; color: white; }
"""


def format_percent(value: Any) -> str:
    """A fraction in [0, 1] as the table shows it: percent with two decimals, '-' when absent."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{100.0 * value:.2f}"


def _metrics_rows(results_dir: Path) -> list[tuple[str, Mapping[str, Any]]]:
    rows = []
    for name, label in (("results.json", "without re-ranking"),
                        ("results_reranked.json", "with re-ranking")):
        if (results_dir / name).is_file():
            data = read_json(results_dir / name)
            if name == "results.json" and data.get("re_ranking") is True:
                label = "with re-ranking"
            rows.append((label, data))
    return rows


def _metrics_table(rows: list[tuple[str, Mapping[str, Any]]]) -> str:
    head = "".join(f"<th>{title} (%)</th>" for _, title in METRIC_COLUMNS)
    body = []
    for label, data in rows:
        cells = "".join(f"<td>{format_percent(data.get(key))}</td>" for key, _ in METRIC_COLUMNS)
        counts = (f"<td>{_count(data.get('num_valid'))} / {_count(data.get('num_query'))}</td>"
                  f"<td>{_count(data.get('num_gallery'))}</td>")
        body.append(f"<tr><td>{html.escape(label)}</td>{cells}{counts}</tr>")
    return (f'<table id="metrics"><thead><tr><th>evaluation</th>{head}<th>queries (evaluated / all)'
            f"</th><th>gallery</th></tr></thead><tbody>{''.join(body)}</tbody></table>")


def _hex(color: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{c:02x}" for c in color)


def _count(value: Any) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "-"


def _training_table(records: list[dict[str, Any]]) -> str:
    evals = [r for r in records if r.get("type") == "eval"]
    if not evals:
        return ""
    head = "".join(f"<th>{title} (%)</th>" for _, title in METRIC_COLUMNS)
    body = "".join(
        f"<tr><td>{_count(r.get('epoch'))}</td>"
        + "".join(f"<td>{format_percent(r.get(key))}</td>" for key, _ in METRIC_COLUMNS)
        + "</tr>"
        for r in evals
    )
    return (f'<h3>Evaluations during training</h3><table id="training-evals"><thead><tr><th>epoch</th>'
            f"{head}</tr></thead><tbody>{body}</tbody></table>")


def _figure(path: Path, root: Path, alt: str) -> str:
    rel = path.relative_to(root).as_posix()
    return f'<p><img src="{html.escape(rel)}" alt="{html.escape(alt)}"></p>'


def write_report(results_dir: str | os.PathLike, out_html: str | os.PathLike | None = None,
                 queries: int = 8, topk: int = 10, seed: int = 0) -> Path:
    """Write the report page (default RESULTS/report/index.html) and its pictures; return its path."""
    results = Path(results_dir)
    if not results.is_dir():
        raise StrongReIDError(f"results folder {results} does not exist; pass the OUTPUT_DIR of a run")
    page = Path(out_html) if out_html else results / "report" / "index.html"
    if page.suffix.lower() not in (".html", ".htm"):
        raise StrongReIDError(f"--out {page} must be an .html file")
    root = page.parent
    pictures = write_visualizations(results, root / "assets", queries, topk, seed)

    parts = [f"<h1>strongreid run: {html.escape(results.resolve().name)}</h1>",
             f"<p>Results folder: <code>{html.escape(str(results.resolve()))}</code></p>"]

    rows = _metrics_rows(results)
    for key, title in (("dataset", "Dataset"), ("weights", "Weights")):
        value = rows[0][1].get(key) if rows else None
        if isinstance(value, str) and value:
            parts.append(f"<p>{title}: <code>{html.escape(value)}</code></p>")

    parts.append("<h2>Metrics</h2>")
    if rows:
        parts.append(_metrics_table(rows))
    else:
        parts.append('<p class="note">No results.json: run <code>strongreid test</code> to evaluate.</p>')
    records = read_metrics(results / "metrics.jsonl") if (results / "metrics.jsonl").is_file() else []
    parts.append(_training_table(records))

    parts.append("<h2>Curves</h2>")
    if "cmc" in pictures:
        parts.append(_figure(pictures["cmc"], root, "CMC curve"))
    if "training" in pictures:
        parts.append(_figure(pictures["training"], root, "training curves"))
    if "cmc" not in pictures and "training" not in pictures:
        parts.append('<p class="note">No CMC or training records in this folder.</p>')

    parts.append("<h2>Ranked lists</h2>")
    ranked = [key for key in ("worst", "best", "random") if key in pictures]
    if ranked:
        legend = "".join(f'<span style="background:{_hex(color)}">{text}</span>' for color, text in (
            (GOOD_COLOR, "correct match"), (BAD_COLOR, "wrong identity"),
            (IGNORED_COLOR, "same identity and camera (ignored by the metric)"),
            (QUERY_COLOR, "query")))
        parts.append(f'<p class="legend">Frames: {legend} Numbers under the gallery images are '
                     "distances.</p>")
        titles = {"worst": "Lowest AP", "best": "Highest AP", "random": "Random queries"}
        for key in ranked:
            parts.append(f"<h3>{titles[key]}</h3>")
            parts.append(_figure(pictures[key], root, f"ranked lists: {titles[key].lower()}"))
    else:
        parts.append('<p class="note">No ranking.npz: run <code>strongreid test</code> to rank the gallery.</p>')

    parts.append("<h2>Config</h2>")
    config = results / "config.yaml"
    if config.is_file():
        parts.append(f'<pre id="config">{html.escape(config.read_text(errors="replace"))}</pre>')
    else:
        parts.append('<p class="note">No config.yaml in the results folder.</p>')

    from strongreid import __version__

    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>strongreid report: {html.escape(results.resolve().name)}</title>"
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(p for p in parts if p)
        + f'\n<p class="note">Written by strongreid {__version__}.</p>\n</body></html>\n'
    )
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(page, document)
    return page


def report_command(results: str, out: str | None = None) -> int:
    """`strongreid report --results DIR [--out FILE]`: write the page and print its path."""
    page = write_report(results, out)
    print(page.resolve())
    return 0
