"""Helpers shared by the gallery-search tests: tiny footage and a tiny model that knows it.

The model is a random-weight ResNet-18 at 64x32 (see tiny_model); training one costs minutes
on two shared cores.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from strongreid.config import load_config
from strongreid.config.loader import dump_config
from strongreid.data.synthetic_video import generate_footage
from strongreid.deploy.extractor import FeatureExtractor
from strongreid.evaluation.calibration import Calibration
from strongreid.modeling import build_model
from strongreid.search.ingest import decode_crops, find_sequences, ingest, video_items
from strongreid.search.store import open_store

SIZE = (64, 32)
OPTS = {
    "MODEL.DEVICE": "cpu", "MODEL.NAME": "resnet18", "MODEL.PRETRAIN_CHOICE": "none",
    "MODEL.AMP": "off", "MODEL.CHANNELS_LAST": "off", "MODEL.LAST_STRIDE": "2",
    "INPUT.SIZE_TEST": str(list(SIZE)), "TEST.NECK_FEAT": "before", "INPUT.SIZE_TRAIN": str(list(SIZE)),
    "DATALOADER.NUM_WORKERS": "0", "TEST.IMS_PER_BATCH": "64",
}
PEOPLE, CAMS, FRAMES, FPS = 4, 3, 24, 5.0

# A same-person calibration by hand (tests of the service's probabilities and decisions).
CAL_BINS = 200  # bin k holds cosine scores in [-1 + k/100, -1 + (k+1)/100)
SLOPE, INTERCEPT = 100.0, -97.0  # P(same | s) = 1 / (1 + exp(-(100 s - 97))): 0.5 at s = 0.97
# (genuine, impostor) pairs in the bin starting at each score. Tail precision (pairs scoring at
# least the bin's lower edge): 0.99 -> 99/100 = 0.99, 0.98 -> 190/200 = 0.95,
# 0.97 -> 270/300 = 0.9, 0.96 -> 300/600 = 0.5, 0.95 and below -> 300/1000 = 0.3.
CAL_COUNTS = {0.99: (99, 1), 0.98: (91, 9), 0.97: (80, 20), 0.96: (30, 270), 0.95: (0, 400)}
# So: precision -> (threshold, recall out of 300 genuine pairs), by hand.
CALIBRATION_POINTS = {0.8: (0.97, 270 / 300), 0.9: (0.97, 270 / 300),
                      0.95: (0.98, 190 / 300), 0.99: (0.99, 99 / 300)}


def platt(score: float) -> float:
    """P(same person | score) of hand_calibration, by the Platt formula."""
    return 1.0 / (1.0 + math.exp(-(SLOPE * score + INTERCEPT)))


def hand_calibration(root: Path) -> Calibration:
    """A calibration with the counts and logistic above (its source names folders under root)."""
    genuine, impostor = [0] * CAL_BINS, [0] * CAL_BINS
    for edge, (g, i) in CAL_COUNTS.items():
        k = round((edge + 1) * CAL_BINS / 2)
        genuine[k], impostor[k] = g, i
    # The source names folders on disk, as `strongreid calibrate` writes them: /api/info must
    # not repeat them.
    source = {"kind": "labels", "model": "tiny.pt", "data": str(root / "labelled-people"),
              "measurement": {"on": str(root / "held-out-people"), "requested": 0.95,
                              "measured": 0.94, "recall": 0.6, "identities": 12}}
    return Calibration(tuple(genuine), tuple(impostor), SLOPE, INTERCEPT, source)


def make_footage(out: Path, **kw) -> dict:
    """Four people through three cameras, 24 frames each (about 2 s to write)."""
    args = {"people": PEOPLE, "cams": CAMS, "frames": FRAMES, "fps": FPS, "seed": 3, **kw}
    return generate_footage(out, **args)


def footage_crops(footage: Path) -> tuple[list, np.ndarray, list[str]]:
    """Every ground-truth crop: (PIL crops, MOT ids, camera names)."""
    crops, ids, cams = [], [], []
    for seq in find_sequences(footage, "gt"):
        for item, crop in decode_crops(seq.video, video_items(seq, footage)):
            crops.append(crop)
            ids.append(item.meta["track"])
            cams.append(seq.name)
    return crops, np.asarray(ids), cams


def tiny_model(out: Path, num_classes: int = PEOPLE, seed: int = 0) -> Path:
    """A random-weight ResNet-18 checkpoint, as training writes it, serving pooled features.

    TEST.NECK_FEAT 'before' gives the pooled backbone feature, which on this footage already
    finds a crop's person in another camera for about 9 crops in 10 (measured on seed 3);
    that is all the search tests need from a model, and it costs no training time.
    """
    cfg = load_config(None, [x for kv in OPTS.items() for x in kv])
    torch.manual_seed(seed)
    model = build_model(cfg, num_classes)
    ckpt = {"model": model.state_dict(), "num_classes": num_classes, "arch": cfg.MODEL.NAME,
            "config": dump_config(cfg)}
    torch.save(ckpt, out)
    return out


def ingested_gallery(root: Path) -> dict:
    """Footage, the tiny model and a gallery of the footage's ground-truth crops under `root`.

    The caller closes `store`.
    """
    footage = root / "footage"
    make_footage(footage)
    model = tiny_model(root / "tiny.pt")
    extractor = FeatureExtractor(None, model, device="cpu")
    store = open_store(str(root / "gallery.db"))
    stats = ingest(store, extractor, root / "gallery.thumbs", videos=[str(footage)],
                   detections="gt", progress=False)
    return {"root": root, "footage": footage, "model": model, "extractor": extractor,
            "store": store, "thumbs": root / "gallery.thumbs", "stats": stats}


@contextmanager
def serving(app) -> Iterator[int]:
    """A real uvicorn server for `app` on 127.0.0.1 (a free port) in a thread: yields the port."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    try:
        yield port
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
