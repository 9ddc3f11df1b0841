"""Training and evaluation under torchrun, on the CPU with gloo and 2 processes.

Equivalence: 2 ranks x 32 images train exactly like 1 process x 64 images when BatchNorm and the
triplet mining see the global batch (SyncBN, SOLVER.TRIPLET_GATHER). The collectives are checked
against hand-derivable values, the sampler through the real loaders, the sharded evaluation
against a single-process one, and a SIGKILLed worker against an uninterrupted run.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _train_utils import tiny_train_opts
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from strongreid.config import get_cfg_defaults, load_config
from strongreid.data import build_train_loader
from strongreid.data.splits import load_splits
from strongreid.engine import distributed as D
from strongreid.engine.trainer import Trainer, scale_lr
from strongreid.errors import ConfigError
from strongreid.modeling.checkpoint import read_checkpoint, save_checkpoint
from strongreid.workflows import build_trainer

WORLD = 2
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _equivalence_opts(root: Path, out: Path, pretrained: Path, **overrides) -> list[str]:
    """Global batch 64 = 8 identities x 8 images: the 12 training identities of the tiny set give
    one batch per epoch, so the per-epoch losses are the per-iteration trajectory.

    Random flips, crops and erasing stay on: every image is augmented from its position in the
    single-process epoch, so the ranks see exactly the images one process would. Two choices keep
    the comparison about DDP and not about amplified rounding. Start from briefly trained weights: at random initialisation the features nearly coincide,
    so many anchors' hardest positive or negative is tied to within rounding and a different
    summation order picks another triplet. SGD, not Adam: Adam divides every gradient element by
    its own magnitude, so elements that are sums of cancelling terms (zero up to rounding) move
    by +-lr whatever their rounding; SGD's step stays proportional to the gradient.
    """
    opts = {
        "SOLVER.IMS_PER_BATCH": 64, "DATALOADER.NUM_INSTANCE": 8, "SOLVER.MAX_EPOCHS": 3,
        "SOLVER.OPTIMIZER_NAME": "SGD", "SOLVER.BASE_LR": 0.003,
        "MODEL.PRETRAIN_CHOICE": "self", "MODEL.PRETRAIN_PATH": pretrained,
        "SOLVER.EVAL_PERIOD": 100, "SOLVER.CHECKPOINT_PERIOD": 100,
    }
    opts.update(overrides)
    return tiny_train_opts(root, out, **opts)


def _run_epochs(cfg) -> dict:
    """Trainer.fit without the evaluation: the loss of every epoch and the final state."""
    trainer = Trainer(cfg)
    rows = []
    for epoch in range(1, cfg.SOLVER.MAX_EPOCHS + 1):
        rows.append(trainer.train_one_epoch(epoch))
        trainer.scheduler.step()
    return {
        "iterations": len(trainer.loader),
        "losses": {k: [r[k] for r in rows] for k in ("loss", "loss_id", "loss_triplet", "loss_center")},
        "model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "centers": trainer.loss_fn.center.centers.detach().clone(),
        "bn_type": type(trainer.model.bottleneck).__name__,
    }


# -- what each spawned rank runs ----------------------------------------------------------------

def _bn_inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g) * 3 + 1
    coeff = torch.randn(shape, generator=g)
    bn = nn.BatchNorm2d(shape[1]) if len(shape) == 4 else nn.BatchNorm1d(shape[1])
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, shape[1]))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, shape[1]))
    return x, coeff, bn


def _check_batchnorm(rank: int, world: int) -> dict:
    out = {}
    for shape in ((8, 3, 4, 2), (6, 5)):
        x, coeff, bn = _bn_inputs(shape)
        sync = D.convert_sync_batchnorm(bn, torch.device("cpu"))
        lo, hi = D.shard_range(shape[0], rank, world)
        xl = x[lo:hi].clone().requires_grad_()
        y = sync(xl)
        (y * coeff[lo:hi]).sum().backward()
        out[shape] = {
            "type": type(sync).__name__, "y": y.detach(), "x_grad": xl.grad,
            "w_grad": sync.weight.grad.clone(), "b_grad": sync.bias.grad.clone(),
            "running_mean": sync.running_mean.clone(), "running_var": sync.running_var.clone(),
        }
    return out


def _check_collectives(rank: int) -> dict:
    t = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = D.all_gather_with_grad(t)
    (gathered * torch.arange(12.0).view(4, 3)).sum().backward()
    bn = nn.BatchNorm1d(2)
    bn.running_mean.fill_(2.0 * rank)
    bn.num_batches_tracked.fill_(rank)
    D.average_buffers_(bn)
    labels = D.all_gather_with_grad(torch.tensor([rank, 10 + rank]))
    return {
        "gathered": gathered.detach(), "grad": t.grad, "labels": labels,
        "count": (D.count_true(rank == 0), D.count_true(True), D.count_true(False)),
        "running_mean": bn.running_mean.clone(), "num_batches_tracked": int(bn.num_batches_tracked),
    }


def _worker(rank: int, world: int, port: int, root: str, workdir: str, pretrained: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    work = Path(workdir)
    result: dict = {"bn": _check_batchnorm(rank, world), "collectives": _check_collectives(rank)}
    # A global batch of 24 = 3 identities of 8 cannot split over 2 ranks; the error must come
    # before the (missing) dataset is read.
    bad = load_config(None, _equivalence_opts(work / "nowhere", work / "bad", Path(pretrained),
                                              **{"SOLVER.IMS_PER_BATCH": 24}))
    try:
        Trainer(bad)
        result["batch_rule"] = None
    except ConfigError as exc:
        result["batch_rule"] = str(exc)
    for name, sync_bn, gather, epochs in (("syncbn", True, True, 3), ("plainbn", False, True, 3),
                                          ("nogather", True, False, 1)):
        cfg = load_config(None, _equivalence_opts(Path(root), work / name, Path(pretrained), **{
            "MODEL.SYNC_BN": sync_bn, "SOLVER.TRIPLET_GATHER": gather, "SOLVER.MAX_EPOCHS": epochs}))
        result[name] = _run_epochs(cfg)
    # A triplet-only loss never uses the classifier: DDP must be told, or it waits for its
    # gradient forever.
    cfg = load_config(None, _equivalence_opts(Path(root), work / "triplet_only", Path(pretrained), **{
        "DATALOADER.SAMPLER": "triplet", "MODEL.IF_WITH_CENTER": "no", "MODEL.METRIC_LOSS_TYPE": "triplet",
        "SOLVER.IMS_PER_BATCH": 32, "SOLVER.MAX_EPOCHS": 1}))  # 3 steps: DDP complains at the 2nd
    trainer = Trainer(cfg)
    stats = trainer.train_one_epoch(1)
    classifier = trainer.model.classifier.weight
    result["triplet_only"] = {"loss": stats["loss"], "iterations": len(trainer.loader),
                              "classifier": classifier.detach().clone(), "classifier_grad": classifier.grad}
    # The defaults ('auto' SyncBN and triplet gather): a whole fit with its sharded evaluation.
    result["defaults"] = build_trainer(load_config(None, _defaults_opts(Path(root), work / "defaults2", Path(pretrained)))).fit()
    torch.save(result, work / f"rank{rank}.pt")
    dist.destroy_process_group()


def _defaults_opts(root: Path, out: Path, pretrained: Path) -> list[str]:
    """Default MODEL.SYNC_BN / SOLVER.TRIPLET_GATHER, fp32, Adam: 3 iterations of 4 x 8 images."""
    return tiny_train_opts(root, out, **{
        "SOLVER.IMS_PER_BATCH": 32, "DATALOADER.NUM_INSTANCE": 8, "SOLVER.MAX_EPOCHS": 1,
        "SOLVER.LOG_PERIOD": 1, "MODEL.PRETRAIN_CHOICE": "self", "MODEL.PRETRAIN_PATH": pretrained})


def _logged_iterations(log: Path) -> list[dict[str, float]]:
    """The running loss means the trainer logs at every iteration (LOG_PERIOD 1)."""
    rows = []
    for line in log.read_text().splitlines():
        m = re.search(r"epoch \d+ iter \d+/\d+: (.*?), lr ", line)
        if m:
            rows.append({k: float(v) for k, v in (item.split(" ") for item in m.group(1).split(", "))})
    return rows


@pytest.fixture(scope="module")
def spawned(tiny_synthetic_root, tmp_path_factory) -> dict:
    """One 2-rank gloo session runs every in-process check; then the 1-process reference."""
    work = tmp_path_factory.mktemp("spawned")
    trained = _run_epochs(load_config(None, tiny_train_opts(tiny_synthetic_root, work / "pretrain")))
    pretrained = save_checkpoint({"model": trained["model"], "num_classes": 12, "arch": "resnet18"},
                                 work / "pretrained.pt")
    ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), str(tiny_synthetic_root), str(work),
                                            str(pretrained)),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-rank session did not finish in 240 s")
    ranks = [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    single = _run_epochs(load_config(None, _equivalence_opts(tiny_synthetic_root, work / "single", pretrained)))
    defaults = build_trainer(load_config(None, _defaults_opts(tiny_synthetic_root, work / "defaults1", pretrained))).fit()
    return {"ranks": ranks, "single": single, "pretrained": trained["model"], "work": work,
            "defaults": defaults}


# -- collectives ----------------------------------------------------------------------------------

def test_all_reduce_batchnorm_equals_batchnorm_on_the_concatenated_batch(spawned):
    for shape in ((8, 3, 4, 2), (6, 5)):
        x, coeff, ref = _bn_inputs(shape)
        x = x.clone().requires_grad_()
        y = ref(x)
        (y * coeff).sum().backward()
        parts = [r["bn"][shape] for r in spawned["ranks"]]
        assert {p["type"] for p in parts} == {"AllReduceBatchNorm"}
        torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat([p["x_grad"] for p in parts]), x.grad, atol=1e-5, rtol=1e-5)
        # Each rank holds its share of the parameter gradient; DDP sums (averages) them.
        torch.testing.assert_close(sum(p["w_grad"] for p in parts), ref.weight.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sum(p["b_grad"] for p in parts), ref.bias.grad, atol=1e-5, rtol=1e-5)
        for p in parts:  # the running variance uses the unbiased global variance
            torch.testing.assert_close(p["running_mean"], ref.running_mean, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(p["running_var"], ref.running_var, atol=1e-6, rtol=1e-6)


def test_gather_keeps_only_the_local_gradient_and_buffers_average(spawned):
    weights = torch.arange(12.0).view(4, 3)
    expected = torch.tensor([[1.0] * 3] * 2 + [[2.0] * 3] * 2)
    for rank, r in enumerate(spawned["ranks"]):
        c = r["collectives"]
        assert torch.equal(c["gathered"], expected)
        assert torch.equal(c["grad"], weights[2 * rank: 2 * rank + 2])
        assert c["labels"].tolist() == [0, 10, 1, 11]
        assert c["count"] == (1, 2, 0)
        assert c["running_mean"].tolist() == [1.0, 1.0]  # (0 + 2) / 2
        assert c["num_batches_tracked"] == rank  # integer buffers are left alone


def test_global_batch_not_splitting_into_identities_is_rejected_up_front(spawned):
    for r in spawned["ranks"]:
        msg = r["batch_rule"]
        assert msg is not None, "Trainer accepted IMS_PER_BATCH 24 with K 8 on 2 ranks"
        assert "IMS_PER_BATCH=24" in msg and "NUM_INSTANCE=8" in msg and "16" in msg


# -- equivalence ----------------------------------------------------------------------------------

def _max_diff(a: dict, b: dict, buffers: bool) -> float:
    return max(float((a[k].double() - v.double()).abs().max()) for k, v in b.items()
               if v.is_floating_point() and ("running" in k) == buffers)


def test_two_ranks_with_syncbn_and_gather_equal_one_process(spawned):
    single = spawned["single"]
    assert single["iterations"] == 1 and single["bn_type"] == "BatchNorm1d"
    for rank, r in enumerate(spawned["ranks"]):
        run = r["syncbn"]
        assert run["iterations"] == 1 and run["bn_type"] == "AllReduceBatchNorm"
        for term, values in single["losses"].items():
            np.testing.assert_allclose(run["losses"][term], values, atol=1e-5, rtol=0, err_msg=f"rank {rank} {term}")
        for key, value in single["model"].items():
            # Running variances reach the hundreds: compare them relatively.
            rtol = 1e-5 if "running" in key else 0
            torch.testing.assert_close(run["model"][key], value, atol=1e-5, rtol=rtol, msg=f"rank {rank} {key}")
        torch.testing.assert_close(run["centers"], single["centers"], atol=1e-5, rtol=0)
    # The comparison is between moving models: 3 steps changed the weights far beyond 1e-5.
    assert single["losses"]["loss"][-1] < single["losses"]["loss"][0]
    assert _max_diff(single["model"], spawned["pretrained"], buffers=False) > 1e-3


def test_without_the_gather_each_rank_mines_its_own_half(spawned):
    # Same run with the triplet mined within each rank's 4 identities: the first step's triplet
    # term already differs from the global one (which the gather test above matches to 1e-5).
    single = spawned["single"]["losses"]["loss_triplet"][0]
    for r in spawned["ranks"]:
        assert abs(r["nogather"]["losses"]["loss_triplet"][0] - single) > 1e-3


def test_triplet_only_loss_trains_under_ddp(spawned):
    for r in spawned["ranks"]:
        run = r["triplet_only"]
        assert run["iterations"] == 3 and np.isfinite(run["loss"]) and run["loss"] > 0
        assert run["classifier_grad"] is None  # unused, left alone by DDP and the optimizer
        torch.testing.assert_close(run["classifier"], spawned["pretrained"]["classifier.weight"], atol=0, rtol=0)


def test_default_settings_train_the_single_process_recipe_under_torchrun(spawned):
    # 'auto' turns SyncBN and the triplet gather on in a world of 2 (and says so in the log).
    work = spawned["work"]
    log2 = (work / "defaults2" / "log.txt").read_text()
    assert "SyncBN on (MODEL.SYNC_BN auto)" in log2 and "triplet over all ranks (SOLVER.TRIPLET_GATHER auto)" in log2
    one, two = _logged_iterations(work / "defaults1" / "log.txt"), _logged_iterations(work / "defaults2" / "log.txt")
    assert len(one) == len(two) == 3
    for it, (a, b) in enumerate(zip(one, two), start=1):
        assert a.keys() == b.keys() and {"id", "triplet", "center", "total"} <= a.keys()
        for term in a:
            assert abs(a[term] - b[term]) <= 2e-3, f"iteration {it} {term}: {a[term]} vs {b[term]}"
    m1 = spawned["defaults"]["mAP"]
    m2 = spawned["ranks"][0]["defaults"]["mAP"]
    assert 0 < m1 <= 1 and abs(m1 - m2) <= 0.02, (m1, m2)


def test_world_switch_resolves_auto_by_world_size():
    assert [D.world_switch("auto", w) for w in (1, 2, 8)] == [False, True, True]
    assert [D.world_switch("on", w) for w in (1, 2)] == [False, True]
    assert [D.world_switch("off", w) for w in (1, 2)] == [False, False]
    cfg = load_config(None, ["MODEL.SYNC_BN", "True", "SOLVER.TRIPLET_GATHER", "no"])
    assert (cfg.MODEL.SYNC_BN, cfg.SOLVER.TRIPLET_GATHER) == ("on", "off")
    assert get_cfg_defaults().MODEL.SYNC_BN == "auto" == get_cfg_defaults().SOLVER.TRIPLET_GATHER
    with pytest.raises(ConfigError, match="'auto', 'on', 'off'"):
        load_config(None, ["MODEL.SYNC_BN", "sometimes"])


# Without SyncBN each rank normalises with the statistics of its own 32 images (4 identities).
# Measured on this setup: the losses are 1.6%, 5.7% and 2.3% away from the 1-process run's and
# the parameters drift by up to 2e-3 after 3 steps. The stated tolerance is about twice that; the
# lower bounds show it is another computation, not a rounding difference.
PLAIN_BN_LOSS_RTOL = 0.12
PLAIN_BN_WEIGHT_ATOL = 0.005


def test_two_ranks_without_syncbn_differ_within_the_stated_tolerance(spawned):
    single = spawned["single"]
    run = spawned["ranks"][0]["plainbn"]
    assert run["bn_type"] == "BatchNorm1d"
    np.testing.assert_allclose(run["losses"]["loss"], single["losses"]["loss"], rtol=PLAIN_BN_LOSS_RTOL, atol=0)
    # The first step is the same forward pass up to BatchNorm: its loss must already differ.
    assert abs(run["losses"]["loss"][0] - single["losses"]["loss"][0]) > 1e-2
    drift = _max_diff(run["model"], single["model"], buffers=False)
    assert 1e-4 < drift < PLAIN_BN_WEIGHT_ATOL
    # The parameters stay in step across the ranks (DDP) whatever BatchNorm does; the running
    # statistics are each rank's own until the end-of-epoch average.
    other = spawned["ranks"][1]["plainbn"]
    for key, value in run["model"].items():
        if "running" not in key:
            torch.testing.assert_close(other["model"][key], value, atol=0, rtol=0, msg=key)


# -- sampler through the real loaders ------------------------------------------------------------

@pytest.mark.parametrize("world,k,batch", [(2, 4, 16), (3, 2, 12), (2, 8, 32)])
def test_rank_loaders_split_the_single_process_epoch(tiny_synthetic_root, tmp_path, world, k, batch):
    cfg = load_config(None, tiny_train_opts(tiny_synthetic_root, tmp_path, **{
        "DATALOADER.NUM_INSTANCE": k, "SOLVER.IMS_PER_BATCH": batch, "INPUT.SIZE_TRAIN": "[16, 8]"}))
    records = load_splits(cfg).train
    index_of = {r.path: i for i, r in enumerate(records)}
    single = build_train_loader(cfg, records)
    ranks = [build_train_loader(cfg, records, rank=r, world_size=world) for r in range(world)]
    orders = []
    for epoch in (1, 2):
        for loader in (single, *ranks):
            loader.sampler.set_epoch(epoch)
        global_batches = [[index_of[p] for p in paths] for _, _, _, paths in single]
        rank_batches = [[[index_of[p] for p in paths] for _, _, _, paths in loader] for loader in ranks]
        assert all(len(b) == len(global_batches) for b in rank_batches)
        for i, whole in enumerate(global_batches):
            # Rank r holds the r-th contiguous share of global batch i, so their union (in rank
            # order, even) is the single-process batch.
            assert sum((b[i] for b in rank_batches), []) == whole
            for b in rank_batches:
                counts = Counter(records[j].pid for j in b[i])
                assert len(b[i]) == batch // world
                assert set(counts.values()) == {k} and len(counts) == batch // world // k
        orders.append([j for b in global_batches for j in b])
    assert orders[0] != orders[1]  # the epoch changes the order


# -- the global batch rule and LR scaling ----------------------------------------------------------

def _batch_cfg(batch: int, k: int, sampler: str = "softmax_triplet", gather: bool = False):
    cfg = get_cfg_defaults()
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.DATALOADER.NUM_INSTANCE = k
    cfg.DATALOADER.SAMPLER = sampler
    cfg.SOLVER.TRIPLET_GATHER = gather
    return cfg


def test_local_batch_size_worked_examples():
    assert D.local_batch_size(_batch_cfg(64, 4), 1) == 64
    assert D.local_batch_size(_batch_cfg(64, 4), 4) == 16  # 4 identities x 4 images per rank
    assert D.local_batch_size(_batch_cfg(30, 4, "softmax"), 3) == 10
    with pytest.raises(ConfigError, match=r"IMS_PER_BATCH=64 .* 8 processes .* 8 images.* = 128, e.g. SOLVER.IMS_PER_BATCH 128\."):
        D.local_batch_size(_batch_cfg(64, 16), 8)  # 8 images per rank: half an identity
    with pytest.raises(ConfigError, match="multiple of 4"):
        D.local_batch_size(_batch_cfg(30, 4, "softmax"), 4)
    # One identity per rank finds no negative unless the triplet mines over all ranks.
    with pytest.raises(ConfigError, match="TRIPLET_GATHER"):
        D.local_batch_size(_batch_cfg(64, 16), 4)
    assert D.local_batch_size(_batch_cfg(64, 16, gather=True), 4) == 16


@settings(max_examples=200, deadline=None)
@given(p=st.integers(1, 64), k=st.integers(1, 16), world=st.integers(1, 16), gather=st.booleans())
def test_local_batch_size_accepts_exactly_whole_identities_per_rank(p, k, world, gather):
    batch = p * k
    cfg = _batch_cfg(batch, k, gather=gather)
    whole = batch % (k * world) == 0
    enough = world == 1 or gather or batch // (k * world) >= 2
    if whole and enough:
        local = D.local_batch_size(cfg, world)
        assert local * world == batch and local % k == 0
    else:
        with pytest.raises(ConfigError, match="IMS_PER_BATCH"):
            D.local_batch_size(cfg, world)


def test_scale_lr_multiplies_base_and_center_lr():
    cfg = get_cfg_defaults()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.CENTER_LR, cfg.SOLVER.IMS_PER_BATCH = 3.5e-4, 0.5, 256
    cfg.freeze()
    assert scale_lr(cfg) is cfg  # off by default: a single-GPU config keeps its meaning
    on = cfg.clone()
    on.defrost()
    on.SOLVER.SCALE_LR, on.SOLVER.LR_REFERENCE_BATCH = True, 64
    scaled = scale_lr(on)
    assert scaled.SOLVER.BASE_LR == pytest.approx(3.5e-4 * 4) and scaled.SOLVER.CENTER_LR == pytest.approx(2.0)
    assert on.SOLVER.BASE_LR == 3.5e-4  # the user's config (saved with the run) is untouched


def test_trainer_builds_its_optimisers_with_the_scaled_lr(tiny_synthetic_root, tmp_path):
    out = tmp_path / "scaled"
    cfg = load_config(None, tiny_train_opts(tiny_synthetic_root, out, **{
        "SOLVER.SCALE_LR": True, "SOLVER.LR_REFERENCE_BATCH": 8, "SOLVER.BIAS_LR_FACTOR": 2}))
    base, center = cfg.SOLVER.BASE_LR, cfg.SOLVER.CENTER_LR
    trainer = Trainer(cfg)  # IMS_PER_BATCH 16 / 8: x2
    lrs = sorted(g["lr"] for g in trainer.optimizer.param_groups)
    assert lrs == pytest.approx([2 * base, 2 * base * 2])  # weights, biases (BIAS_LR_FACTOR 2)
    assert trainer.center_optimizer.param_groups[0]["lr"] == pytest.approx(2 * center)
    assert load_config(str(out / "config.yaml"), []).SOLVER.BASE_LR == pytest.approx(base)


# -- torchrun: sharded evaluation and fault tolerance ------------------------------------------

def _torchrun(args: list[str], log: Path, max_restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.1", "-m", "strongreid", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait(proc: subprocess.Popen, log: Path, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]


def _workers(agent_pid: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of the agent's live worker processes (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, IndexError, ValueError):
            continue
        if "LOCAL_RANK" in env:
            found[int(env["LOCAL_RANK"])] = int(entry.name)
    return found


def test_sharded_evaluation_equals_single_process(tiny_synthetic_root, tmp_path):
    from strongreid.cli import main
    from strongreid.modeling import build_model

    # A checkpoint with non-trivial BatchNorm statistics, so the features depend on them.
    cfg = load_config(None, tiny_train_opts(tiny_synthetic_root, tmp_path / "unused"))
    torch.manual_seed(5)
    model = build_model(cfg, 12)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    weights = tmp_path / "model.pt"
    save_checkpoint({"model": model.state_dict(), "num_classes": 12, "arch": "resnet18"}, weights)

    # 24 queries and 75 gallery images: shards of 12 + 12 and 38 + 37, batches of 16.
    over = {"TEST.WEIGHT": weights, "TEST.IMS_PER_BATCH": 16}
    log = tmp_path / "torchrun.log"
    proc = _torchrun(["test", *tiny_train_opts(tiny_synthetic_root, tmp_path / "ddp", **over)], log)
    assert main(["test", *tiny_train_opts(tiny_synthetic_root, tmp_path / "single", **over)]) == 0
    _wait(proc, log, 120)

    single = json.loads((tmp_path / "single" / "results.json").read_text())
    sharded = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert single["num_query"] == 24 and single["num_gallery"] == 75
    for key in ("mAP", "mINP", "cmc", "rank1", "rank5", "rank10", "num_valid"):
        assert sharded[key] == single[key], key
    a = np.load(tmp_path / "single" / "ranking.npz")
    b = np.load(tmp_path / "ddp" / "ranking.npz")
    assert set(a.files) == set(b.files)
    for key in a.files:
        if key == "topk_dist":
            np.testing.assert_allclose(b[key], a[key], atol=1e-6, rtol=0)
        else:
            np.testing.assert_array_equal(b[key], a[key], err_msg=key)


def test_killed_worker_is_restarted_and_the_run_ends_as_an_uninterrupted_one(tiny_synthetic_root, tmp_path):
    # 3 steps of 2 x 16 images at 32x16 an epoch: each step is dozens of lock-step collectives
    # (SyncBN's all-reduces), so while another test competes for the cores the number of steps,
    # not their size, sets the time. Both runs see the same settings; only the kill differs.
    over = {"SOLVER.MAX_EPOCHS": 4, "SOLVER.EVAL_PERIOD": 100, "SOLVER.CHECKPOINT_PERIOD": 100,
            "SOLVER.IMS_PER_BATCH": 32, "INPUT.SIZE_TRAIN": "[32, 16]", "INPUT.SIZE_TEST": "[32, 16]"}
    straight_log, killed_log = tmp_path / "straight.log", tmp_path / "killed.log"
    straight = _torchrun(["train", *tiny_train_opts(tiny_synthetic_root, tmp_path / "straight", **over)],
                         straight_log)
    killed_out = tmp_path / "killed"
    killed = _torchrun(["train", *tiny_train_opts(tiny_synthetic_root, killed_out, **over)], killed_log,
                       max_restarts=1)
    deadline = time.monotonic() + 150
    while not (killed_out / "last.pt").is_file():  # written at the end of epoch 1
        assert killed.poll() is None, killed_log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 150 s"
        time.sleep(0.01)
    victim = _workers(killed.pid).get(1)
    assert victim is not None, "worker 1 not found"
    os.kill(victim, signal.SIGKILL)
    _wait(killed, killed_log, 150)
    _wait(straight, straight_log, 60)

    resumed = [line for line in (killed_out / "log.txt").read_text().splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and "at the end of epoch" in resumed[0], resumed
    assert int(resumed[0].rsplit(" ", 1)[1]) < 4  # it restarted mid-run, not after the end
    a = read_checkpoint(tmp_path / "straight" / "last.pt")
    b = read_checkpoint(killed_out / "last.pt")
    assert a["epoch"] == b["epoch"] == 4
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], atol=1e-6, rtol=0, msg=key)
    torch.testing.assert_close(b["center"]["centers"], a["center"]["centers"], atol=1e-6, rtol=0)
    torch.testing.assert_close(b["optimizer"]["state"][0]["exp_avg"], a["optimizer"]["state"][0]["exp_avg"],
                               atol=1e-6, rtol=0)
    # The epochs redone after the restart are logged once.
    rows = [json.loads(line) for line in (killed_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4]
    assert json.loads((killed_out / "results.json").read_text())["mAP"] == pytest.approx(
        json.loads((tmp_path / "straight" / "results.json").read_text())["mAP"], abs=1e-6)
