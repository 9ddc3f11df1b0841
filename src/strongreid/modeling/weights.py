"""Loading weight files into backbones and ReID models by parameter name.

Files come from many places (torchvision, timm, Cadene's pretrainedmodels, IBN-Net, the original
project, our own checkpoints, safetensors), each with its own wrapping and key prefixes. Keys are
compared after stripping the prefixes these add (`module.`, `backbone.`, `base.`, `model.`...);
classifier layers are skipped; anything else that does not fit is reported, never silently lost.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from strongreid.errors import CheckpointError, StrongReIDError
from strongreid.modeling.checkpoint import (
    WRAPPER_PREFIXES,
    LoadReport,
    examples,
    match_state,
    read_weights_file,
    strip_prefixes,
)

logger = logging.getLogger(__name__)

# Wrappers that prefix parameter names: DataParallel/DDP, torch.compile, the original's Baseline
# (`base.`), our ReIDModel (`backbone.`) and TimmBackbone (`model.`).
PREFIXES = (*WRAPPER_PREFIXES, "backbone.", "base.", "model.")
# Top-level modules of ImageNet classifiers that a ReID backbone does not have.
CLASSIFIER_ROOTS = frozenset({"fc", "last_linear", "classifier", "head", "fc_norm"})


def canonical_key(key: str) -> str:
    """`module.backbone.model.layer1.0.conv1.weight` -> `layer1.0.conv1.weight`."""
    return strip_prefixes(key, PREFIXES)


def load_backbone_state(
    backbone: nn.Module, state: Mapping[str, torch.Tensor], source: str
) -> LoadReport:
    """Copy the tensors of `state` whose names and shapes fit into `backbone`; report the rest."""
    adapt = getattr(backbone, "adapt_state", None)  # timm: position embeddings to img_size
    if adapt is not None:
        state = adapt(state)
    own = backbone.state_dict()
    by_name = {canonical_key(k): k for k in own}
    to_load, report = match_state(
        own, state, target_of=lambda key: by_name.get(canonical_key(key)),
        skip_unknown=lambda key: canonical_key(key).split(".", 1)[0] in CLASSIFIER_ROOTS)
    arch = getattr(backbone, "arch", type(backbone).__name__)
    if not report.loaded:
        raise CheckpointError(
            f"{source}: none of its {len(state)} tensors fit the {arch} backbone (file keys like "
            f"{examples(list(state))}; the model expects keys like {examples(list(own))}). "
            f"Point MODEL.PRETRAIN_PATH at ImageNet weights for {arch}, or set "
            "MODEL.PRETRAIN_CHOICE 'none' for random initialisation."
        )
    backbone.load_state_dict(to_load, strict=False)
    log = logger.info if report.clean else logger.warning
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
    key = strip_prefixes(key)
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
    # The layers sized by the class count (layumi heads / PCB name theirs: modeling/heads/class_block.py, heads/pcb.py).
    class_layers = tuple(getattr(model, "class_layers", ("classifier.",)))

    def backbone_classifier(key: str) -> bool:  # e.g. the original IBN-a's unused ImageNet fc
        part, name = _split_model_key(key)
        return part == "backbone" and name.split(".", 1)[0] in CLASSIFIER_ROOTS

    to_load, report = match_state(own, state, target_of=lambda key: targets.get(_split_model_key(key)),
                                  skip_unknown=backbone_classifier,
                                  skip_other_shape=lambda target: target.startswith(class_layers))
    arch = getattr(model, "arch", type(model).__name__)
    if not report.clean:
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
