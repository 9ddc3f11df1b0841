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
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from strongreid.errors import CheckpointError
from strongreid.paths import atomic_write

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

# Files a folder given as a checkpoint may hold, named in the error; training writes best.pt and
# last.pt, which come first.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".tar", ".ckpt", ".bin", ".safetensors")
# How many bytes are enough to tell what a file is.
_HEAD_BYTES = 512


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint read safely (no pickled code runs); errors name the file and the fix."""
    path = Path(path)
    _require_file(path, f"checkpoint {path} does not exist (check TEST.WEIGHT / MODEL.PRETRAIN_PATH / OUTPUT_DIR)")
    try:
        with warnings.catch_warnings():
            # Noise before a failure that the error explains (a TorchScript file, a pickle.dump file).
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except (MemoryError, torch.OutOfMemoryError):
        raise  # the machine's limit, not the file's fault
    except Exception as exc:
        # torch.load raises KeyError, IndexError, struct.error, UnicodeDecodeError... on stray
        # bytes: whatever it raises, the user gets one message that says what the file is.
        raise unreadable_checkpoint(path, exc) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _require_file(path: Path, missing: str) -> None:
    """`missing` for a path that is not there; a folder is named as one, with the checkpoints
    inside it (TEST.WEIGHT set to OUTPUT_DIR instead of OUTPUT_DIR/best.pt)."""
    if path.is_file():
        return
    if not path.is_dir():
        raise CheckpointError(missing)
    try:
        names = sorted(p.name for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
    except OSError:
        names = []
    names.sort(key=lambda name: name not in ("best.pt", "last.pt"))  # stable: the rest stay sorted
    if not names:
        raise CheckpointError(
            f"checkpoint {path} is a folder, not a file, and holds no checkpoint "
            f"({', '.join(CHECKPOINT_SUFFIXES)}): give the path of the file itself (training "
            "writes OUTPUT_DIR/best.pt and last.pt)"
        )
    raise CheckpointError(
        f"checkpoint {path} is a folder, not a file: give one checkpoint inside it, e.g. "
        f"{path / names[0]} (it holds {examples(names, 5)})"
    )


def unreadable_checkpoint(path: Path, exc: BaseException) -> CheckpointError:
    """The message for a file torch.load failed on: what the file is, judged from its first
    bytes, and what to do about it.

    torch.load's own messages describe the failure of its unpickler ("Unsupported operand 60",
    "KeyError: 101"), not the file: a download error page, a git-LFS pointer and a truncated
    checkpoint would otherwise all read alike.
    """
    reason = _first_line(exc)
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
        size = path.stat().st_size
    except OSError as err:
        return CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}; check that the "
                               "file is readable (permissions, a network drive that went away)")
    kind = _sniff(path, head, size)
    if kind in ("torch-zip", "torch-pickle") and isinstance(exc, pickle.UnpicklingError) \
            and "GLOBAL" in str(exc):
        # A genuine PyTorch file whose pickle names a class: weights_only=True refused to run it.
        return pickled_objects_error(path, str(exc))
    if kind in ("zip", "torch-zip"):
        return _zip_error(path, reason)
    if kind == "torch-pickle" and (isinstance(exc, EOFError) or "EOF" in reason):
        what = "a PyTorch checkpoint (the format before PyTorch 1.6) that is truncated"
        return CheckpointError(f"cannot read checkpoint {path}: it is {what} ({reason}): a download or "
                               "copy was cut short; download or copy it again")
    if kind == "torch-pickle":
        return CheckpointError(f"cannot read checkpoint {path}: it is a PyTorch checkpoint (the format "
                               f"before PyTorch 1.6) that torch.load failed on ({reason}); it may be "
                               "corrupt: download or copy it again")
    if kind == "text":
        first = next((line.strip() for line in head.decode("utf-8", "replace").splitlines() if line.strip()), "")
        shown = first[:60] + ("..." if len(first) > 60 else "")
        return CheckpointError(f"cannot read checkpoint {path}: it is a text file (it starts {shown!r}), "
                               "not a checkpoint: give the .pt/.pth file written by training "
                               "(OUTPUT_DIR/best.pt) or downloaded from a model zoo")
    if kind == "unknown":
        start = " ".join(f"{b:02x}" for b in head[:8])
        return CheckpointError(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint (it starts "
                               f"with bytes {start}; torch.load: {reason}): give a file written by "
                               "torch.save, such as training's OUTPUT_DIR/best.pt")
    if kind == "safetensors":
        fix = (f"it is a safetensors file: rename it to {path.stem}.safetensors, as strongreid tells safetensors files by their "
               "suffix (test, extract, export and MODEL.PRETRAIN_PATH read them; they hold weights "
               "only, so training cannot resume from one)")
    else:
        fix = _KNOWN_KINDS[kind]
    return CheckpointError(f"cannot read checkpoint {path}: {fix}")


# What a file of a recognised kind is, and what to do: after "cannot read checkpoint PATH: ".
_KNOWN_KINDS = {
    "empty": "the file is empty (0 bytes): a download or save was cut short; download or copy it again",
    "lfs": ("it is a git-LFS pointer (a small text file that stands for the real one): the checkpoint "
            "itself was never downloaded. Run `git lfs pull` in the repository it came from, or "
            "download the file from the model's page"),
    "html": ("it is an HTML/XML page, not a checkpoint (a download that saved an error or login "
             "page?): download the file again from a direct link and check its size"),
    "onnx": ("it is an ONNX model, not a PyTorch checkpoint: strongreid loads models from their "
             ".pt checkpoint; give the checkpoint it was exported from (e.g. OUTPUT_DIR/best.pt)"),
    "torchscript": ("it is a TorchScript export, not a training checkpoint, and its weights cannot "
                    "be read safely: give the checkpoint it was exported from (e.g. OUTPUT_DIR/best.pt)"),
    "jpeg": "it is a JPEG image, not a checkpoint: check that the weights argument names the model file",
    "png": "it is a PNG image, not a checkpoint: check that the weights argument names the model file",
    "gzip": ("it is gzip-compressed: decompress it (gunzip, or tar xzf for a .tar.gz) and give the "
             "checkpoint inside"),
    "pickle": ("it is a Python pickle written by pickle.dump, not by torch.save: strongreid reads "
               "only torch.save files, with weights_only=True so that no code from a file runs. "
               "Load it in the project that wrote it and write it again with "
               "`torch.save(model.state_dict(), PATH)`"),
}


def _sniff(path: Path, head: bytes, size: int) -> str:
    """What a file is, from its first bytes: a key of _KNOWN_KINDS, "safetensors", "zip",
    "torch-zip", "torch-pickle", "text" or "unknown"."""
    if size == 0:
        return "empty"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip_kind(path)
    if head[:1] == b"\x80":
        # torch.save's format before PyTorch 1.6 opens with its magic number pickled with
        # protocol 2 (LONG1, 10 bytes); any other pickle came from pickle.dump.
        return "torch-pickle" if head[1:4] == b"\x02\x8a\x0a" else "pickle"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    # safetensors: a little-endian u64 header length, then the JSON header.
    if len(head) > 8 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    # ONNX: a protobuf ModelProto, whose first field is ir_version (tag 0x08, a small varint)
    # followed by producer_name, graph or opset_import...
    if len(head) > 2 and head[0] == 0x08 and 0 < head[1] < 0x80 and head[2] in b"\x12\x1a\x22\x28\x32\x3a\x42":
        return "onnx"
    text = _as_text(head)
    if text is None:
        return "onnx" if path.suffix == ".onnx" else "unknown"
    if text.startswith("version https://git-lfs"):
        return "lfs"
    lowered = text.lstrip("\ufeff \t\r\n").lower()
    if lowered.startswith(("<!doctype", "<html", "<?xml", "<head", "<body")) or "<html" in lowered:
        return "html"
    return "text"


def _as_text(head: bytes) -> str | None:
    """`head` as text when it is printable UTF-8 (a multi-byte character cut at the end allowed)."""
    for cut in range(4):
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return None
    return text if all(c.isprintable() or c in "\t\n\r\f\v" for c in text) else None


def _zip_kind(path: Path) -> str:
    """torch.save's zip (a data.pkl in one folder), a TorchScript export (code/ and
    constants.pkl besides), or some other zip archive, which _zip_error names."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "zip"  # unreadable: _zip_error says so
    if any(name.endswith("/constants.pkl") for name in names):
        return "torchscript"
    return "torch-zip" if any(name.endswith("/data.pkl") for name in names) else "zip"


