"""Evaluating a model on a test split: features of query and gallery, the metrics TEST.* asks
for, and the result files (results.json, ranking.npz); `strongreid test`."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from yacs.config import CfgNode

from strongreid.config import flag
from strongreid.data.integrity import check_splits
from strongreid.data.splits import load_splits
from strongreid.engine import distributed as D
from strongreid.engine.inference import extract_split, test_scales
from strongreid.engine.runtime import (
    feature_channels_last,
    feature_dtype,
    select_device,
    setup_logging,
)
from strongreid.errors import ConfigError
from strongreid.evaluation.multi_query import multi_query_features
from strongreid.evaluation.pipeline import evaluate_from_config, save_ranking
from strongreid.modeling.loading import LoadedModel, load_inference_model
from strongreid.paths import atomic_write_text

logger = logging.getLogger("strongreid")


def _ids(records: list) -> tuple[np.ndarray, np.ndarray]:
    pids = np.fromiter((r[1] for r in records), dtype=np.int64, count=len(records))
    cams = np.fromiter((r[2] for r in records), dtype=np.int64, count=len(records))
    return pids, cams


def evaluate_model(cfg: CfgNode, model: nn.Module, query: list, gallery: list, device: torch.device,
                   *, re_ranking: bool | None = None,
                   multi_query: list | None = None) -> dict[str, Any] | None:
    """Extract query and gallery features and evaluate them (rank 0 returns the results).

    With TEST.MULTI_QUERY the query features are replaced by the means of `multi_query`'s
    same-identity, same-camera images (`strongreid.evaluation.multi_query_features`).
    """
    use_mq = bool(cfg.TEST.MULTI_QUERY)
    if use_mq and not multi_query:
        raise ConfigError(
            "TEST.MULTI_QUERY is on but the test dataset has no multi-query images: they are "
            "Market-1501's gt_bbox/ folder (next to query/) or layumi's pytorch/multi-query/; "
            "add them or set TEST.MULTI_QUERY False"
        )
    t0 = time.perf_counter()
    qf = extract_split(cfg, model, query, device)
    gf = extract_split(cfg, model, gallery, device)
    mqf = extract_split(cfg, model, multi_query, device) if use_mq else None
    if qf is None or gf is None:
        return None
    t_extract = time.perf_counter() - t0
    q_pids, q_cams = _ids(query)
    g_pids, g_cams = _ids(gallery)
    if use_mq:
        mq_pids, mq_cams = _ids(multi_query)
        qf, kept_own = multi_query_features(qf, q_pids, q_cams, mqf, mq_pids, mq_cams,
                                            normalize=flag(cfg.TEST.FEAT_NORM))
        logger.info("multi-query: %d images for %d queries (%d without one keep their own feature)",
                    len(multi_query), len(query), kept_own)
    if re_ranking is not None and re_ranking != flag(cfg.TEST.RE_RANKING):
        cfg = cfg.clone()
        cfg.defrost()
        cfg.TEST.RE_RANKING = "yes" if re_ranking else "no"
        cfg.freeze()
    t1 = time.perf_counter()
    results = evaluate_from_config(cfg, qf, gf, q_pids, g_pids, q_cams, g_cams)
    logger.info(
        "features: %d query + %d gallery in %.1f s; evaluation %.1f s",
        len(query), len(gallery), t_extract, time.perf_counter() - t1,
    )
    return {"results": results, "q_pids": q_pids, "g_pids": g_pids, "q_camids": q_cams, "g_camids": g_cams}


def format_table(name: str, res: dict[str, Any]) -> str:
    cmc = res["cmc"]
    ranks = [r for r in (1, 5, 10) if r <= len(cmc)]
    head = "| " + " | ".join(["results", "mAP", "mINP"] + [f"R{r}" for r in ranks]) + " |"
    sep = "|" + "|".join(["---"] * (3 + len(ranks))) + "|"
    def pct(v: Any) -> str:
        return "n/a" if v is None or v != v else f"{100 * v:.1f}"  # None/NaN: no valid query

    vals = [name, pct(res["mAP"]), pct(res["mINP"])] + [pct(cmc[r - 1]) for r in ranks]
    row = "| " + " | ".join(vals) + " |"
    extra = f"queries: {res.get('num_valid', '?')} valid"
    if res.get("num_skipped"):
        extra += f", {res['num_skipped']} without a valid match skipped"
    return "\n".join([head, sep, row, extra])


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def write_results(cfg: CfgNode, out_dir: str | os.PathLike, evaluated: dict[str, Any], query: list,
                  gallery: list, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """results.json (+ results_reranked.json) and ranking.npz in the format of docs/ARCHITECTURE.md."""
    out_dir = Path(out_dir)
    results = evaluated["results"]
    plain = results["plain"].to_dict()
    plain.update({"num_query": len(query), "num_gallery": len(gallery), "re_ranking": False})
    if extra:
        plain.update(extra)
    final_key = "plain"
    if "reranked" in results:
        rr = results["reranked"].to_dict()
        rr.update({"num_query": len(query), "num_gallery": len(gallery), "re_ranking": True})
        if extra:
            rr.update(extra)
        write_json_atomic(rr, out_dir / "results_reranked.json")
        plain["reranked"] = {k: rr[k] for k in ("mAP", "mINP", "rank1", "rank5", "rank10") if k in rr}
        final_key = "reranked"
    write_json_atomic(plain, out_dir / "results.json")
    save_ranking(
        out_dir / "ranking.npz", results[final_key],
        [r[0] for r in query], [r[0] for r in gallery],
        evaluated["q_pids"], evaluated["g_pids"], evaluated["q_camids"], evaluated["g_camids"],
    )
    return plain


def keep_training_results(out_dir: Path) -> Path | None:
    """Before `test` writes into a training run's folder: that run's results.json (the only
    record of its epoch and training time) copied to results_train.json, once. The copy's path,
    or None when there was nothing to keep."""
    results, kept = out_dir / "results.json", out_dir / "results_train.json"
    if kept.exists() or not results.is_file():
        return None
    try:
        data = json.loads(results.read_text())
    except (OSError, ValueError):
        return None  # not a file training wrote: test replaces it as before
    if not isinstance(data, dict) or "train_time_s" not in data:
        return None
    write_json_atomic(data, kept)
    return kept


def build_test_model(cfg: CfgNode, weights: str) -> LoadedModel:
    """The model of a checkpoint, ready for inference (no ImageNet weights are fetched), the
    config to test it with (a foreign checkpoint sets its input size, pixel statistics and resize
    filter) and the loader's warnings, as a `LoadedModel`; a checkpoint of another architecture is
    a CheckpointError naming both."""
    return load_inference_model(cfg, weights)


def test_command(cfg: CfgNode) -> int:
    """`strongreid test`: evaluate TEST.WEIGHT, print the table, write the result files."""
    if not cfg.TEST.WEIGHT or cfg.TEST.WEIGHT == "path":
        raise ConfigError("strongreid test needs TEST.WEIGHT: the checkpoint to evaluate, e.g. "
                          "TEST.WEIGHT runs/demo/best.pt")
    device = select_device(cfg)
    ctx = D.init_distributed(device)
    out_dir = Path(cfg.OUTPUT_DIR)
    setup_logging(out_dir, ctx.rank)
    splits = load_splits(cfg, need_train=False)
    check_splits(cfg, splits, train=False, write_list=ctx.is_main)  # every bad file named at once
    loaded = build_test_model(cfg, cfg.TEST.WEIGHT)
    model, cfg = loaded.model.to(device), loaded.cfg
    dtype = feature_dtype(cfg, device)
    if feature_channels_last(cfg, device, dtype):
        model = model.to(memory_format=torch.channels_last)
    logger.info("evaluating %s on %s: %d query, %d gallery images", cfg.TEST.WEIGHT, splits.test_name,
                len(splits.query), len(splits.gallery))
    evaluated = evaluate_model(cfg, model, splits.query, splits.gallery, device,
                               multi_query=splits.multi_query)
    if evaluated is not None:
        kept = keep_training_results(out_dir)
        summary = write_results(cfg, out_dir, evaluated, splits.query, splits.gallery,
                                {"weights": str(cfg.TEST.WEIGHT), "dataset": splits.test_name,
                                 "multi_query": bool(cfg.TEST.MULTI_QUERY), "flip": bool(cfg.TEST.FLIP_AUG),
                                 "multi_scale": list(test_scales(cfg)),
                                 "interpolation": str(cfg.INPUT.INTERPOLATION),
                                 "precision": str(dtype or torch.float32).replace("torch.", ""),
                                 "warnings": list(loaded.warnings)})
        print(format_table("plain", summary))
        for message in loaded.warnings:
            print(f"warning: {message}")
        if "reranked" in evaluated["results"]:
            print(format_table("re-ranked", evaluated["results"]["reranked"].to_dict()))
        print(f"results written to {out_dir / 'results.json'}")
        if kept is not None:
            print(f"the training's results.json (its epoch and training time) is kept as {kept}")
    D.cleanup(wait=True)
    return 0
