"""Where and how the model runs: device, mixed precision, memory format, seeds, logging."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from yacs.config import CfgNode

from strongreid.config.components import check_at_least, check_choices, config_check
from strongreid.errors import ConfigError, StrongReIDError
from strongreid.paths import check_output_path

logger = logging.getLogger("strongreid")


def select_device(cfg_or_name: Any) -> torch.device:
    """MODEL.DEVICE ('cuda', 'cuda:N', 'cpu', 'auto') to a device; a missing GPU falls back to CPU."""
    if isinstance(cfg_or_name, torch.device):
        return cfg_or_name
    if isinstance(cfg_or_name, str):
        name, device_id = cfg_or_name, None
    else:
        name, device_id = cfg_or_name.MODEL.DEVICE, cfg_or_name.MODEL.DEVICE_ID
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            logger.warning("MODEL.DEVICE is %r but no CUDA device is available: running on the CPU", name)
            return torch.device("cpu")
        local_rank = os.environ.get("LOCAL_RANK")
        if local_rank is not None:  # torchrun: one process per GPU
            return torch.device("cuda", int(local_rank))
        if name == "cuda" and device_id not in (None, ""):
            first = str(device_id).split(",")[0].strip()
            if first.isdigit() and int(first) < torch.cuda.device_count():
                return torch.device("cuda", int(first))
        return torch.device(name)
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        logger.warning("MODEL.DEVICE is 'mps' but MPS is not available: running on the CPU")
        return torch.device("cpu")
    return torch.device(name)


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with AMX-BF16 or AVX512-BF16, where bf16 autocast is measured ~6x faster."""
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            flags = _cpu_flags()
            # oneDNN also "supports" bf16 by emulation on plain AVX-512; only native units pay off.
            return not flags or bool({"amx_bf16", "avx512_bf16"} & flags)
    except (AttributeError, RuntimeError):
        pass
    return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for MODEL.AMP on this device, or None for fp32."""
    if mode == "off":
        return None
    if device.type == "cuda":
        if mode == "bf16":
            return torch.bfloat16
        if mode == "fp16":
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        if mode == "fp16":
            logger.warning("MODEL.AMP 'fp16' is not supported on the CPU; using bf16")
            return torch.bfloat16
        if mode == "bf16":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None


def feature_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of test-time features: None (fp32) unless TEST.PRECISION is 'amp'.

    fp32 by default so that `test`, `extract`, FeatureExtractor and the exported graphs give the
    same features, and a foreign checkpoint the features its own project computes.
    """
    if cfg.TEST.PRECISION != "amp":
        return None
    return amp_dtype(cfg.MODEL.AMP, device)


def use_channels_last(mode: str, device: torch.device) -> bool:
    if mode == "on":
        return True
    if mode == "off":
        return False
    return device.type in ("cuda", "cpu")


def feature_channels_last(cfg, device: torch.device, dtype: torch.dtype | None) -> bool:
    """MODEL.CHANNELS_LAST for test-time features: 'auto' is on for CUDA and, on the CPU, only
    under autocast. fp32 CPU convolutions ran 4.4x slower in channels_last than contiguous, bf16
    ones 1.3x faster (ResNet-18 at 64 x 32, benchmarks/feature_precision.py, docs/deploy.md)."""
    mode = cfg.MODEL.CHANNELS_LAST
    if mode != "auto" or device.type != "cpu":
        return use_channels_last(mode, device)
    return dtype is not None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# A mixed-precision feature counts as sound when every row's cosine to the fp32 one reaches this:
# bf16 rounding leaves ResNet features above 0.999, the faults it guards against leave them near 0.
AUTOCAST_MIN_COSINE = 0.98


def autocast_agrees(reduced: torch.Tensor, full: torch.Tensor, min_cosine: float = AUTOCAST_MIN_COSINE) -> bool:
    """Whether features computed under autocast match the fp32 ones of the same batch.

    With torch 2.14.1 on AMX CPUs, oneDNN's bf16 3x3 stride-2 convolution of a 4 x 2 feature map
    (a 32 x 16 crop at ResNet's layer3, 64 x 32 at layer4 with last stride 2) returns wrong, zero
    or NaN values for most batch sizes; other shapes agree. A wrong feature poisons a gallery or
    a training run without any error, so each new input shape is checked once against fp32.
    """
    if reduced.shape != full.shape or not bool(torch.isfinite(reduced).all()):
        return False
    cos = torch.nn.functional.cosine_similarity(reduced.float().flatten(1), full.float().flatten(1), dim=1)
    return bool((cos >= min_cosine).all())


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _python_state_to_list(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(
            ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def setup_logging(output_dir: str | os.PathLike | None, rank: int = 0,
                  key: str = "OUTPUT_DIR") -> logging.Logger:
    """Console + OUTPUT_DIR/log.txt (appended, so test runs never erase the training log).

    A folder that cannot be made or written is a ConfigError naming `key` and the path, raised
    before the run does any work."""
    log = logging.getLogger("strongreid")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    if rank != 0:
        log.addHandler(logging.NullHandler())
        return log
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    if output_dir:
        try:
            check_output_path(output_dir, key, folder=True)
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(Path(output_dir) / "log.txt", mode="a")
        except StrongReIDError as exc:
            raise ConfigError(str(exc)) from None  # it names the key, the path and why
        except OSError as exc:
            raise ConfigError(f"{key} {output_dir}: cannot write {Path(output_dir) / 'log.txt'} "
                              f"({exc.strerror or exc}); set {key} to a folder you can write to"
                              ) from None
        fh.setFormatter(fmt)
        log.addHandler(fh)
    return log


def close_log_file() -> None:
    """Detach and close the run's OUTPUT_DIR/log.txt handler: once a command returns, its log
    file is no longer held open (an in-process caller may move or delete the folder)."""
    log = logging.getLogger("strongreid")
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler):
            log.removeHandler(h)
            h.close()


@config_check("runtime")
def check_runtime_keys(cfg: CfgNode) -> None:
    """MODEL.DEVICE, precision, memory format, BN sync, and how often a run logs, saves, tests."""
    device = cfg.MODEL.DEVICE
    if not (device in ("cuda", "cpu", "auto", "mps") or device.startswith("cuda:")):
        raise ConfigError(f"MODEL.DEVICE = {device!r}: use 'cuda', 'cuda:N', 'cpu' or 'auto'.")
    check_choices(cfg, {
        "MODEL.AMP": ("auto", "off", "bf16", "fp16"),
        "MODEL.CHANNELS_LAST": ("auto", "on", "off"),
        "MODEL.SYNC_BN": ("auto", "on", "off"),
        "SOLVER.TRIPLET_GATHER": ("auto", "on", "off"),
    })
    check_at_least(cfg, ("SOLVER.CHECKPOINT_PERIOD", "SOLVER.LOG_PERIOD", "SOLVER.EVAL_PERIOD"))
