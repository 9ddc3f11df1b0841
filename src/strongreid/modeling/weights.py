"""Reading weight files and loading them into backbones and ReID models by parameter name.

Files come from many places (torchvision, timm, Cadene's pretrainedmodels, IBN-Net, the original
project, our own checkpoints, safetensors), each with its own wrapping and key prefixes. Keys are
compared after stripping the prefixes these add (`module.`, `backbone.`, `base.`, `model.`...);
classifier layers are skipped; anything else that does not fit is reported, never silently lost.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from strongreid.errors import CheckpointError, StrongReIDError

logger = logging.getLogger(__name__)

# Wrappers that prefix parameter names: DataParallel/DDP, torch.compile, the original's Baseline
# (`base.`), our ReIDModel (`backbone.`) and TimmBackbone (`model.`).
PREFIXES = ("module.", "_orig_mod.", "backbone.", "base.", "model.")
# Top-level modules of ImageNet classifiers that a ReID backbone does not have.
CLASSIFIER_ROOTS = frozenset({"fc", "last_linear", "classifier", "head", "fc_norm"})


@dataclass
class LoadReport:
    """What a load did: keys loaded, skipped (classifiers), and what did not fit."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} classifier tensors skipped")
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({_examples(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({_examples(self.unexpected)})")
        if self.mismatched:
            shown = ", ".join(f"{k}: file {tuple(a)} vs model {tuple(b)}"
                              for k, a, b in self.mismatched[:3])
            parts.append(f"{len(self.mismatched)} with another shape ({shown})")
        return "; ".join(parts)


def _examples(keys: list[str], n: int = 3) -> str:
    more = f", ... {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def canonical_key(key: str) -> str:
    """`module.backbone.model.layer1.0.conv1.weight` -> `layer1.0.conv1.weight`."""
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                changed = True
    return key


def read_weights_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict in `path` and, for a strongreid checkpoint, its `arch`/`num_classes`.

    Accepts bare state dicts (torchvision, Cadene, IBN-Net, the original's released models),
    `{"model": ...}` (strongreid), `{"state_dict": ...}` (timm/Lightning training files) and
    .safetensors. Always read on the CPU with weights_only=True: no code from a file runs.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weight file {p} does not exist; check the path in the config")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p), device="cpu")), {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {p} as safetensors: {exc}") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        from strongreid.modeling.loading import pickled_objects_error

        raise pickled_objects_error(p, str(exc)) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"cannot read {p}: {exc} (truncated or not a PyTorch file?)") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a state dict")
    meta: dict[str, Any] = {}
    state: Any = obj
    for wrapper in ("model", "state_dict"):
        if isinstance(obj.get(wrapper), Mapping):
            state = obj[wrapper]
            meta = {k: obj[k] for k in ("arch", "num_classes") if k in obj}
            break
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{p} holds no tensors (keys: {_examples(list(map(str, obj)))})")
    return tensors, meta


def load_backbone_state(
    backbone: nn.Module, state: Mapping[str, torch.Tensor], source: str
) -> LoadReport:
    """Copy the tensors of `state` whose names and shapes fit into `backbone`; report the rest."""
    adapt = getattr(backbone, "adapt_state", None)  # timm: position embeddings to img_size
    if adapt is not None:
        state = adapt(state)
    own = backbone.state_dict()
    by_name = {canonical_key(k): k for k in own}
    report = LoadReport()
    to_load: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = canonical_key(key)
        if name not in by_name:
            if name.split(".", 1)[0] in CLASSIFIER_ROOTS:
                report.skipped.append(key)
            else:
                report.unexpected.append(key)
            continue
        target = by_name[name]
        if tuple(tensor.shape) != tuple(own[target].shape):
            report.mismatched.append((key, tuple(tensor.shape), tuple(own[target].shape)))
            continue
        to_load[target] = tensor
        report.loaded.append(target)
    # Files from before PyTorch 0.4.1 lack the BN step counters; those are harmless to miss.
    report.missing = [k for k in own if k not in to_load and not k.endswith("num_batches_tracked")]
    arch = getattr(backbone, "arch", type(backbone).__name__)
    if not report.loaded:
        raise CheckpointError(
            f"{source}: none of its {len(state)} tensors fit the {arch} backbone (file keys like "
            f"{_examples(list(state))}; the model expects keys like {_examples(list(own))}). "
            f"Point MODEL.PRETRAIN_PATH at ImageNet weights for {arch}, or set "
            "MODEL.PRETRAIN_CHOICE 'none' for random initialisation."
        )
    backbone.load_state_dict(to_load, strict=False)
    log = logger.warning if (report.missing or report.unexpected or report.mismatched) else logger.info
    log("loaded %s into %s: %s", source, arch, report.summary())
    return report


def load_backbone_file(backbone: nn.Module, path: str | Path) -> LoadReport:
    """ImageNet (or any) weights from a file into a backbone (MODEL.PRETRAIN_PATH)."""
    state, _ = read_weights_file(path)
    return load_backbone_state(backbone, state, str(path))


def fetch_published_weights(backbone: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """The published ImageNet weights of `backbone`, through torchvision's / timm's own cache."""
    kind, ident = getattr(backbone, "weights_source", (None, None))
    arch = getattr(backbone, "arch", type(backbone).__name__)
    if kind is None:
        raise StrongReIDError(
            f"no published ImageNet weights are known for {arch}: set MODEL.PRETRAIN_PATH to a "
            "weight file, or MODEL.PRETRAIN_CHOICE 'none' for random initialisation"
        )
    if kind == "manual":  # published, but only behind a page no HTTP client can fetch from
        raise StrongReIDError(
            f"the ImageNet weights of {arch} cannot be downloaded automatically: get {ident}, "
            "then set MODEL.PRETRAIN_PATH to the file (or MODEL.PRETRAIN_CHOICE 'none' for "
            "random initialisation)"
        )
    where = {"torchvision": f"torchvision {ident} IMAGENET1K_V1", "url": ident,
             "timm": f"timm {ident}"}[kind]
    try:
        if kind == "torchvision":
            import torchvision

            weights = torchvision.models.get_model_weights(ident).IMAGENET1K_V1
            state = weights.get_state_dict(progress=True)
        elif kind == "url":
            state = torch.hub.load_state_dict_from_url(
                ident, map_location="cpu", progress=True, weights_only=True
            )
        else:
            import timm

            state = timm.create_model(ident, pretrained=True, num_classes=0).state_dict()
    except Exception as exc:  # noqa: BLE001 - any failure here means "could not get them"
        # Offline this is a URLError / huggingface_hub error; whatever it is, the fix is the same.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StrongReIDError(
            f"could not get the published ImageNet weights of {arch} ({where}): {reason}. "
            "Without internet access, download them elsewhere and set MODEL.PRETRAIN_PATH to the "
            "file, or set MODEL.PRETRAIN_CHOICE 'none' to start from random weights."
        ) from None
    return dict(state), where


def load_published_weights(backbone: nn.Module) -> LoadReport:
    """PRETRAIN_CHOICE 'imagenet' without PRETRAIN_PATH."""
    state, where = fetch_published_weights(backbone)
    return load_backbone_state(backbone, state, where)


def _split_model_key(key: str) -> tuple[str, str]:
    """('backbone', canonical name) or ('head', name) for a ReIDModel / original Baseline key."""
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    for prefix in ("backbone.", "base."):
        if key.startswith(prefix):
            return "backbone", canonical_key(key[len(prefix):])
    return "head", key


def load_test_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Load a strongreid checkpoint (or a bare / original-project state dict) into `model`.

    The classifier is skipped when the class count differs (cross-domain test, fine-tuning).
    Anything else that does not fit means another architecture: CheckpointError.
    """
    model = getattr(model, "module", model)  # DDP / DataParallel
    state, meta = read_weights_file(path)
    own = model.state_dict()
    targets = {_split_model_key(k): k for k in own}
    report = LoadReport()
    # The layers sized by the class count (layumi heads / PCB name theirs: modeling/layumi.py).
    class_layers = tuple(getattr(model, "class_layers", ("classifier.",)))
    to_load: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        part = _split_model_key(key)
        target = targets.get(part)
        if target is None:
            if part[0] == "backbone" and part[1].split(".", 1)[0] in CLASSIFIER_ROOTS:
                report.skipped.append(key)  # e.g. the original IBN-a's unused ImageNet fc
            else:
                report.unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(own[target].shape):
            if target.startswith(class_layers):
                report.skipped.append(key)
            else:
                report.mismatched.append((key, tuple(tensor.shape), tuple(own[target].shape)))
            continue
        to_load[target] = tensor
        report.loaded.append(target)
    report.missing = [
        k for k in own
        if k not in to_load and not k.endswith("num_batches_tracked")
        and not k.startswith(class_layers)
    ]
    arch = getattr(model, "arch", type(model).__name__)
    if report.missing or report.unexpected or report.mismatched:
        ckpt_arch = meta.get("arch") or "an unrecorded architecture (bare state dict)"
        raise CheckpointError(
            f"{path} holds a model of {ckpt_arch}, which does not fit the {arch} model the config "
            f"builds: {report.summary()}. Set MODEL.NAME / MODEL.NECK / MODEL.POOLING to those of "
            "the checkpoint, or give the checkpoint trained with this config."
        )
    if report.skipped:
        n_ckpt = meta.get("num_classes", "another number of")
        logger.info(
            "%s: classifier not loaded (checkpoint has %s classes, the model %d); fine for "
            "testing on another dataset or fine-tuning", path, n_ckpt, model.num_classes,
        )
    model.load_state_dict(to_load, strict=False)
    return report
