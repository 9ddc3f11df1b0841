"""Shared fixtures: a tiny synthetic dataset and a tiny training config, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _threads_per_process() -> str:
    """One thread unless set; under xdist at most this worker's share of the cores.

    `cpujob heavy` exports OMP_NUM_THREADS=2 for the whole of `pytest -n 2`: four compute threads
    then shared two cores, and the torchrun tests' lock-step collectives waited on preempted ranks.
    """
    wanted = int(os.environ.get("OMP_NUM_THREADS") or 1)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers:
        wanted = min(wanted, max(1, len(os.sched_getaffinity(0)) // workers))
    return str(max(1, wanted))


# Set before anything imports torch, so the OpenMP pool and the subprocesses get it too.
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _threads_per_process()
# Tests that import onnxruntime themselves (parity checks) or through BoxMOT queue no usage
# events either (strongreid.deploy.runtimes.load_onnxruntime sets the same for the library).
os.environ.setdefault("ORT_TELEMETRY_DISABLED", "1")


@pytest.fixture(scope="session")
def tiny_synthetic_root(tmp_path_factory) -> Path:
    """DATASETS.ROOT_DIR holding `synthetic/` with a handful of identities."""
    from strongreid.data.synthetic import generate

    root = tmp_path_factory.mktemp("data")
    generate(str(root / "synthetic"), ids=24, cams=3, images_per_id=8, seed=1)
    return root


@pytest.fixture(scope="session")
def few_people(tmp_path_factory) -> Path:
    """A synthetic set small enough for ResNet-50-sized models at 384x128 on one core."""
    from strongreid.data.synthetic import generate

    root = tmp_path_factory.mktemp("few")
    generate(str(root / "synthetic"), ids=4, cams=2, images_per_id=4, seed=2)
    return root
