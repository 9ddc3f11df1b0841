"""BoxMOT with a strongreid model: crop parity with FeatureExtractor, and BoT-SORT on a synthetic video.

The model is trained here for two epochs on the tiny synthetic set with a NON-ImageNet
INPUT.PIXEL_MEAN/STD, so the tests also prove that `export --target boxmot` folds the
difference into the graph (BoxMOT always feeds ImageNet-normalised crops).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _tracking_video import make_video, pick_pair
from _train_utils import tiny_train_opts

from strongreid import FeatureExtractor
from strongreid.cli import main
from strongreid.config import load_config
from strongreid.engine.trainer import Trainer

pytest.importorskip("boxmot", reason="BoxMOT is not installed: pip install 'strongreid[tracking]'")
pytest.importorskip("onnxruntime", reason="the deploy extra is not installed: pip install '.[deploy]'")

from boxmot import BotSort  # noqa: E402
from boxmot.reid.backends.onnx_backend import ONNXBackend  # noqa: E402
from boxmot.reid.backends.openvino_backend import OpenVinoBackend  # noqa: E402
from boxmot.reid.backends.torchscript_backend import TorchscriptBackend  # noqa: E402

# BoxMOT's loader probes a .torchscript file with torch.load first, and torch.jit.load is
# deprecated in PyTorch 2.14: both warn about BoxMOT's code, not ours.
pytestmark = [pytest.mark.filterwarnings("ignore:'torch.load' received a zip file:UserWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")]

MEAN, STD = "[0.5, 0.45, 0.4]", "[0.25, 0.25, 0.25]"
SEED = 1  # the seed conftest's tiny synthetic set is generated with


@pytest.fixture(scope="module")
def exported(tiny_synthetic_root, tmp_path_factory):
    """A briefly trained ResNet-18 (64x32) exported for BoxMOT as .onnx, .torchscript (and .xml)."""
    root = tmp_path_factory.mktemp("tracking")
    opts = tiny_train_opts(tiny_synthetic_root, root / "run",
                           **{"INPUT.PIXEL_MEAN": MEAN, "INPUT.PIXEL_STD": STD,
                              "SOLVER.EVAL_PERIOD": 10, "SOLVER.CHECKPOINT_PERIOD": 10})
    start = time.perf_counter()
    Trainer(load_config(None, opts)).fit()
    logging.getLogger("strongreid").info("tracking fixture trained in %.1f s",
                                         time.perf_counter() - start)
    weights = root / "run" / "last.pt"
    opts += ["TEST.WEIGHT", str(weights)]
    files = {}
    suffixes = (".onnx", ".torchscript") + ((".xml",) if importlib.util.find_spec("openvino") else ())
    for suffix in suffixes:
        files[suffix] = root / f"strongreid_resnet18{suffix}"
        assert main(["export", "--target", "boxmot", "--out", str(files[suffix]), *opts]) == 0
    return {"cfg": load_config(None, opts), "weights": weights, "files": files}


def _backend(cls, path: Path):
    return cls(weights=path, device=torch.device("cpu"), half=False)


@pytest.mark.parametrize("suffix,cls", [(".onnx", ONNXBackend), (".torchscript", TorchscriptBackend),
                                        (".xml", OpenVinoBackend)])
def test_exact_size_crop_parity_with_feature_extractor(exported, suffix, cls) -> None:
    if suffix not in exported["files"]:
        pytest.skip("OpenVINO is not installed: pip install 'strongreid[quant]'")
    path = exported["files"][suffix]
    sidecar = json.loads(Path(str(path) + ".metadata.json").read_text())
    assert sidecar["model_kwargs"]["img_size"] == [64, 32]
    backend = _backend(cls, path)
    assert tuple(backend.input_shape) == (64, 32)  # from the graph (ONNX) or the sidecar
    video = make_video(SEED, pick_pair(SEED, list(range(1, 25))), frames=12)
    frame = video.frames[5]
    # Boxes of exactly 32 x 64 pixels: neither pipeline resizes, so the features must agree.
    xyxy = np.array([[x1, y1, x1 + 32, y1 + 64] for _, x1, y1, _, _ in video.boxes[5]]
                    + [[300, 100, 332, 164], [0, 0, 32, 64]], dtype=np.float32)
    got = backend.get_features(xyxy, frame)
    rgb = frame[:, :, ::-1]
    crops = [np.ascontiguousarray(rgb[int(y1):int(y2), int(x1):int(x2)]) for x1, y1, x2, y2 in xyxy]
    want = FeatureExtractor(config=exported["cfg"], weights=exported["weights"], device="cpu")(crops)
    assert got.shape == tuple(want.shape) == (4, 512)
    assert np.abs(got - want.numpy()).max() <= 1e-5


def test_strongreids_restatement_of_boxmots_crop_preparation_is_exact() -> None:
    from boxmot.reid.core.crops import prepare_crop_batch
    from boxmot.reid.core.preprocessing import get_preprocess_fn

    from strongreid.deploy import boxmot as contract

    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((128, 64), (50, 21), (64, 32),
                                                                          (300, 90))]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # BaseModelBackend's arrays
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    theirs = prepare_crop_batch(crops, input_shape=(64, 32), device=torch.device("cpu"), half=False,
                                preprocess_fn=get_preprocess_fn(None), mean=mean, std=std)
    assert torch.equal(contract.boxmot_crop_batch(crops, (64, 32)), theirs)


def test_printed_preprocessing_cost_is_what_boxmots_backend_gives(exported, tiny_synthetic_root) -> None:
    """`export --target boxmot` reports the mAP under BoxMOT's preprocessing; BoxMOT's own ONNX
    backend, fed each whole test image as one box, gives that mAP."""
    from PIL import Image

    from strongreid.data.datasets import build_dataset
    from strongreid.evaluation import evaluate_from_config

    path = exported["files"][".onnx"]
    check = json.loads(Path(str(path) + ".metadata.json").read_text())["preprocessing_check"]
    backend = _backend(ONNXBackend, path)
    ds = build_dataset("synthetic", tiny_synthetic_root)
    records = ds.query + ds.gallery
    feats = []
    for r in records:
        bgr = np.ascontiguousarray(np.asarray(Image.open(r.path).convert("RGB"))[:, :, ::-1])
        feats.append(backend.get_features(np.array([[0, 0, bgr.shape[1], bgr.shape[0]]]), bgr)[0])
    f = torch.from_numpy(np.stack(feats))
    pids, cams = np.array([r.pid for r in records]), np.array([r.camid for r in records])
    nq = len(ds.query)
    res = evaluate_from_config(exported["cfg"], f[:nq], f[nq:], pids[:nq], pids[nq:], cams[:nq], cams[nq:])
    assert check["num_query"] == nq and check["mAP_boxmot"] == pytest.approx(res["plain"].mAP, abs=1e-6)
    assert check["cosine_min"] <= check["cosine_mean"] < 1.0  # the two resizers differ


def _track(exported, video, appearance: bool) -> list[dict[int, int]]:
    """Per frame, person (0/1) -> track id under BoT-SORT, with or without the ReID model."""
    tracker = BotSort(
        reid_weights=exported["files"][".onnx"], device=torch.device("cpu"), half=False,
        use_embeddings=appearance, use_cmc=False,  # a static camera: nothing to compensate
        # The people are hidden for 20 frames: keep lost tracks for 60, and let appearance
        # link a track to a detection that no longer overlaps its motion prediction.
        track_buffer=60, proximity_thresh=1.0,
    )
    ids = []
    for frame, boxes in zip(video.frames, video.boxes):
        dets = np.array([[x1, y1, x2, y2, 0.9, 0] for _, x1, y1, x2, y2 in boxes],
                        dtype=np.float32).reshape(-1, 6)
        out = tracker.update(dets, frame)
        ids.append({boxes[int(row[7])][0]: int(row[4]) for row in out})
    return ids


def _before_after(ids: list[dict[int, int]], video) -> tuple[dict[int, int], dict[int, int]]:
    """Track ids of both people in the last frame before the pillar hides them and in the last frame."""
    hidden = [t for t, boxes in enumerate(video.boxes) if not boxes]
    assert hidden, "the video must hide both people behind the pillar"
    before, after = ids[hidden[0] - 1], ids[-1]
    assert set(before) == set(after) == {0, 1}, (before, after)
    assert before[0] != before[1]
    return before, after


def test_botsort_keeps_identities_with_appearance_and_swaps_without(exported) -> None:
    video = make_video(SEED, pick_pair(SEED, list(range(1, 25))))
    before, after = _before_after(_track(exported, video, appearance=True), video)
    assert after == before  # appearance re-links each person to its own track
    before, after = _before_after(_track(exported, video, appearance=False), video)
    assert after == {0: before[1], 1: before[0]}  # motion alone hands each track the other person


@pytest.mark.parametrize("name", ["StrongSort", "DeepOcSort", "HybridSort", "BoostTrack"])
def test_other_trackers_load_the_export_and_track(exported, name) -> None:
    import boxmot

    kwargs = {"use_embeddings": True} if name == "BoostTrack" else {}  # off by default there
    tracker = getattr(boxmot, name)(reid_weights=exported["files"][".onnx"],
                                    device=torch.device("cpu"), half=False, **kwargs)
    video = make_video(SEED, pick_pair(SEED, list(range(1, 25))), frames=8)
    for frame, boxes in zip(video.frames, video.boxes):
        dets = np.array([[x1, y1, x2, y2, 0.9, 0] for _, x1, y1, x2, y2 in boxes], dtype=np.float32)
        out = tracker.update(dets, frame)
    # Both people are confirmed tracks with two different ids by the last frame.
    assert len(out) == 2 and len({int(row[4]) for row in out}) == 2
