"""Loading a trained model for inference, in one place for `strongreid test`, `extract`,
`export`, `FeatureExtractor` and the gallery search service.

A weight file is one of: a strongreid checkpoint (`{"model": ..., "arch": ..., "config": ...}`),
a `.safetensors` file from `strongreid export`, a bare ReIDModel / reid-strong-baseline state
dict, or a checkpoint of another project that a registered format converts
(`strongreid.modeling.formats`). Files are always read with `weights_only=True`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn
from yacs.config import CfgNode

from strongreid.errors import CheckpointError, ConfigError
from strongreid.modeling.checkpoint import match_state, read_checkpoint, read_checkpoint_info

logger = logging.getLogger(__name__)


def config_for(config: Any, info: dict[str, Any] | None) -> CfgNode:
    """The config to build an inference model with: the one given (yaml path or CfgNode), else
    the one stored in the checkpoint, else the defaults."""
    from strongreid.config import load_config
    from strongreid.config.loader import config_from_text

    if isinstance(config, CfgNode):
        return config
    if isinstance(config, (str, os.PathLike)):
        return load_config(os.fspath(config), [])
    if config is not None:
        raise ConfigError(f"config must be a yaml path, a CfgNode or None, got {type(config).__name__}")
    if info and info.get("config"):
        return config_from_text(info["config"])
    return load_config(None, [])


class LoadedModel(NamedTuple):
    """An eval-mode CPU model, the config that built it (the caller's plus what a foreign
    checkpoint implies: input size, pixel statistics, resize filter...; use it for the
    transforms), the checkpoint's format, and what the file could not tell (already logged)."""

    model: nn.Module
    cfg: CfgNode
    format: str
    warnings: tuple[str, ...] = ()


def checkpoint_format(cfg: CfgNode, path: Path) -> tuple[str, dict[str, Any] | None]:
    """MODEL.CHECKPOINT_FORMAT resolved for `path`, and the raw file when it was read."""
    from strongreid.modeling.formats import CHECKPOINT_FORMATS, NATIVE, detect_format

    wanted = cfg.MODEL.CHECKPOINT_FORMAT
    if wanted not in ("auto", NATIVE) and wanted not in CHECKPOINT_FORMATS:
        known = ", ".join(["auto", NATIVE, *CHECKPOINT_FORMATS.names()])
        raise ConfigError(f"MODEL.CHECKPOINT_FORMAT = {wanted!r} is not a known format; use one of {known}")
    if path.suffix == ".safetensors":
        if wanted not in ("auto", NATIVE):
            raise ConfigError(f"{path} is a safetensors export of strongreid, not a {wanted!r} "
                              "checkpoint: set MODEL.CHECKPOINT_FORMAT auto")
        return NATIVE, None
    raw = read_checkpoint(path)
    return (detect_format(raw) if wanted == "auto" else wanted), raw


def load_inference_model(cfg: CfgNode, weights: str | os.PathLike,
                         info: dict[str, Any] | None = None) -> LoadedModel:
    """The model of a checkpoint in eval mode on the CPU, whatever project wrote it.

    A strongreid model is built with the class count the checkpoint records, so the classifier
    (unused by the test feature) loads too; a checkpoint of another architecture than MODEL.NAME
    is a CheckpointError naming both. A foreign checkpoint is converted by its format and loaded
    strictly.
    """
    from strongreid.modeling.formats import NATIVE

    path = Path(weights)
    fmt, raw = checkpoint_format(cfg, path)
    if fmt == NATIVE:
        model = _load_native(cfg, path, info)
        return LoadedModel(model, cfg, NATIVE)
    return _load_foreign(cfg, path, fmt, raw)


def _no_pretrain(cfg: CfgNode) -> CfgNode:
    # Every weight comes from the checkpoint: fetching ImageNet weights first would be wasted
    # (and fails offline).
    build_cfg = cfg.clone()
    build_cfg.defrost()
    build_cfg.MODEL.PRETRAIN_CHOICE = "none"
    build_cfg.freeze()
    return build_cfg


