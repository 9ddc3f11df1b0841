"""Test-time features: the model's eval forward over views (flip, scales), for a loader or a split."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode

from strongreid.engine import distributed as D
from strongreid.engine.runtime import amp_dtype, autocast, use_channels_last

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
    """
    views = (images, torch.flip(images, dims=[3])) if flip else (images,)
    total: torch.Tensor | None = None
    count = 0
    for view in views:
        for scale in scales:
            x = view if scale == 1 else F.interpolate(
                view, scale_factor=math.sqrt(scale), mode="bicubic", align_corners=False)
            f = model(x).float()
            total = f if total is None else total + f
            count += 1
    assert total is not None  # scales is never empty (validated in config/loader.py)
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
    dtype = amp_dtype(cfg.MODEL.AMP, device)
    feats, _, _, _ = extract_features(
        model, loader, device, flip=cfg.TEST.FLIP_AUG, amp_dtype=dtype,
        channels_last=use_channels_last(cfg.MODEL.CHANNELS_LAST, device), scales=test_scales(cfg),
    )
    if feats.numel() == 0:
        feats = torch.zeros((0, _feat_dim(model)), dtype=torch.float32)
    return D.gather_in_order(feats.to(device) if device.type == "cuda" else feats, len(records))


def _feat_dim(model: nn.Module) -> int:
    m = model.module if hasattr(model, "module") else model
    return int(m.feat_dim)