def _zip_error(path: Path, reason: str) -> CheckpointError:
    """A zip archive torch.load failed on: cut short, corrupt, not torch.save's, or an
    unexpected failure (the reason shown as is)."""
    prefix = f"cannot read checkpoint {path}: it is a zip archive"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            # Reads every entry, only on this error path: a CRC mismatch means a corrupt copy.
            bad = archive.testzip() if any(n.endswith("/data.pkl") for n in names) else None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return CheckpointError(f"{prefix} (the format of torch.save since PyTorch 1.6) that is truncated "
                               "or corrupt (its index at the end cannot be read): a download or copy was "
                               "cut short; download or copy it again")
    if bad is not None:
        return CheckpointError(f"{prefix} (the format of torch.save since PyTorch 1.6) whose entry {bad} is "
                               "corrupt: download or copy it again")
    if any(n.endswith("/data.pkl") for n in names):
        return CheckpointError(f"cannot read checkpoint {path}: torch.load failed on this PyTorch "
                               f"checkpoint ({reason}); it may be corrupt or written by a newer PyTorch "
                               f"than this one ({torch.__version__})")
    if names and all(n.endswith(".npy") for n in names):
        return CheckpointError(f"cannot read checkpoint {path}: it is a NumPy .npz archive (features "
                               "written by `strongreid extract`?), not a checkpoint")
    return CheckpointError(f"{prefix} ({examples(names) or 'empty'}), not a PyTorch checkpoint: unzip it "
                           "and give the checkpoint inside")


