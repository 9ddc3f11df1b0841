"""`strongreid demo search`: the demo's synthetic footage, ingested with the demo's model.

It ends by printing the `strongreid serve` command that opens the search page on it.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from strongreid.data.synthetic_video import generate_footage
from strongreid.deploy.extractor import FeatureExtractor
from strongreid.errors import StrongReIDError
from strongreid.search.ingest import ingest
from strongreid.search.store import open_store, thumbs_dir_for


def demo_search_command(model: str = "runs/demo/best.pt", footage: str = "data/footage",
                        gallery: str = "runs/demo-search/gallery.db", people: int = 12,
                        cams: int = 4, frames: int = 150, seed: int = 0, frame_step: int = 2,
                        device: str = "auto") -> int:
    """Footage (once), then an idempotent ingest, then the serve command."""
    checkpoint = Path(model)
    if not checkpoint.is_file():
        raise StrongReIDError(f"{checkpoint} does not exist: train the demo model first (`make demo`), "
                              "or pass --model with a trained checkpoint")
    folder = Path(footage)
    if not (folder / "footage.json").is_file():
        generate_footage(folder, people=people, cams=cams, frames=frames, seed=seed)
        print(f"footage written to {folder}", file=sys.stderr)
    gallery_file = Path(gallery)
    extractor = FeatureExtractor(None, checkpoint, device=device)
    store = open_store(str(gallery_file))
    try:
        stats = ingest(store, extractor, thumbs_dir_for(str(gallery_file)), videos=[str(folder)],
                       detections="det", frame_step=frame_step)
        total = store.count()
    finally:
        store.close()
    print(f"{stats.added} crops added, {stats.skipped} already stored; {gallery_file} holds {total}",
          file=sys.stderr)
    cmd = ["strongreid", "serve", "--gallery", str(gallery_file), "--model", str(checkpoint)]
    print("open the search page with:")
    print("  " + " ".join(shlex.quote(c) for c in cmd) + "   # then browse http://127.0.0.1:8000/")
    return 0
