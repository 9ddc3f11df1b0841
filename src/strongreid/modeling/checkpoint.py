"""Checkpoint files, in one place: reading (weights_only=True, one CheckpointError for a file that
cannot be read safely), writing (atomically), the state dict inside a file, wrapper prefixes,
and matching a file's tensors to a model's with a report of what did not fit.

Training (resume, last.pt/best.pt), `strongreid test`/`extract`/`export`, pretrained weights
(modeling/weights.py), inference loading (modeling/loading.py) and the formats of other projects
(modeling/formats/) all read and write through it.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from strongreid.errors import CheckpointError

logger = logging.getLogger(__name__)

# Prefixes that wrappers put before every parameter name: DataParallel / DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Where training files nest their state dict: strongreid / fast-reid `model`, timm / Lightning /
# torchreid `state_dict`.
STATE_KEYS = ("model", "state_dict")


def strip_prefixes(key: str, prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> str:
    """`module._orig_mod.conv1.weight` -> `conv1.weight`: any of `prefixes`, any number of times."""
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                changed = True
    return key


# -- reading ------------------------------------------------------------------------------------

def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint read safely (no pickled code runs); errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (check TEST.WEIGHT / MODEL.PRETRAIN_PATH / OUTPUT_DIR)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise pickled_objects_error(path, str(exc)) from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as exc:
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


def nested_state(raw: Mapping[str, Any], nest: tuple[str, ...] = STATE_KEYS) -> tuple[Mapping[str, Any], str | None]:
    """The state dict inside a file: under the first key of `nest` that holds a mapping (and
    that key), else `raw` itself (and None)."""
    for key in nest:
        if isinstance(raw.get(key), Mapping):
            return raw[key], key
    return raw, None


def read_weights_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict in `path` and, for a strongreid checkpoint, its `arch`/`num_classes`.

    Accepts bare state dicts (torchvision, Cadene, IBN-Net, the original's released models),
    `{"model": ...}` (strongreid), `{"state_dict": ...}` (timm/Lightning training files) and
    .safetensors. Always read on the CPU with weights_only=True: no code from a file runs.
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        return _read_safetensors(p), {}
    obj = read_checkpoint(p)
    state, nest = nested_state(obj)
    meta = {k: obj[k] for k in ("arch", "num_classes") if k in obj} if nest else {}
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{p} holds no tensors (keys: {examples(list(map(str, obj)))})")
    return tensors, meta


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"weight file {path} does not exist; check the path given as weights")
    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None


def read_checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint (or a .safetensors file from `strongreid export`) records about its model.

    Keys: `arch` (MODEL.NAME), `num_classes`, `config` (YAML text) - each None when absent -
    and `classifier_rows`, the class count its classifier weights actually hold.
    """
    path = Path(path)
    info: dict[str, Any] = {"arch": None, "num_classes": None, "config": None, "classifier_rows": None}
    if path.suffix == ".safetensors":
        meta, shapes = _safetensors_header(path)
        info["arch"] = meta.get("arch") or None
        info["config"] = meta.get("config") or None
        if meta.get("num_classes", "").isdigit():
            info["num_classes"] = int(meta["num_classes"])
    else:
        raw = read_checkpoint(path)
        state, nest = nested_state(raw)
        if nest:
            for key, kind in (("arch", str), ("num_classes", int), ("config", str)):
                info[key] = raw.get(key) if isinstance(raw.get(key), kind) else None
        shapes = {strip_prefixes(str(k)): tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    # BNNeck / plain classifier, layumi's ClassBlock, PCB's first part classifier.
    classifier = next((shapes[k] for k in ("classifier.weight", "classifier.classifier.0.weight",
                                           "classifier0.classifier.0.weight") if k in shapes), None)
    if classifier is not None and len(classifier) == 2:
        info["classifier_rows"] = int(classifier[0])
    return info


def _safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"weight file {path} does not exist; check the path given as weights")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {strip_prefixes(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None


# -- writing ------------------------------------------------------------------------------------

def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write to a temp file in the same folder, fsync, then rename.

    A crash or a full disk mid-write leaves the previous checkpoint intact.
    """
    return _atomic_write(Path(path), lambda f: torch.save(state, f))


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """A .safetensors file, written atomically like `save_checkpoint`."""
    from safetensors.torch import save

    return _atomic_write(Path(path), lambda f: f.write(save(state, metadata=metadata)))


def _atomic_write(path: Path, write: Callable[[Any], object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# -- matching a file's tensors to a model ---------------------------------------------------------

@dataclass
class LoadReport:
    """What a load did: keys loaded, skipped (classifiers), and what did not fit."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Nothing missing, unexpected or of another shape."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} classifier tensors skipped")
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({examples(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({examples(self.unexpected)})")
        if self.mismatched:
            shown = ", ".join(f"{k}: file {tuple(a)} vs model {tuple(b)}"
                              for k, a, b in self.mismatched[:3])
            parts.append(f"{len(self.mismatched)} with another shape ({shown})")
        return "; ".join(parts)


def examples(keys: list[str], n: int = 3) -> str:
    """The first `n` keys, and how many more there are."""
    more = f", ... {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _never(_: str) -> bool:
    return False


def match_state(
    own: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    target_of: Callable[[str], str | None] = lambda key: key,
    skip_unknown: Callable[[str], bool] = _never,
    skip_other_shape: Callable[[str], bool] = _never,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The tensors of `state` that fit the model whose state dict is `own`, keyed by its names,
    and the report of the rest.

    `target_of(file key)` names the model key a file key goes to (None: none). A file key with
    no place is skipped when `skip_unknown(file key)` (e.g. an ImageNet fc), else unexpected; one
    of another shape is skipped when `skip_other_shape(model key)` (a classifier sized by another
    class count: those model keys may stay unfilled too), else mismatched. BatchNorm step
    counters may be missing: files from before PyTorch 0.4.1 lack them.
    """
    report = LoadReport()
    to_load: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        target = target_of(key)
        if target is None or target not in own:
            (report.skipped if skip_unknown(key) else report.unexpected).append(key)
            continue
        if tuple(tensor.shape) != tuple(own[target].shape):
            if skip_other_shape(target):
                report.skipped.append(key)
            else:
                report.mismatched.append((key, tuple(tensor.shape), tuple(own[target].shape)))
            continue
        to_load[target] = tensor
        report.loaded.append(target)
    report.missing = [k for k in own if k not in to_load and not k.endswith("num_batches_tracked")
                      and not skip_other_shape(k)]
    return to_load, report
