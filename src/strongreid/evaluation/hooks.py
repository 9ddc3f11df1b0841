"""Evaluation on the test split during training, as a trainer hook (engine/hooks.py)."""

from __future__ import annotations

import logging
import time
from typing import Any

from torch import nn

from strongreid.engine.hooks import HookBase
from strongreid.engine.trainer import evaluates_after
from strongreid.evaluation.runner import evaluate_model, format_table, write_results

logger = logging.getLogger("strongreid")

# The metrics of an evaluation that checkpoints and metrics.jsonl keep.
KEPT = ("mAP", "mINP", "rank1", "rank5", "rank10")


class EvalHook(HookBase):
    """Evaluates query/gallery after every SOLVER.EVAL_PERIOD epochs and the last one (sharded
    over the ranks), and the averaged weights of SOLVER.WA at the end; writes results.json and
    ranking.npz of the final evaluation. Sets `trainer.eval_result` (what best.pt is chosen by)
    and `trainer.results` (what `fit` returns)."""

    priority = 40

    def __init__(self) -> None:
        self.last_eval: dict[str, Any] | None = None
        self.evaluated: dict[str, Any] | None = None

    def before_train(self) -> None:
        self.started = time.perf_counter()

    def after_epoch(self) -> None:
        t = self.trainer
        self.evaluated = self.evaluate(t.epoch) if evaluates_after(t.cfg, t.epoch) else None

    def evaluate(self, epoch: int) -> dict[str, Any] | None:
        """Evaluate the model now (rank 0 gets the results, other ranks None), log the table and
        publish the eval row."""
        t = self.trainer
        evaluated = self._run(t.model)
        if evaluated is None:
            return None
        res = evaluated["results"]["plain"].to_dict()
        self.last_eval = {**{k: res[k] for k in KEPT if k in res}, "epoch": epoch}
        t.eval_result = self.last_eval
        logger.info(f"validation at epoch {epoch}:\n" + format_table("plain", res))
        record = {"type": "eval", "epoch": epoch, **{k: v for k, v in self.last_eval.items() if k != "epoch"}}
        if "reranked" in evaluated["results"]:
            rr = evaluated["results"]["reranked"].to_dict()
            logger.info(format_table("re-ranked", rr))
            record.update({f"reranked_{k}": rr[k] for k in ("mAP", "mINP", "rank1")})
        t.publish(record)
        return evaluated

    def _run(self, model: nn.Module) -> dict[str, Any] | None:
        t = self.trainer
        return evaluate_model(t.cfg, model, t.splits.query, t.splits.gallery, t.device,
                              multi_query=t.splits.multi_query)

    def after_train(self) -> None:
        t = self.trainer
        if t.averaged_model is not None:
            self._evaluate_averaged(t.averaged_model)
        if self.evaluated is not None and t.dist.is_main:
            t.results = write_results(t.cfg, t.out_dir, self.evaluated, t.splits.query, t.splits.gallery,
                                      {"epoch": t.epoch, "dataset": t.splits.test_name,
                                       "train_time_s": time.perf_counter() - self.started,
                                       "weights": str(t.out_dir / "last.pt")})
            logger.info("final results written to %s", t.out_dir / "results.json")

    def _evaluate_averaged(self, module: nn.Module) -> None:
        evaluated = self._run(module)
        if evaluated is None:
            return
        res = evaluated["results"]["plain"].to_dict()
        metrics = {k: res[k] for k in KEPT if k in res}
        self.trainer.averaged_metrics = metrics
        logger.info("averaged weights (SOLVER.WA):\n" + format_table("averaged", res))
        self.trainer.publish({"type": "eval_averaged", "epoch": self.trainer.epoch, **metrics})

    def state_dict(self) -> dict[str, Any]:
        return {} if self.last_eval is None else {"metrics": self.last_eval}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.last_eval = ckpt.get("metrics")