def _first_line(exc: BaseException) -> str:
    """The gist of a torch.load exception, for a message: its type and first sentence.

    The weights_only errors open with a paragraph on PyTorch 2.6's new default; the cause
    follows "WeightsUnpickler error:".
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    line = found.group(1) if found else next((s.strip() for s in text.splitlines() if s.strip()), "")
    line = line.split(". ")[0].strip().rstrip(".")
    if len(line) > 160:
        line = line[:157] + "..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


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

    _require_file(path, f"weight file {path} does not exist; check the path given as weights")
    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable_safetensors(path, exc) from None


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

    _require_file(path, f"weight file {path} does not exist; check the path given as weights")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {strip_prefixes(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable_safetensors(path, exc) from None


def _unreadable_safetensors(path: Path, exc: BaseException) -> CheckpointError:
    """A .safetensors file that safetensors could not read: when it is another kind of file (a
    renamed checkpoint, an error page), say which."""
    try:
        with open(path, "rb") as f:
            kind = _sniff(path, f.read(_HEAD_BYTES), path.stat().st_size)
    except OSError:
        kind = "safetensors"
    if kind in ("torch-zip", "torch-pickle"):
        return CheckpointError(f"{path} is a PyTorch checkpoint, not a safetensors file: rename it to "
                               f"{path.stem}.pt (strongreid tells safetensors files by their suffix)")
    if kind != "safetensors":
        return unreadable_checkpoint(path, exc)
    return CheckpointError(f"cannot read {path} as safetensors: {exc}")


# -- writing ------------------------------------------------------------------------------------

def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write to a temp file in the same folder, fsync, then rename.

    A crash or a full disk mid-write leaves the previous checkpoint intact.
    """
    return atomic_write(path, lambda f: torch.save(state, f))


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """A .safetensors file, written atomically like `save_checkpoint`."""
    from safetensors.torch import save

    return atomic_write(path, lambda f: f.write(save(state, metadata=metadata)))


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
