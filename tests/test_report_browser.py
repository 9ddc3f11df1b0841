"""The HTML report in a real browser: headless Chromium loads it, every image decodes, the
metrics table shows the run's numbers, and a screenshot shows the ranked lists' frames.

No Python browser driver is needed: Chromium's `--dump-dom` prints the DOM after the page has
loaded, and a copy of the report with one inline script writes what the page saw into the DOM.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_viz import RESULTS, RESULTS_RERANKED, write_synthetic_run

from strongreid.viz.ranked import BAD_COLOR, GOOD_COLOR
from strongreid.viz.report import format_percent, write_report

CHROMIUM = next(
    (found for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
     if (found := shutil.which(name))),
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium on PATH (chromium, chromium-browser or google-chrome); "
    "install it with `apt-get install -y chromium` to run the browser test",
)

WINDOW = (1280, 2600)

# Runs after every image has loaded or failed (the load event), and writes the findings into
# the DOM, where --dump-dom brings them out.
CHECK_SCRIPT = """
<script>
window.addEventListener("load", function () {
  var table = document.getElementById("metrics");
  var report = {
    images: Array.from(document.images).map(function (img) {
      return {src: img.getAttribute("src"), complete: img.complete,
              width: img.naturalWidth, height: img.naturalHeight};
    }),
    tableHeight: table ? table.getBoundingClientRect().height : 0,
    metrics: table ? Array.from(table.tBodies[0].rows).map(function (row) {
      return Array.from(row.cells).map(function (cell) { return cell.innerText.trim(); });
    }) : []
  };
  var out = document.createElement("pre");
  out.id = "browser-checks";
  out.textContent = JSON.stringify(report);
  document.body.appendChild(out);
});
</script>
"""


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    run = write_synthetic_run(tmp_path_factory.mktemp("browser") / "run")
    return write_report(run, queries=3, topk=4)


def test_every_image_loads_and_the_table_shows_the_numbers(report: Path, tmp_path: Path) -> None:
    page = report.read_text()
    assert "</body>" in page
    check_page = report.with_name("browser_check.html")
    check_page.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    done = chromium(["--virtual-time-budget=10000", "--dump-dom", check_page.as_uri()],
                    tmp_path / "profile")
    found = re.search(r'<pre id="browser-checks">(.*?)</pre>', done.stdout, re.S)
    assert found, f"Chromium printed no check results (exit {done.returncode}): {done.stderr[-2000:]}"
    seen = json.loads(html.unescape(found.group(1)))

    srcs = sorted(img["src"] for img in seen["images"])
    assert srcs == ["assets/cmc.png", "assets/ranked_best.png", "assets/ranked_random.png",
                    "assets/ranked_worst.png", "assets/training.png"]
    for img in seen["images"]:
        assert img["complete"] and img["width"] > 0 and img["height"] > 0, img
        with Image.open(report.parent / img["src"]) as file:
            assert (img["width"], img["height"]) == file.size

    assert seen["tableHeight"] > 0
    expected = [
        [label] + [format_percent(res[k]) for k in ("mAP", "mINP", "rank1", "rank5", "rank10")]
        + [f"{res['num_valid']} / {res['num_query']}", str(res["num_gallery"])]
        for label, res in (("without re-ranking", RESULTS), ("with re-ranking", RESULTS_RERANKED))
    ]
    assert seen["metrics"] == expected
    assert expected[0][1:4] == ["76.54", "43.21", "50.00"]  # the numbers written into results.json


def test_screenshot_shows_the_page(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    done = chromium([f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}",
                     "--virtual-time-budget=10000", report.as_uri()], tmp_path / "profile")
    assert shot.is_file(), f"no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    with Image.open(shot) as img:
        assert img.size == WINDOW
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    # The ranked lists are drawn at their natural size, so their frame colours appear exactly.
    for color in (GOOD_COLOR, BAD_COLOR):
        assert np.all(pixels == np.array(color), axis=1).sum() > 500, color
    assert len(np.unique(pixels, axis=0)) > 50  # text, plots and pictures, not a blank page
