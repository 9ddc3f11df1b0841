"""Shared fixtures: a tiny synthetic dataset and a tiny training config, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests share two cores with each other; keep BLAS from oversubscribing when xdist runs them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_synthetic_root(tmp_path_factory) -> Path:
    """DATASETS.ROOT_DIR holding `synthetic/` with a handful of identities."""
    from strongreid.data.synthetic import generate

    root = tmp_path_factory.mktemp("data")
    generate(str(root / "synthetic"), ids=24, cams=3, images_per_id=8, seed=1)
    return root
