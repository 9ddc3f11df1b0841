"""Multi-query, multi-scale / flip test-time augmentation, validation loss and `visualize --query`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_viz import write_synthetic_run
from torch import nn

from strongreid.cli import main as cli_main
from strongreid.engine.inference import tta_forward
from strongreid.engine.validation import validation_metrics
from strongreid.errors import StrongReIDError
from strongreid.evaluation import multi_query_features
from strongreid.modeling.outputs import ModelOutput
from strongreid.viz.ranked import RankedLayout, resolve_queries


def test_multi_query_features_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    q_pids, q_cams = [1, 1, 2], [0, 1, 0]
    # Query 0 (id 1, cam 0): images [1, 0] and [0, 5]; query 1 (id 1, cam 1): [3, 4];
    # query 2 (id 2, cam 0): none, keeps its own. [9, 9] is another identity.
    mq = torch.tensor([[2.0, 0.0], [0.0, 5.0], [3.0, 4.0], [9.0, 9.0]])
    mq_pids, mq_cams = [1, 1, 1, 3], [0, 0, 1, 0]
    out, kept = multi_query_features(q, q_pids, q_cams, mq, mq_pids, mq_cams)
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[r, r], [0.6, 0.8], [0.6, 0.8]])  # mean([1,0],[0,1]) normalised
    torch.testing.assert_close(out, expected)
    assert kept == 1
    raw, _ = multi_query_features(q, q_pids, q_cams, mq, mq_pids, mq_cams, normalize=False)
    torch.testing.assert_close(raw, torch.tensor([[1.0, 2.5], [3.0, 4.0], [3.0, 4.0]]))


class Corner(nn.Module):
    """Feature = (top-left pixel of channel 0, image width): hand-checkable views."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = torch.full((x.shape[0],), float(x.shape[-1]))
        return torch.stack([x[:, 0, 0, 0], width], dim=1)


def test_tta_forward_flip_and_scales_by_hand():
    x = torch.arange(8.0).reshape(1, 1, 2, 4).expand(1, 3, 2, 4).contiguous()
    model = Corner()
    torch.testing.assert_close(tta_forward(model, x), torch.tensor([[0.0, 4.0]]))
    # flip: the mirror's top-left is the original's top-right (3): (0 + 3) / 2.
    torch.testing.assert_close(tta_forward(model, x, flip=True), torch.tensor([[1.5, 4.0]]))
    # layumi --ms 1,2.25 resizes each side by sqrt(2.25) = 1.5: width 4 -> 6; a constant image
    # keeps its value under bicubic interpolation.
    const = torch.full((1, 3, 2, 4), 7.0)
    torch.testing.assert_close(tta_forward(model, const, True, (1.0, 2.25)), torch.tensor([[7.0, 5.0]]))


