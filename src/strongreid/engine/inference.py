"""Test-time features, computed in one place (`test_feature`) for `strongreid test`, training's
evaluation, `strongreid extract`, `FeatureExtractor` and the exported graphs (deploy/export.py):
the model's eval forward over the views TEST.FLIP_AUG / TEST.MULTI_SCALE ask for (`tta_forward`,
which lets PCB merge its stripes), in TEST.PRECISION, L2-normalised where TEST.FEAT_NORM applies."""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode

from strongreid.engine import distributed as D
from strongreid.engine.runtime import (
    autocast,
    autocast_agrees,
    feature_channels_last,
    feature_dtype,
)

logger = logging.getLogger("strongreid")

# model -> {(input shape, device, dtype, views): autocast agreed with fp32}; weak, so a model
# that goes away takes its verdicts along.
_AUTOCAST_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def test_scales(cfg: CfgNode) -> tuple[float, ...]:
    """TEST.MULTI_SCALE as floats (layumi's --ms values)."""
    return tuple(float(s) for s in cfg.TEST.MULTI_SCALE)


def camera_inputs(model: nn.Module, camids: object, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """`{"camids": ...}` for a model that embeds the camera (its `takes_camids` is true:
    TransReID's SIE), `{}` for every other model or when no camera ids are known."""
    net = getattr(model, "module", model)  # DDP / DataParallel
    net = getattr(net, "_orig_mod", net)  # torch.compile
    if camids is None or not getattr(net, "takes_camids", False):
        return {}
    if isinstance(camids, torch.Tensor):
        return {"camids": camids.to(device=device, dtype=torch.long)}
    return {"camids": torch.as_tensor(np.array(camids, dtype=np.int64), device=device)}


def tta_forward(model: nn.Module, images: torch.Tensor, flip: bool = False,
                scales: Sequence[float] = (1.0,), camids: torch.Tensor | None = None) -> torch.Tensor:
    """The mean feature over the image, its mirror (`flip`) and its rescaled copies (`scales`).

    As layumi's test.py: a scale s resizes each side by sqrt(s) with bicubic interpolation
    (align_corners False), and every (flip, scale) view's feature enters the mean, taken before
    any normalisation. Unlike test.py, which resizes the previous scale's tensor again, every
    scale is taken from the original image (the same for its usual `--ms 1,1.1`). `camids`
    (from `camera_inputs`) go to every view's forward.

    A model whose feature is not linear in its views says how to combine them: PCB
    (`test_view_feature` / `merge_test_views`) sums the raw stripes of every view and normalises
    each stripe once, as layumi's test.py does; averaging its normalised features would not.
    """
    net = model.module if hasattr(model, "module") else model  # DDP: the hooks live inside
    view_feature = getattr(net, "test_view_feature", None)
    forward = view_feature if view_feature is not None else model
    extra = {"camids": camids} if camids is not None else {}
    views = (images, torch.flip(images, dims=[3])) if flip else (images,)
    total: torch.Tensor | None = None
    count = 0
    for view in views:
        for scale in scales:
            x = view if scale == 1 else F.interpolate(
                view, scale_factor=math.sqrt(scale), mode="bicubic", align_corners=False)
            f = forward(x, **extra).float()
            total = f if total is None else total + f
            count += 1
    assert total is not None  # scales is never empty (validated in config/loader.py)
    if view_feature is not None:
        return net.merge_test_views(total)
    return total / count


def _autocast_verdicts(model: object) -> dict:
    try:
        return _AUTOCAST_VERDICTS.setdefault(model, {})
    except TypeError:  # not weakly referable (a bound method): checked on every call
        return {}


def test_feature(model: nn.Module, images: torch.Tensor, flip: bool = False,
                 scales: Sequence[float] = (1.0,), normalize: bool = False,
                 amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                 camids: object = None) -> torch.Tensor:
    """The test feature of a preprocessed batch: `tta_forward` under autocast `amp_dtype` (None:
    fp32), then L2 normalisation when `normalize`. `camids` (one per image) reach a model that
    embeds the camera; other models ignore them.

    `strongreid test` and training's evaluation leave `normalize` off: the evaluator applies
    TEST.FEAT_NORM itself, before query expansion and re-ranking. `extract`, FeatureExtractor and
    the exported graphs turn it on with TEST.FEAT_NORM 'yes'.
    """
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    cams = camera_inputs(model, camids, images.device).get("camids")
    verdicts = _autocast_verdicts(model) if amp_dtype is not None else {}
    key = (tuple(images.shape), str(images.device), amp_dtype, flip, tuple(scales))
    if amp_dtype is None or verdicts.get(key) is False:
        f = tta_forward(model, images, flip, scales, cams)
    else:
        with autocast(images.device, amp_dtype):
            f = tta_forward(model, images, flip, scales, cams)
        if key not in verdicts:
            # The first batch of each shape is also computed in fp32: a fault of the reduced-
            # precision kernels (runtime.autocast_agrees) sends that shape to fp32 for good.
            full = tta_forward(model, images, flip, scales, cams).float()
            verdicts[key] = autocast_agrees(f, full)
            if not verdicts[key]:
                logger.warning("mixed-precision (%s) features of input shape %s disagree with fp32 "
                               "ones on this machine; that shape is computed in fp32 from now on "
                               "(TEST.PRECISION fp32 skips this check)", amp_dtype, list(images.shape))
                f = full
        elif not bool(torch.isfinite(f).all()):
            logger.warning("mixed-precision (%s) features of a batch were not finite; that batch was "
                           "recomputed in fp32 (TEST.PRECISION fp32 avoids mixed precision)", amp_dtype)
            f = tta_forward(model, images, flip, scales, cams).float()
    if normalize:
        f = F.normalize(f, p=2, dim=1, eps=1e-12)
    return f


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
        f = test_feature(model, images, flip, scales, amp_dtype=amp_dtype, channels_last=channels_last,
                         camids=camid)
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