def _load_native(cfg: CfgNode, path: Path, info: dict[str, Any] | None) -> nn.Module:
    from strongreid.modeling import build_model, load_test_weights

    if info is None:
        info = read_checkpoint_info(path)
    arch = info.get("arch")
    if arch and arch != cfg.MODEL.NAME:
        raise CheckpointError(
            f"checkpoint {path} is a {arch!r} model but MODEL.NAME is {cfg.MODEL.NAME!r}: set "
            f"MODEL.NAME {arch} (or pass the config.yaml of the run that wrote the checkpoint)"
        )
    declared, rows = info.get("num_classes"), info.get("classifier_rows")
    if declared is not None and rows is not None and int(declared) != rows:
        raise CheckpointError(
            f"checkpoint {path} records num_classes {declared} but its classifier has {rows} "
            "classes: the file was assembled from two runs; re-save it from the training run"
        )
    _warn_feature_settings(cfg, info, path)
    # An original-project state dict records no class count: its classifier tells it.
    num_classes = int(declared) if declared is not None else rows if rows is not None else 1
    model = build_model(_no_pretrain(cfg), num_classes)
    load_test_weights(model, path)
    return model.eval()


# Settings that change a model's features without changing its weights: a model tested with
# other values than it was trained with loads cleanly and scores silently lower.
FEATURE_KEYS = ("INPUT.SIZE_TEST", "INPUT.PIXEL_MEAN", "INPUT.PIXEL_STD", "MODEL.LAST_STRIDE",
                "MODEL.POOLING", "TEST.NECK_FEAT", "TEST.FEAT_NORM")


def feature_settings_drift(cfg: CfgNode, saved: CfgNode) -> dict[str, tuple[Any, Any]]:
    """FEATURE_KEYS whose value in `cfg` differs from the checkpoint's config: key -> (now, then)."""
    def value(node: CfgNode, key: str) -> Any:
        for part in key.split("."):
            node = node[part]
        return list(node) if isinstance(node, (list, tuple)) else node

    return {k: (value(cfg, k), value(saved, k)) for k in FEATURE_KEYS
            if value(cfg, k) != value(saved, k)}


def _warn_feature_settings(cfg: CfgNode, info: dict[str, Any], path: Path) -> None:
    from strongreid.config.loader import config_from_text, explicit_keys

    if not info.get("config"):
        return
    try:
        saved = config_from_text(info["config"])
    except (ConfigError, ValueError, TypeError, KeyError):
        return  # a config this version cannot read: nothing to compare with
    # A value the user set on purpose (a file or an override) is theirs to choose.
    drift = {k: v for k, v in feature_settings_drift(cfg, saved).items()
             if k not in explicit_keys(cfg)}
    if drift:
        logger.warning(
            "checkpoint %s was trained with %s (its stored config); this run uses the defaults "
            "%s, so its features are not the model's: pass --config with the run's config.yaml, "
            "or set these keys to choose", path,
            ", ".join(f"{k} {then}" for k, (_, then) in drift.items()),
            ", ".join(f"{k} {now}" for k, (now, _) in drift.items()))


def _load_foreign(cfg: CfgNode, path: Path, fmt: str, raw: dict[str, Any] | None) -> LoadedModel:
    from strongreid.config.loader import explicit_keys, with_overrides
    from strongreid.modeling import build_model
    from strongreid.modeling.formats import CHECKPOINT_FORMATS

    if raw is None:
        raw = read_checkpoint(path)
    converted = CHECKPOINT_FORMATS.get(fmt)().convert(raw, path)
    # The format's guesses give way to keys the user set; its warnings then no longer apply.
    user = explicit_keys(cfg)
    guessed = {k: v for k, v in converted.defaults.items() if k not in user}
    overrides = {**guessed, **converted.overrides, "MODEL.CHECKPOINT_FORMAT": fmt}
    warnings = tuple(converted.warnings[k] for k in guessed if k in converted.warnings)
    for message in warnings:
        logger.warning("%s", message)
    build_cfg = with_overrides(_no_pretrain(cfg), overrides, f"for the {converted.source} checkpoint {path}")
    model = build_model(build_cfg, converted.num_classes)
    to_load, report = match_state(model.state_dict(), converted.state)
    report.skipped = list(converted.ignored)
    if not report.clean:
        arch = getattr(model, "arch", build_cfg.MODEL.NAME)
        raise CheckpointError(
            f"{path} is a {converted.source} checkpoint, which does not fit the {arch} model built "
            f"for it: {report.summary()}. Check MODEL.CHECKPOINT_FORMAT (now {fmt!r}) or convert the "
            "file with the project that wrote it."
        )
    model.load_state_dict(to_load, strict=False)
    logger.info("%s: %s checkpoint loaded as %s (%s)", path, converted.source, build_cfg.MODEL.NAME,
                report.summary())
    return LoadedModel(model.eval(), build_cfg, fmt, warnings)