def test_validation_metrics_by_hand():
    class Fixed(nn.Module):
        """Training forward -> ModelOutput(logits, feature), as ReIDModel / LayumiModel."""

        def forward(self, x):
            logits = x[:, 0, 0, :2]
            return ModelOutput(logits, logits) if self.training else logits

    images = torch.zeros(2, 1, 1, 2)
    images[0, 0, 0] = torch.tensor([2.0, 0.0])  # target 0: right
    images[1, 0, 0] = torch.tensor([1.0, 1.0])  # target 1: a tie, argmax 0: wrong
    loader = [(images, torch.tensor([0, 1]), torch.tensor([0, 0]), ["a", "b"])]
    model = Fixed().train()
    val = validation_metrics(model, loader, torch.device("cpu"))
    expected_loss = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    assert val["val_images"] == 2 and val["val_error"] == 0.5
    assert val["val_loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert model.training  # restored


def test_resolve_queries_by_index_and_name(tmp_path):
    run = write_synthetic_run(tmp_path / "run")
    ranking = dict(np.load(run / "ranking.npz"))
    assert resolve_queries(ranking, ["2", "q0.png", "images/q1.png"]) == [2, 0, 1]
    with pytest.raises(StrongReIDError, match=r"index is 0\.\.2"):
        resolve_queries(ranking, ["3"])
    with pytest.raises(StrongReIDError, match=r"neither a query index .* \(e\.g\. q0\.png\)"):
        resolve_queries(ranking, ["nothere.jpg"])


def test_visualize_query_cli_draws_the_chosen_rows(tmp_path, capsys):
    run = write_synthetic_run(tmp_path / "run")
    assert cli_main(["visualize", "--results", str(run), "--query", "1", "q2.png", "--topk", "3"]) == 0
    out = run / "viz" / "ranked_query.png"
    assert capsys.readouterr().out.split() == [str(out)]
    assert Image.open(out).size == RankedLayout(rows=2, cols=4).size
    assert cli_main(["visualize", "--results", str(run), "--query", "7"]) == 2
    assert "index is 0..2" in capsys.readouterr().err


# -- end to end: strongreid test on Market with gt_bbox, multi-scale and flip ----------------

OPTS = {"MODEL.DEVICE": "cpu", "MODEL.NAME": "resnet18", "MODEL.PRETRAIN_CHOICE": "none",
        "MODEL.AMP": "off", "MODEL.CHANNELS_LAST": "off", "INPUT.SIZE_TEST": "[32, 16]",
        "DATASETS.NAMES": "market1501", "DATALOADER.NUM_WORKERS": "0", "TEST.IMS_PER_BATCH": "16"}


@pytest.fixture(scope="module")
def market_with_gt_bbox(tmp_path_factory):
    from strongreid.data.synthetic import generate

    root = tmp_path_factory.mktemp("mq")
    generate(str(root / "market1501"), ids=8, cams=3, images_per_id=6, seed=3)
    base = root / "market1501"
    # gt_bbox: every query plus, per query, one gallery image of its identity and camera.
    gt = base / "gt_bbox"
    shutil.copytree(base / "query", gt)
    for path in sorted((base / "bounding_box_test").iterdir()):
        pid, cam = path.name.split("_")[:2]
        if any(q.name.startswith(f"{pid}_{cam}") for q in (base / "query").iterdir()):
            shutil.copy(path, gt / path.name)
    torch.manual_seed(0)
    from strongreid.config import load_config
    from strongreid.config.loader import dump_config
    from strongreid.modeling import build_model

    cfg = load_config(None, [x for kv in OPTS.items() for x in kv])
    model = build_model(cfg, 5)
    ckpt = root / "model.pt"
    torch.save({"model": model.state_dict(), "num_classes": 5, "arch": "resnet18",
                "config": dump_config(cfg)}, ckpt)
    return root, ckpt


def _test(root: Path, ckpt: Path, out: Path, **extra: str) -> dict:
    opts = {**OPTS, "DATASETS.ROOT_DIR": str(root), "TEST.WEIGHT": str(ckpt), "OUTPUT_DIR": str(out),
            **extra}
    assert cli_main(["test", *[x for kv in opts.items() for x in kv]]) == 0
    return json.loads((out / "results.json").read_text())


def test_strongreid_test_multi_query_equals_the_hand_pipeline(market_with_gt_bbox, tmp_path):
    from strongreid import FeatureExtractor
    from strongreid.config import load_config
    from strongreid.data.datasets import build_dataset
    from strongreid.evaluation import evaluate_from_config

    root, ckpt = market_with_gt_bbox
    res = _test(root, ckpt, tmp_path / "mq", **{"TEST.MULTI_QUERY": "True"})
    assert res["multi_query"] is True
    ds = build_dataset("market1501", root)
    assert len(ds.multi_query) > len(ds.query)
    cfg = load_config(None, [x for kv in {**OPTS, "TEST.FEAT_NORM": "no"}.items() for x in kv])
    fx = FeatureExtractor(cfg, ckpt, device="cpu")

    def feats(records):
        return fx([r.path for r in records])

    def ids(records):
        return np.array([r.pid for r in records]), np.array([r.camid for r in records])

    q_ids, g_ids, mq_ids = ids(ds.query), ids(ds.gallery), ids(ds.multi_query)
    q, _ = multi_query_features(feats(ds.query), *q_ids, feats(ds.multi_query), *mq_ids)
    cfg_eval = load_config(None, [x for kv in OPTS.items() for x in kv])
    expected = evaluate_from_config(cfg_eval, q, feats(ds.gallery), q_ids[0], g_ids[0], q_ids[1], g_ids[1])
    assert res["mAP"] == pytest.approx(expected["plain"].mAP, abs=1e-6)
    single = _test(root, ckpt, tmp_path / "sq")
    assert single["multi_query"] is False and single["mAP"] != pytest.approx(res["mAP"], abs=1e-9)


def test_multi_query_without_images_is_one_error(market_with_gt_bbox, tmp_path, capsys):
    root, ckpt = market_with_gt_bbox
    bare = tmp_path / "bare"
    shutil.copytree(root / "market1501", bare / "market1501", ignore=shutil.ignore_patterns("gt_bbox"))
    opts = {**OPTS, "DATASETS.ROOT_DIR": str(bare), "TEST.WEIGHT": str(ckpt),
            "OUTPUT_DIR": str(tmp_path / "o"), "TEST.MULTI_QUERY": "True"}
    assert cli_main(["test", *[x for kv in opts.items() for x in kv]]) == 2
    assert "gt_bbox" in capsys.readouterr().err


def test_multi_scale_and_flip_reach_extract_and_test(market_with_gt_bbox, tmp_path):
    from strongreid import FeatureExtractor
    from strongreid.config import load_config

    root, ckpt = market_with_gt_bbox
    extra = {"TEST.MULTI_SCALE": "[1.0,1.1]", "TEST.FLIP_AUG": "True"}
    images = root / "market1501" / "query"
    out = tmp_path / "f.npz"
    opts = {**OPTS, "TEST.WEIGHT": str(ckpt), **extra}
    assert cli_main(["extract", "--images", str(images), "--out", str(out),
                     *[x for kv in opts.items() for x in kv]]) == 0
    saved = np.load(out)["feats"]
    cfg = load_config(None, [x for kv in opts.items() for x in kv])
    fx = FeatureExtractor(cfg, ckpt, device="cpu")
    assert fx.scales == (1.0, 1.1) and fx.flip
    batch = fx.preprocess(sorted(str(p) for p in images.iterdir()))
    with torch.no_grad():
        by_hand = nn.functional.normalize(tta_forward(fx.model, batch, True, (1.0, 1.1)), dim=1)
    np.testing.assert_allclose(saved, by_hand.numpy(), rtol=1e-5, atol=1e-6)
    plain = FeatureExtractor(load_config(None, [x for kv in {**OPTS}.items() for x in kv]), ckpt, device="cpu")
    assert not np.allclose(plain(batch).numpy(), saved, atol=1e-4)
    res = _test(root, ckpt, tmp_path / "ms", **extra)
    assert res["multi_scale"] == [1.0, 1.1] and res["flip"] is True


def test_training_logs_validation_loss_and_error(tiny_synthetic_root, tmp_path):
    from _train_utils import tiny_train_opts

    from strongreid.viz.curves import epoch_summary, read_metrics

    out = tmp_path / "run"
    opts = tiny_train_opts(tiny_synthetic_root, out, **{"DATASETS.VALIDATION": "first",
                                                        "SOLVER.MAX_EPOCHS": 1})
    assert cli_main(["train", *opts]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    val = [r for r in rows if r["type"] == "val"]
    # One held-out image per training identity (the synthetic set trains on 12 of its 24).
    assert len(val) == 1 and val[0]["epoch"] == 1 and val[0]["val_images"] == 12
    assert math.isfinite(val[0]["val_loss"]) and 0.0 <= val[0]["val_error"] <= 1.0
    series = epoch_summary(rows)
    assert series["val_acc"] == {1: 1.0 - val[0]["val_error"]}
    assert cli_main(["visualize", "--results", str(out)]) == 0
    assert (out / "viz" / "training.png").is_file()
