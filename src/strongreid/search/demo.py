"""`strongreid demo search`: the demo's synthetic footage, ingested with the demo's model.

It ends by printing the `strongreid serve` command that opens the search page on it.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

from strongreid.data.synthetic_video import generate_footage
from strongreid.deploy.extractor import FeatureExtractor
from strongreid.errors import StrongReIDError
from strongreid.search.ingest import ingest
from strongreid.search.model_identity import model_identity, recorded
from strongreid.search.store import open_store, thumbs_dir_for

DEMO_GALLERY = "runs/demo-search/gallery.db"


def demo_search_command(model: str = "runs/demo/best.pt", footage: str = "data/footage",
                        gallery: str = DEMO_GALLERY, people: int = 12,
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
    if gallery == DEMO_GALLERY:
        _rebuild_if_another_model(gallery_file, extractor)
    store = open_store(str(gallery_file))
    try:
        # The gallery records the model; a gallery of another model is refused (ingest()).
        stats = ingest(store, extractor, thumbs_dir_for(str(gallery_file)), videos=[str(folder)],
                       detections="det", frame_step=frame_step, gallery=str(gallery_file))
        total = store.count()
    finally:
        store.close()
    if stats.note:
        print(stats.note, file=sys.stderr)
    print(f"{stats.added} crops added, {stats.skipped} already stored; {gallery_file} holds {total}",
          file=sys.stderr)
    cmd = ["strongreid", "serve", "--gallery", str(gallery_file), "--model", str(checkpoint)]
    print("open the search page with:")
    print("  " + " ".join(shlex.quote(c) for c in cmd) + "   # then browse http://127.0.0.1:8000/")
    return 0


def _rebuild_if_another_model(gallery: Path, extractor: FeatureExtractor) -> None:
    """The demo's own gallery (only at its default path: a gallery the user named is theirs)
    is derived from the demo footage: when it records another model (`make demo` retrained
    it) it is rebuilt, where any other gallery of another model is refused."""
    if not gallery.exists():
        return
    store = open_store(str(gallery), create=False)
    try:
        have = recorded(store)
    finally:
        store.close()
    if have is None or have.digest == model_identity(extractor).digest:
        return  # this model's, or from before models were recorded (the ingest adopts it)
    for path in (gallery, gallery.with_suffix(".faiss"), gallery.with_name(gallery.name + "-wal"),
                 gallery.with_name(gallery.name + "-shm")):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    shutil.rmtree(thumbs_dir_for(str(gallery)), ignore_errors=True)
    print(f"{gallery} was built with another model: rebuilt with {extractor.weights}",
          file=sys.stderr)
