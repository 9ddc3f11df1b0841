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
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from yacs.config import CfgNode

from strongreid.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)


def read_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (no pickled code runs); errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (check TEST.WEIGHT / MODEL.PRETRAIN_PATH / OUTPUT_DIR)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise pickled_objects_error(path, str(exc)) from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: {first}. It is truncated, not a PyTorch file, or holds "
            "pickled objects (reid-strong-baseline's ignite 0.1.2 files pickle whole modules: load "
            "them in that project and save `model.state_dict()` instead)."
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def pickled_objects_error(path: Path, message: str) -> CheckpointError:
    """The one message for a file that pickles code objects, not just tensors.

    torch.load(weights_only=True) names the first class it refused ("Unsupported global: GLOBAL
    modeling.baseline.Baseline"); reid-strong-baseline's package is `modeling`, and its released
    models and ignite 0.1.2 checkpoints pickle the whole module.
    """
    found = re.search(r"GLOBAL ([\w.]+)", message)
    name = found.group(1) if found else None
    if name is None or not name.startswith("modeling."):
        what = f"a pickled {name}" if name else "pickled Python objects"
        return CheckpointError(
            f"cannot read checkpoint {path}: it holds {what}, not only tensors, and strongreid "
            "reads checkpoints with weights_only=True so that no code from a file runs. Load it "
            "in the project that wrote it and save `model.state_dict()` instead."
        )
    return CheckpointError(
        f"{path} holds a whole pickled reid-strong-baseline model ({name}; its released "
        "resnet50_model_*.pth and ignite 0.1.2 checkpoints are saved so), which cannot be loaded "
        "safely: unpickling runs that project's code, and strongreid reads files with "
        "weights_only=True. Convert it once in a checkout of reid-strong-baseline: python -c "
        "\"import torch; m = torch.load('FILE', map_location='cpu', weights_only=False); "
        "torch.save(m.state_dict(), 'FILE_state.pth')\" and give strongreid the new file "
        "(docs/model-zoo.md)."
    )


def _bare_key(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def read_checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint (or a .safetensors file from `strongreid export`) records about its model.

    Keys: `arch` (MODEL.NAME), `num_classes`, `config` (YAML text) - each None when absent -
    and `classifier_rows`, the class count its classifier weights actually hold.
    """
    path = Path(path)
    info: dict[str, Any] = {"arch": None, "num_classes": None, "config": None, "classifier_rows": None}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        if not path.is_file():
            raise CheckpointError(f"weight file {path} does not exist; check the path given as weights")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                shapes = {_bare_key(k): f.get_slice(k).get_shape() for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None
        info["arch"] = meta.get("arch") or None
        info["config"] = meta.get("config") or None
        if meta.get("num_classes", "").isdigit():
            info["num_classes"] = int(meta["num_classes"])
    else:
        raw = read_checkpoint_file(path)
        state = raw
        for wrapper in ("model", "state_dict"):
            if isinstance(raw.get(wrapper), dict):
                state = raw[wrapper]
                info["arch"] = raw.get("arch") if isinstance(raw.get("arch"), str) else None
                info["num_classes"] = raw.get("num_classes") if isinstance(raw.get("num_classes"), int) else None
                info["config"] = raw.get("config") if isinstance(raw.get("config"), str) else None
                break
        shapes = {_bare_key(str(k)): tuple(v.shape) for k, v in state.items()
                  if isinstance(v, torch.Tensor)}
    # BNNeck / plain classifier, layumi's ClassBlock, PCB's first part classifier.
    classifier = next((shapes[k] for k in ("classifier.weight", "classifier.classifier.0.weight",
                                           "classifier0.classifier.0.weight") if k in shapes), None)
    if classifier is not None and len(classifier) == 2:
        info["classifier_rows"] = int(classifier[0])
    return info


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
    raw = read_checkpoint_file(path)
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
    # An original-project state dict records no class count: its classifier tells it.
    num_classes = int(declared) if declared is not None else rows if rows is not None else 1
    model = build_model(_no_pretrain(cfg), num_classes)
    load_test_weights(model, path)
    return model.eval()


def _load_foreign(cfg: CfgNode, path: Path, fmt: str, raw: dict[str, Any] | None) -> LoadedModel:
    from strongreid.config.loader import explicit_keys, with_overrides
    from strongreid.modeling import build_model
    from strongreid.modeling.formats import CHECKPOINT_FORMATS
    from strongreid.modeling.weights import LoadReport

    if raw is None:
        raw = read_checkpoint_file(path)
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
    own = model.state_dict()
    report = LoadReport(skipped=list(converted.ignored))
    to_load: dict[str, torch.Tensor] = {}
    for key, tensor in converted.state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(tensor.shape) != tuple(own[key].shape):
            report.mismatched.append((key, tuple(tensor.shape), tuple(own[key].shape)))
        else:
            to_load[key] = tensor
            report.loaded.append(key)
    report.missing = [k for k in own if k not in to_load and not k.endswith("num_batches_tracked")]
    if report.missing or report.unexpected or report.mismatched:
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
