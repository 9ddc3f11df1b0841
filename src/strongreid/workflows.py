"""Training as `strongreid train` runs it: the engine's trainer with evaluation on the test split.

The trainer (engine/) cannot evaluate by itself, because evaluation sits above it; this module
joins the two, and the CLI calls it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from yacs.config import CfgNode

from strongreid.adapt import AdaptTrainer
from strongreid.engine import distributed as D
from strongreid.engine.hooks import HookBase
from strongreid.engine.trainer import Trainer
from strongreid.evaluation.hooks import EvalHook
from strongreid.evaluation.runner import format_table


def build_trainer(cfg: CfgNode, resume: bool | str = False, hooks: Iterable[HookBase] = ()) -> Trainer:
    """A Trainer with the default hooks, evaluation (EvalHook) and `hooks`; with ADAPT.ENABLED one
    that learns from pseudo-identities (strongreid.adapt)."""
    trainer = AdaptTrainer if cfg.ADAPT.ENABLED else Trainer
    return trainer(cfg, resume=resume, hooks=[EvalHook(), *hooks])


def train(cfg: CfgNode, resume: bool | str = False, hooks: Iterable[HookBase] = ()) -> dict[str, Any] | None:
    """Train and evaluate; the final results (results.json's content) on rank 0, else None."""
    finished = False
    try:
        results = build_trainer(cfg, resume=resume, hooks=hooks).fit()
        finished = True
        return results
    finally:
        D.cleanup(wait=finished)


def train_command(cfg: CfgNode, resume: bool = False) -> int:
    """`strongreid train`; when torchrun restarts the workers, they resume from last.pt by themselves."""
    if not resume and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        resume = "auto"
    final = train(cfg, resume=resume)
    if final is not None:
        print(format_table("final", final))
    return 0
