"""`strongreid demo search`: the demo's synthetic footage, ingested with the demo's model.

It ends by printing the `strongreid serve` command that opens the search page on it.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from strongreid.errors import StrongReIDError


def demo_search_command(args: Any) -> int:
    """Footage (once), then an idempotent ingest, then the serve command."""
    from strongreid.data.synthetic_video import generate_footage
    from strongreid.deploy.extractor import FeatureExtractor
    from strongreid.search.ingest import ingest
    from strongreid.search.store import open_store, thumbs_dir_for

    model = Path(args.model)
    if not model.is_file():
        raise StrongReIDError(f"{model} does not exist: train the demo model first (`make demo`), "
                              "or pass --model with a trained checkpoint")
    footage = Path(args.footage)
    if not (footage / "footage.json").is_file():
        generate_footage(footage, people=args.people, cams=args.cams, frames=args.frames,
                         seed=args.seed)
        print(f"footage written to {footage}", file=sys.stderr)
    gallery = Path(args.gallery)
    extractor = FeatureExtractor(None, model, device=args.device)
    store = open_store(str(gallery))
    try:
        stats = ingest(store, extractor, thumbs_dir_for(str(gallery)), videos=[str(footage)],
                       detections="det", frame_step=args.frame_step)
        total = store.count()
    finally:
        store.close()
    print(f"{stats.added} crops added, {stats.skipped} already stored; {gallery} holds {total}",
          file=sys.stderr)
    cmd = ["strongreid", "serve", "--gallery", str(gallery), "--model", str(model)]
    print("open the search page with:")
    print("  " + " ".join(shlex.quote(c) for c in cmd) + "   # then browse http://127.0.0.1:8000/")
    return 0
