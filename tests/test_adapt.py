"""Learning without identities (strongreid.adapt): the recipe's config, its hook, its loader,
a whole run through the CLI, its resume, and that no identity label reaches the weights."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_utils import tiny_train_opts
from torch.utils.data import DataLoader

from strongreid.adapt import AdaptTrainer, PseudoIdentityLoader, PseudoLabelHook, tracklet_groups
from strongreid.adapt.hooks import camera_centred, memory_term, tracklet_means
from strongreid.cli import main
from strongreid.config import load_config
from strongreid.data.datasets import ImageRecord
from strongreid.data.samplers import RandomIdentitySampler
from strongreid.engine.inference import extract_split
from strongreid.errors import ConfigError, StrongReIDError
from strongreid.losses.cluster_memory import ClusterMemory
from strongreid.modeling.checkpoint import read_checkpoint

# The tiny set has 8 images per identity: the neighbourhoods and the DBSCAN density are scaled
# down with it (the defaults, k1 30 and min_samples 4, are for Market's ~17 per identity).
ADAPT_OPTS = {
    "ADAPT.ENABLED": "True",
    "ADAPT.K1": "6",
    "ADAPT.K2": "2",
    "ADAPT.EPS": "0.6",
    "ADAPT.MIN_SAMPLES": "2",
    "ADAPT.ITERS": "3",
    "MODEL.METRIC_LOSS_TYPE": "cluster_memory",
    "MODEL.IF_WITH_CENTER": "no",
    "MODEL.IF_LABELSMOOTH": "off",
    "DATALOADER.SAMPLER": "triplet",
    "MODEL.METRIC_FEAT": "after",
    "TEST.NECK_FEAT": "after",
    "SOLVER.OPTIMIZER_NAME": "Adam",
    "SOLVER.BASE_LR": "0.00035",
}


def adapt_opts(root: Path, out: Path, **overrides) -> list[str]:
    return tiny_train_opts(root, out, **{**ADAPT_OPTS, **overrides})


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ({"MODEL.METRIC_LOSS_TYPE": "triplet"}, "must name 'cluster_memory'"),
    ({"DATALOADER.SAMPLER": "softmax_triplet"}, "must be 'triplet'"),
    ({"TEST.NECK_FEAT": "before"}, "set TEST.NECK_FEAT 'after' too"),
    ({"DATASETS.VALIDATION": "first"}, "DATASETS.VALIDATION 'off'"),
    ({"ADAPT.EPS": "0.0"}, "ADAPT.EPS = 0.0 must be > 0"),
    ({"ADAPT.K1": "4", "ADAPT.K2": "6"}, "ADAPT.K2 = 6 must not exceed ADAPT.K1 = 4"),
    ({"ADAPT.MIN_SAMPLES": "0"}, "ADAPT.MIN_SAMPLES = 0 must be at least 1"),
    ({"ADAPT.ITERS": "0"}, "ADAPT.ITERS = 0 must be at least 1"),
    ({"ADAPT.TEMP": "0.0"}, "ADAPT.TEMP = 0.0 must be > 0"),
    ({"ADAPT.MOMENTUM": "1.0"}, r"ADAPT.MOMENTUM = 1.0 must be in \[0, 1\)"),
    ({"ADAPT.TRACKLETS": "'positive'"}, "ADAPT.TRACKLETS = 'positive' is not allowed"),
    ({"ADAPT.CAMERA_CENTER": "maybe"}, "ADAPT.CAMERA_CENTER = 'maybe' .*expected true or false"),
])
def test_config_errors_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, adapt_opts(tmp_path, tmp_path / "out", **override))


def test_cluster_memory_needs_adaptation(tmp_path):
    with pytest.raises(ConfigError, match="'cluster_memory' trains against pseudo-identities: set ADAPT.ENABLED"):
        load_config(None, adapt_opts(tmp_path, tmp_path / "out", **{"ADAPT.ENABLED": "False"}))


def test_the_recipes_configs_validate():
    for name in ("adapt_night.yml", "unsupervised_night.yml"):
        cfg = load_config(str(Path(__file__).parent.parent / "configs" / name), [])
        assert cfg.ADAPT.ENABLED and cfg.MODEL.METRIC_LOSS_TYPE == "cluster_memory"
        assert cfg.SOLVER.EVAL_PERIOD == cfg.SOLVER.MAX_EPOCHS  # best.pt is never picked on the test set


# -- the memory as a loss term ----------------------------------------------------------------
def test_memory_term_starts_empty_and_takes_centroids(tmp_path):
    cfg = load_config(None, adapt_opts(tmp_path, tmp_path / "out", **{"ADAPT.TEMP": "0.1"}))
    mem = ClusterMemory.from_config(cfg)
    assert mem.temp == 0.1 and mem.momentum == 0.2 and mem.features.shape == (0, 0)
    with pytest.raises(StrongReIDError, match="the cluster memory is empty"):
        mem(torch.ones(2, 3), torch.zeros(2, dtype=torch.long))
    feats = torch.tensor([[3.0, 4.0], [6.0, 8.0], [0.0, 1.0], [1.0, 0.0]])
    mem.reset(ClusterMemory.centroids(feats, torch.tensor([0, 0, 1, -1])))
    # cluster 0: both rows normalise to (.6, .8); cluster 1: (0, 1); the outlier is ignored
    assert torch.allclose(mem.features, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert "cluster_memory" not in "".join(mem.state_dict())  # rebuilt, never checkpointed


# -- the loader --------------------------------------------------------------------------------------
def test_pseudo_identity_loader_gives_iters_batches_and_redraws_each_pass():
    records = [ImageRecord(f"img{i}", i // 4, 0) for i in range(16)]  # 4 clusters x 4 images
    sampler = RandomIdentitySampler(records, batch_size=8, num_instances=4, seed=3)
    inner = DataLoader(list(range(16)), batch_size=8, sampler=sampler)
    loader = PseudoIdentityLoader(iters=5)
    with pytest.raises(StrongReIDError, match="no pseudo-identities yet"):
        next(iter(loader))
    loader.reset(inner, records, epoch=2)
    batches = [b.tolist() for b in loader]
    assert len(loader) == 5 and len(batches) == 5
    for batch in batches:  # whole clusters of K = 4
        clusters = [records[i].pid for i in batch]
        assert sorted(clusters.count(c) for c in set(clusters)) == [4, 4]
    # One pass is 2 batches; the passes are the sampler's epochs 20000, 20001, 20002.
    passes = [sum(batches[i : i + 2], []) for i in (0, 2)]
    assert passes[0] != passes[1] and sorted(passes[0]) == list(range(16))
    assert sampler.epoch == 20002


def test_tracklet_means_are_one_point_per_tracklet():
    feats = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [6.0, 8.0]])
    means, inverse = tracklet_means(feats, np.array([7, 2, 2, 7]))
    assert inverse.tolist() == [1, 0, 0, 1]
    # tracklet 2: (1, 0) + (0, 2) -> (1, 2) / sqrt(5); tracklet 7: (9, 12) -> (.6, .8)
    assert torch.allclose(means, torch.tensor([[5**-0.5, 2 * 5**-0.5], [0.6, 0.8]]))


def test_camera_centred_features_lose_each_cameras_mean():
    feats = torch.tensor([[1.0, 1.0], [1.0, 3.0], [5.0, 0.0], [3.0, 0.0], [2.0, 2.0]])
    out = camera_centred(feats, np.array([0, 0, 1, 1, 2]))
    # camera 0's mean (1, 2): (0, -1), (0, 1); camera 1's (4, 0): (1, 0), (-1, 0); camera 2's one
    # row is its own mean: (0, 0), which normalises to (0, 0).
    assert torch.allclose(out, torch.tensor([[0.0, -1.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(feats[0], torch.tensor([1.0, 1.0]))  # the input is left as it was


def test_camera_centring_groups_people_a_camera_look_had_split(tiny_synthetic_root, tmp_path):
    # Two people in two cameras, each camera adding its own large offset: raw features never
    # join a person's two cameras, camera-centred ones group by person.
    gen = torch.Generator().manual_seed(0)
    person = torch.nn.functional.normalize(torch.randn(2, 16, generator=gen), dim=1)
    camera = 3 * torch.nn.functional.normalize(torch.randn(2, 16, generator=gen), dim=1)
    feats, cams, who = [], [], []
    for p in range(2):
        for c in range(2):
            for _ in range(6):
                feats.append(person[p] + camera[c] + 0.05 * torch.randn(16, generator=gen))
                cams.append(c)
                who.append(p)
    feats = torch.nn.functional.normalize(torch.stack(feats), dim=1)
    records = [ImageRecord(f"{i}.jpg", -1, c) for i, c in enumerate(cams)]
    labels = {}
    for centre in (False, True):
        cfg = load_config(None, adapt_opts(tiny_synthetic_root, tmp_path / f"c{centre}", **{
            "ADAPT.CAMERA_CENTER": str(centre), "ADAPT.K1": "8", "ADAPT.K2": "2", "ADAPT.MIN_SAMPLES": "3"}))
        hook = PseudoLabelHook(records)
        hook.trainer = type("T", (), {"cfg": cfg})()
        labels[centre] = hook._cluster(feats)
    who, cams = np.array(who), np.array(cams)
    raw = labels[False]
    assert all(len(set(cams[raw == c].tolist())) == 1 for c in set(raw.tolist()) if c >= 0), raw
    centred = labels[True]
    kept = centred >= 0  # DBSCAN may leave a few noisy images out
    assert kept.sum() >= 20 and len(set(centred[kept].tolist())) == 2, centred
    assert all(len(set(centred[kept & (who == p)].tolist())) == 1 for p in (0, 1)), centred


def test_tracklet_groups_are_pid_and_camera_pairs():
    records = [ImageRecord("a", 5, 0), ImageRecord("b", 5, 1), ImageRecord("c", 7, 0), ImageRecord("d", 5, 0)]
    assert tracklet_groups(records).tolist() == [0, 1, 2, 0]


# -- the hook on real data and real clustering ---------------------------------------------------
def test_hook_clusters_fills_the_memory_and_trains_on_clusters_only(tiny_synthetic_root, tmp_path):
    cfg = load_config(None, adapt_opts(tiny_synthetic_root, tmp_path / "run"))
    trainer = AdaptTrainer(cfg)
    assert all(r.pid == -1 for r in trainer.splits.train) and trainer.num_classes == 1
    hook = next(h for h in trainer.hooks if isinstance(h, PseudoLabelHook))
    trainer.epoch = 1
    hook.before_epoch()
    labels = hook.labels
    clusters = int(labels.max()) + 1
    assert clusters >= 4 and (labels >= 0).any()
    # The memory starts from the centroids of the features the hook clustered.
    one_view = load_config(None, adapt_opts(tiny_synthetic_root, tmp_path / "run", **{"TEST.FLIP_AUG": "False"}))
    feats = torch.nn.functional.normalize(extract_split(one_view, trainer.model, trainer.splits.train,
                                                        trainer.device), dim=1)
    expected = torch.nn.functional.normalize(ClusterMemory.centroids(feats, torch.from_numpy(labels)), dim=1)
    assert torch.allclose(memory_term(trainer.loss_fn).features, expected, atol=1e-6)
    # The epoch's batches: ITERS of them, whole pseudo-identities of K, never an outlier, and
    # never a query or gallery image.
    paths = [r.path for r in trainer.splits.train]
    outliers = {paths[i] for i in np.flatnonzero(labels < 0)}
    label_of = {p: int(lab) for p, lab in zip(paths, labels)}
    test_paths = {r.path for r in trainer.splits.query + trainer.splits.gallery}
    seen = 0
    for images, pids, _camids, batch_paths in trainer.loader:
        seen += 1
        assert images.shape[0] == 16 and not (set(batch_paths) & (outliers | test_paths))
        assert [label_of[p] for p in batch_paths] == pids.tolist()
        assert sorted(pids.tolist().count(c) for c in set(pids.tolist())) == [4, 4, 4, 4]
    assert seen == trainer.iters_per_epoch == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{**rows[0], "type": "cluster", "epoch": 1, "clusters": clusters,
                     "outliers": int((labels < 0).sum()), "images": len(labels)}]


def test_too_few_clusters_is_one_clear_message(tiny_synthetic_root, tmp_path):
    # 90 neighbours within eps: no image of the 96 has them, every one is an outlier
    cfg = load_config(None, adapt_opts(tiny_synthetic_root, tmp_path / "run", **{"ADAPT.MIN_SAMPLES": "90"}))
    trainer = AdaptTrainer(cfg)
    with pytest.raises(ConfigError, match=r"found \d pseudo-identities .* raise ADAPT.EPS"):
        trainer.fit()


# -- whole runs: the CLI, resume -----------------------------------------------------------------
def test_adaptation_through_the_cli_then_resume(tiny_synthetic_root, tmp_path):
    source = tmp_path / "source"
    assert main(["train", *tiny_train_opts(tiny_synthetic_root, source, **{"SOLVER.MAX_EPOCHS": 1})]) == 0
    start = {"MODEL.PRETRAIN_CHOICE": "self", "MODEL.PRETRAIN_PATH": source / "last.pt"}
    straight = tmp_path / "straight"
    assert main(["train", *adapt_opts(tiny_synthetic_root, straight, **start)]) == 0
    rows = _metrics(straight)
    assert [(r["type"], r["epoch"]) for r in rows if r["type"] in ("cluster", "train")] == [
        ("cluster", 1), ("train", 1), ("cluster", 2), ("train", 2)]
    train_rows = [r for r in rows if r["type"] == "train"]
    assert all("loss_cluster_memory" in r and np.isfinite(r["loss"]) for r in train_rows)
    results = json.loads((straight / "results.json").read_text())
    assert 0 < results["mAP"] <= 1
    ckpt = read_checkpoint(straight / "last.pt")
    assert ckpt["num_classes"] == 1 and ckpt["epoch"] == 2

    split = tmp_path / "split"
    assert main(["train", *adapt_opts(tiny_synthetic_root, split, **start, **{"SOLVER.MAX_EPOCHS": 1})]) == 0
    assert main(["train", "--resume", *adapt_opts(tiny_synthetic_root, split, **start)]) == 0
    resumed = read_checkpoint(split / "last.pt")["model"]
    for key, value in ckpt["model"].items():
        assert torch.equal(value, resumed[key]), key
    assert [r["epoch"] for r in _metrics(split) if r["type"] == "cluster"] == [1, 2]


# -- leakage: identity labels never reach the weights --------------------------------------------
def _list_dataset(root: Path, out: Path, relabel) -> Path:
    """The tiny set as list files (same paths, same order) with the train pids `relabel`led."""
    from strongreid.data.datasets import build_dataset

    data = build_dataset("synthetic", str(root))
    out.mkdir(parents=True, exist_ok=True)
    train = relabel(list(data.train))
    for name, records in (("train", train), ("query", data.query), ("gallery", data.gallery)):
        (out / f"{name}.txt").write_text("".join(f"{r.path} {r.pid} {r.camid}\n" for r in records))
    return out


def _adapted_weights(root: Path, out: Path, tracklets: str) -> tuple[dict, list[str]]:
    opts = adapt_opts(root, out, **{
        "DATASETS.NAMES": "list", "DATASETS.LIST_TRAIN": "train.txt", "DATASETS.LIST_QUERY": "query.txt",
        "DATASETS.LIST_GALLERY": "gallery.txt", "ADAPT.TRACKLETS": tracklets, "SOLVER.MAX_EPOCHS": 1,
        "ADAPT.ITERS": 2})
    trainer = AdaptTrainer(load_config(None, opts))
    hook = next(h for h in trainer.hooks if isinstance(h, PseudoLabelHook))
    trainer.fit()
    read = [r.path for r in hook.records] + [r.path for r in trainer.loader.records]
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}, read


def _scramble(records: list) -> list:
    rng = random.Random(7)
    pids = sorted({r.pid for r in records})
    new = dict(zip(pids, rng.sample(range(1000, 1000 + 3 * len(pids)), len(pids))))
    return [ImageRecord(r.path, new[r.pid], r.camid) for r in records]


def _scramble_per_camera(records: list) -> list:
    """Tracklets kept, identity across cameras destroyed: each camera renumbers its pids."""
    rng = random.Random(11)
    out = list(records)
    for cam in sorted({r.camid for r in records}):
        pids = sorted({r.pid for r in records if r.camid == cam})
        new = dict(zip(pids, rng.sample(range(5000, 5000 + 4 * len(pids)), len(pids))))
        out = [ImageRecord(r.path, new[r.pid], r.camid) if r.camid == cam else r for r in out]
    return out


def test_identity_labels_never_reach_the_weights(tiny_synthetic_root, tmp_path):
    true_root = _list_dataset(tiny_synthetic_root, tmp_path / "true", lambda rs: rs)
    scrambled_root = _list_dataset(tiny_synthetic_root, tmp_path / "scrambled", _scramble)
    per_camera_root = _list_dataset(tiny_synthetic_root, tmp_path / "per_camera", _scramble_per_camera)
    query_gallery = {line.split()[0] for name in ("query", "gallery")
                     for line in (true_root / f"{name}.txt").read_text().splitlines()}

    off, read = _adapted_weights(true_root, tmp_path / "off", "off")
    off_scrambled, _ = _adapted_weights(scrambled_root, tmp_path / "off_s", "off")
    linked, _ = _adapted_weights(true_root, tmp_path / "ml", "must_link")
    linked_per_camera, _ = _adapted_weights(per_camera_root, tmp_path / "ml_c", "must_link")

    assert read and not set(read) & query_gallery
    for key in off:
        assert torch.equal(off[key], off_scrambled[key]), key
        assert torch.equal(linked[key], linked_per_camera[key]), key
    # The comparison can see labels: the tracklets (which read the pids) change the weights.
    assert any(not torch.equal(off[k], linked[k]) for k in off if off[k].is_floating_point())


# -- footage: the real tracker's tracklets train the adaptation ----------------------------------
def test_footage_to_tracklets_to_adaptation_through_the_cli(tiny_synthetic_root, tmp_path):
    pytest.importorskip("boxmot", reason="BoxMOT is not installed: pip install 'strongreid[tracking]'")
    from strongreid.data.synthetic_video import generate_footage

    footage = tmp_path / "footage"
    generate_footage(footage, people=8, cams=3, frames=40, fps=10.0, seed=2, domain="night")
    root = tmp_path / "night"
    root.mkdir()
    (root / "synthetic").symlink_to(tiny_synthetic_root / "synthetic")  # the labelled test split
    assert main(["tracklets", "--footage", str(footage), "--out", str(root / "tracklets"), "--boxes", "det",
                 "--tracker", "bytetrack", "--per-tracklet", "4", "--min-length", "3"]) == 0
    source = tmp_path / "source"
    assert main(["train", *tiny_train_opts(tiny_synthetic_root, source, **{"SOLVER.MAX_EPOCHS": 1})]) == 0
    out = tmp_path / "adapted"
    opts = adapt_opts(root, out, **{
        "DATASETS.NAMES": "tracklets", "DATASETS.TEST_NAME": "synthetic", "ADAPT.TRACKLETS": "must_link",
        "ADAPT.K1": 4, "ADAPT.K2": 2, "ADAPT.EPS": 0.6, "ADAPT.MIN_SAMPLES": 2, "ADAPT.RESET_BN": "True",
        # a few dozen crops of 8 people: batches of P = 2 pseudo-identities x K = 4
        "SOLVER.IMS_PER_BATCH": 8,
        "MODEL.PRETRAIN_CHOICE": "self", "MODEL.PRETRAIN_PATH": source / "last.pt"})
    assert main(["train", *opts]) == 0
    clusters = [r for r in _metrics(out) if r["type"] == "cluster"]
    crops = len(list((root / "tracklets" / "bounding_box_train").iterdir()))
    assert [r["epoch"] for r in clusters] == [1, 2] and all(r["images"] == crops for r in clusters)
    assert all(r["clusters"] >= 2 for r in clusters)
    assert 0 < json.loads((out / "results.json").read_text())["mAP"] <= 1
