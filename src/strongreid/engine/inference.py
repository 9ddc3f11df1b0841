"""Feature extraction and `strongreid test`."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode

from strongreid.config import flag
from strongreid.engine import distributed as D
from strongreid.engine.runtime import (
    autocast,
    feature_channels_last,
    feature_dtype,
    select_device,
)

logger = logging.getLogger("strongreid")


def test_scales(cfg: CfgNode) -> tuple[float, ...]:
    """TEST.MULTI_SCALE as floats (layumi's --ms values)."""
    return tuple(float(s) for s in cfg.TEST.MULTI_SCALE)


def tta_forward(model: nn.Module, images: torch.Tensor, flip: bool = False,
                scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """The mean feature over the image, its mirror (`flip`) and its rescaled copies (`scales`).

    As layumi's test.py: a scale s resizes each side by sqrt(s) with bicubic interpolation
    (align_corners False), and every (flip, scale) view's feature enters the mean, taken before
    any normalisation. Unlike test.py, which resizes the previous scale's tensor again, every
    scale is taken from the original image (the same for its usual `--ms 1,1.1`).

    A model whose feature is not linear in its views says how to combine them: PCB
    (`test_view_feature` / `merge_test_views`) sums the raw stripes of every view and normalises
    each stripe once, as layumi's test.py does; averaging its normalised features would not.
    """
    net = model.module if hasattr(model, "module") else model  # DDP: the hooks live inside
    view_feature = getattr(net, "test_view_feature", None)
    forward = view_feature if view_feature is not None else model
    views = (images, torch.flip(images, dims=[3])) if flip else (images,)
    total: torch.Tensor | None = None
    count = 0
    for view in views:
        for scale in scales:
            x = view if scale == 1 else F.interpolate(
                view, scale_factor=math.sqrt(scale), mode="bicubic", align_corners=False)
            f = forward(x).float()
            total = f if total is None else total + f
            count += 1
    assert total is not None  # scales is never empty (validated in config/loader.py)
    if view_feature is not None:
        return net.merge_test_views(total)
    return total / count


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader,
    device: torch.device,
    flip: bool = False,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    scales: Sequence[float] = (1.0,),
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, list[str]]:
    """Test features of every image the loader yields, in loader order (float32, on the CPU).

    With `flip`, the feature is the mean of the image's and its mirror's features, taken before
    any normalisation (normalisation is the evaluator's job, as TEST.FEAT_NORM says); `scales`
    adds rescaled copies to that mean (TEST.MULTI_SCALE, see `tta_forward`).
    """
    was_training = model.training
    model.eval()
    feats, pids, camids, paths = [], [], [], []
    for images, pid, camid, path in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            f = tta_forward(model, images, flip, scales)
        feats.append(f.cpu())
        pids.append(np.asarray(pid))
        camids.append(np.asarray(camid))
        paths.extend(path)
    model.train(was_training)
    if not feats:
        return torch.empty(0, 0), np.empty(0, np.int64), np.empty(0, np.int64), []
    return torch.cat(feats), np.concatenate(pids), np.concatenate(camids), paths


def extract_split(cfg: CfgNode, model: nn.Module, records: list, device: torch.device) -> torch.Tensor | None:
    """Features of `records`; under torchrun each rank extracts a contiguous shard and rank 0
    receives them all in order (other ranks get None)."""
    from strongreid.data import build_test_loader

    ctx = D.current()
    start, end = D.shard_range(len(records), ctx.rank, ctx.world_size)
    loader = build_test_loader(cfg, records[start:end])
    dtype = feature_dtype(cfg, device)
    feats, _, _, _ = extract_features(
        model, loader, device, flip=cfg.TEST.FLIP_AUG, amp_dtype=dtype,
        channels_last=feature_channels_last(cfg, device, dtype), scales=test_scales(cfg),
    )
    if feats.numel() == 0:
        feats = torch.zeros((0, _feat_dim(model)), dtype=torch.float32)
    return D.gather_in_order(feats.to(device) if device.type == "cuda" else feats, len(records))


def _feat_dim(model: nn.Module) -> int:
    m = model.module if hasattr(model, "module") else model
    return int(m.feat_dim)


def evaluate_model(cfg: CfgNode, model: nn.Module, query: list, gallery: list, device: torch.device,
                   *, re_ranking: bool | None = None,
                   multi_query: list | None = None) -> dict[str, Any] | None:
    """Extract query and gallery features and evaluate them (rank 0 returns the results).

    With TEST.MULTI_QUERY the query features are replaced by the means of `multi_query`'s
    same-identity, same-camera images (`strongreid.evaluation.multi_query_features`).
    """
    from strongreid.evaluation import evaluate_from_config

    use_mq = bool(cfg.TEST.MULTI_QUERY)
    if use_mq and not multi_query:
        from strongreid.errors import ConfigError

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
        from strongreid.evaluation import multi_query_features

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


def _ids(records: list) -> tuple[np.ndarray, np.ndarray]:
    pids = np.fromiter((r[1] for r in records), dtype=np.int64, count=len(records))
    cams = np.fromiter((r[2] for r in records), dtype=np.int64, count=len(records))
    return pids, cams


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def write_results(cfg: CfgNode, out_dir: str | os.PathLike, evaluated: dict[str, Any], query: list,
                  gallery: list, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """results.json (+ results_reranked.json) and ranking.npz in the format of docs/ARCHITECTURE.md."""
    from strongreid.evaluation import save_ranking

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


def build_test_model(cfg: CfgNode, weights: str):
    """The model of a checkpoint, ready for inference (no ImageNet weights are fetched), the
    config to test it with (a foreign checkpoint sets its input size, pixel statistics and resize
    filter) and the loader's warnings, as a `LoadedModel`; a checkpoint of another architecture is
    a CheckpointError naming both."""
    from strongreid.modeling.loading import load_inference_model

    return load_inference_model(cfg, weights)


def test_command(cfg: CfgNode) -> int:
    """`strongreid test`: evaluate TEST.WEIGHT, print the table, write the result files."""
    from strongreid.data.splits import load_splits
    from strongreid.engine.runtime import setup_logging
    from strongreid.errors import ConfigError

    if not cfg.TEST.WEIGHT or cfg.TEST.WEIGHT == "path":
        raise ConfigError("strongreid test needs TEST.WEIGHT: the checkpoint to evaluate, e.g. "
                          "TEST.WEIGHT runs/demo/best.pt")
    device = select_device(cfg)
    ctx = D.init_distributed(device)
    out_dir = Path(cfg.OUTPUT_DIR)
    setup_logging(out_dir, ctx.rank)
    splits = load_splits(cfg, need_train=False)
    from strongreid.data.integrity import check_splits

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
    D.cleanup()
    return 0
