"""Load, coerce and validate configs.

yacs alone type-checks strictly and late: an unquoted `yes` in YAML is a bool and crashes the
original's merge, a typo in a key gives a bare KeyError, impossible combinations surface as
NameError mid-training. Here every key and value is checked before any data or model is touched,
and every problem ends in one ConfigError naming the key, the value and what to write instead.
"""

from __future__ import annotations

import ast
import difflib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from yacs.config import CfgNode

from strongreid.config.defaults import _C
from strongreid.config.loss_zoo import ID_LOSS_TYPES, check_losses
from strongreid.errors import ConfigError

logger = logging.getLogger("strongreid")

# Flags the original spells as strings. YAML 1.1 loads unquoted yes/no/on/off as booleans,
# which the original rejects with a yacs type error; we map them back to its spelling.
FLAG_KEYS: dict[str, tuple[str, str]] = {
    "MODEL.IF_WITH_CENTER": ("yes", "no"),
    "MODEL.IF_LABELSMOOTH": ("on", "off"),
    "MODEL.NECK": ("bnneck", "no"),
    "MODEL.CHANNELS_LAST": ("on", "off"),
    "MODEL.SYNC_BN": ("on", "off"),
    "SOLVER.TRIPLET_GATHER": ("on", "off"),
    "TEST.RE_RANKING": ("yes", "no"),
    "TEST.FEAT_NORM": ("yes", "no"),
}

_TRUE_WORDS = {"yes", "on", "true", "1", "y"}
_FALSE_WORDS = {"no", "off", "false", "0", "n"}

ENUMS: dict[str, tuple[str, ...]] = {
    "MODEL.PRETRAIN_CHOICE": ("imagenet", "self", "none"),
    "MODEL.NECK": ("bnneck", "no"),
    "MODEL.IF_WITH_CENTER": ("yes", "no"),
    "MODEL.IF_LABELSMOOTH": ("on", "off"),
    # loss zoo; MODEL.METRIC_LOSS_TYPE (comma-separated terms) is checked in config/loss_zoo.py
    "MODEL.ID_LOSS_TYPE": ID_LOSS_TYPES,
    "SOLVER.TRIPLET_MINER": ("batch_hard", "multi_similarity"),
    "SOLVER.CIRCLE_REDUCTION": ("anchor", "batch"),
    "SOLVER.INSTANCE_TARGET": ("image", "layumi"),
    "MODEL.POOLING": ("avg", "gem"),
    "MODEL.HEAD": ("baseline", "layumi", "pcb", "torchreid"),
    "SOLVER.WA": ("off", "ema", "swa"),
    "MODEL.AMP": ("auto", "off", "bf16", "fp16"),
    "MODEL.CHANNELS_LAST": ("auto", "on", "off"),
    "MODEL.SYNC_BN": ("auto", "on", "off"),
    "SOLVER.TRIPLET_GATHER": ("auto", "on", "off"),
    "INPUT.RE_FILL": ("original", "zero", "random"),
    "INPUT.INTERPOLATION": ("bilinear", "bicubic"),
    "MODEL.HEAD_PRECISION": ("amp", "fp32"),
    "DATASETS.CUHK03_KIND": ("labeled", "detected"),
    "DATALOADER.SAMPLER": ("softmax", "triplet", "softmax_triplet"),
    "DATALOADER.CHECK_IMAGES": ("header", "full", "off"),
    "DATALOADER.JPEG_DECODER": ("auto", "pil", "torchvision", "simplejpeg", "turbojpeg"),
    "DATALOADER.DATA_PATH": ("pil", "device"),
    "SOLVER.OPTIMIZER_NAME": (
        "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam", "Adadelta",
    ),
    "SOLVER.WARMUP_METHOD": ("linear", "constant"),
    "SOLVER.SCHED": ("multistep", "cosine"),
    "SOLVER.LR_STEP_UNIT": ("epoch", "iter", "warmup"),
    "TEST.RE_RANKING": ("yes", "no"),
    "TEST.NECK_FEAT": ("after", "before"),
    "TEST.FEAT_NORM": ("yes", "no"),
    "TEST.METRIC": ("euclidean", "cosine"),
    "TEST.AP": ("plain", "trapezoid"),
    "TEST.UNMATCHED": ("skip", "fail"),
    "TEST.PRECISION": ("fp32", "amp"),
    "DATASETS.VALIDATION": ("off", "first"),
}

# Keys the original defines but never reads. Old ymls set them; we accept and ignore them.
DEAD_KEYS = {
    "SOLVER.CLUSTER_MARGIN",
    "SOLVER.RANGE_K",
    "SOLVER.RANGE_MARGIN",
    "SOLVER.RANGE_ALPHA",
    "SOLVER.RANGE_BETA",
    "SOLVER.RANGE_LOSS_WEIGHT",
}

NULLABLE_KEYS = {"SOLVER.MARGIN"}

_dead_seen: list[str] = []


def get_cfg_defaults() -> CfgNode:
    """A mutable copy of the defaults."""
    return _C.clone()


def flag(value: Any) -> bool:
    """Truth of an upstream string flag ('yes'/'no', 'on'/'off', 'bnneck'/'no') or a bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE_WORDS or text == "bnneck":
        return True
    if text in _FALSE_WORDS:
        return False
    raise ConfigError(f"cannot read {value!r} as a yes/no flag")


def dataset_names(cfg: CfgNode) -> list[str]:
    """DATASETS.NAMES as a list, whether the yml gave a string, "('a')", "a,b" or a list."""
    raw = cfg.DATASETS.NAMES
    items: Iterable[Any] = raw if isinstance(raw, (list, tuple)) else [raw]
    names: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip().strip("()[]").strip().strip("'\"").strip()
            if part:
                names.append(part)
    return names


def _all_keys(node: CfgNode, prefix: str = "") -> Iterator[str]:
    for k, v in node.items():
        full = f"{prefix}{k}"
        if isinstance(v, CfgNode):
            yield from _all_keys(v, full + ".")
        else:
            yield full


_VALID_KEYS = frozenset(_all_keys(_C))


def _unknown_key_error(key: str, source: str) -> ConfigError:
    # Compare against full names and against last components, so both `SOLVER.BASE_LRR` and a
    # key put under the wrong section (`MODEL.BASE_LR`) get a useful suggestion.
    close = difflib.get_close_matches(key, _VALID_KEYS, n=3, cutoff=0.6)
    leaf = key.rsplit(".", 1)[-1]
    for k in sorted(_VALID_KEYS):
        if k.rsplit(".", 1)[-1] == leaf and k not in close:
            close.append(k)
    if not close:
        close = difflib.get_close_matches(key, _VALID_KEYS, n=3, cutoff=0.3)
    hint = f" Closest valid keys: {', '.join(close[:4])}." if close else ""
    return ConfigError(f"unknown config key {key!r} ({source}).{hint}")


def _parse_cli_value(text: str) -> Any:
    # Same as yacs: Python literals, anything else is a plain string.
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{key} = {value!r} ({source}): expected {expected}.")

    if key == "DATASETS.NAMES":
        if isinstance(value, (list, tuple)):
            if not all(isinstance(v, str) for v in value):
                raise bad("a dataset name or a list of names")
            return list(value)
        if isinstance(value, str):
            return value
        raise bad("a dataset name or a list of names")

    if key == "MODEL.TIMM_KWARGS" and isinstance(value, dict):
        # Stored as YAML text: yacs values are scalars and lists.
        return yaml.safe_dump(value, default_flow_style=True).strip()
    if key == "MODEL.METRIC_LOSS_TYPE" and isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))  # a YAML list of terms combines them

    if key in NULLABLE_KEYS and (value is None or (isinstance(value, str)
                                                   and value.strip().lower() in {"none", "null", "~", ""})):
        return None

    if key in FLAG_KEYS:
        true_word, false_word = FLAG_KEYS[key]
        if isinstance(value, bool):
            return true_word if value else false_word
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ENUMS.get(key, ()):
                return text
            if text in _TRUE_WORDS:
                return true_word
            if text in _FALSE_WORDS:
                return false_word
        allowed = ENUMS.get(key, (true_word, false_word))
        raise bad("one of " + ", ".join(repr(a) for a in allowed) + " (or a YAML boolean)")

    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad("true or false")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise bad("an integer")
    if isinstance(default, float) or (key in NULLABLE_KEYS and default is not None):
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number" + (" or None" if key in NULLABLE_KEYS else ""))
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # e.g. DEVICE_ID: 0 unquoted in YAML
            return str(value)
        raise bad("a string")
    if isinstance(default, (list, tuple)):
        if isinstance(value, str):
            parsed = _parse_cli_value(value)
            if isinstance(parsed, (list, tuple)):
                value = parsed
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        if default and all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in default):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise bad("a list of numbers")
        return type(default)(value)
    return value


def _set(cfg: CfgNode, key: str, value: Any, source: str) -> None:
    if key not in _VALID_KEYS:
        raise _unknown_key_error(key, source)
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = _coerce(key, value, _lookup(_C, key), source)
    if key in DEAD_KEYS:
        _dead_seen.append(key)


def _warn_dead_keys() -> None:
    new = list(dict.fromkeys(_dead_seen))
    _dead_seen.clear()
    if new:
        logger.warning(
            "config keys %s are unused (dead in reid-strong-baseline too) and have no effect",
            ", ".join(new),
        )


def _lookup(node: CfgNode, key: str) -> Any:
    for part in key.split("."):
        node = node[part]
    return node


def _flatten(d: dict, source: str, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        full = f"{prefix}{k}"
        if isinstance(v, dict):
            if full in _VALID_KEYS:  # a value that happens to be a mapping
                yield full, v
            else:
                if f"{full}." not in {key[: len(full) + 1] for key in _VALID_KEYS}:
                    raise _unknown_key_error(full, source)
                yield from _flatten(v, source, full + ".")
        else:
            yield full, v


def _read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist (check the path given to --config)")
    try:
        with p.open() as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


# Where a config remembers the keys its yml file and command line set (outside the tree, so no
# dump or validation sees it; clone() copies it). A foreign checkpoint's guesses yield to them.
_EXPLICIT = "__explicit_keys__"


def explicit_keys(cfg: CfgNode) -> frozenset[str]:
    """The dotted keys a config file or KEY VALUE override set on `cfg` (not the defaults)."""
    return cfg.__dict__.get(_EXPLICIT, frozenset())


def _mark_explicit(cfg: CfgNode, keys: Iterable[str]) -> None:
    cfg.__dict__[_EXPLICIT] = explicit_keys(cfg) | frozenset(keys)


def merge_file(cfg: CfgNode, path: str) -> None:
    data = _read_yaml(path)
    for key, value in _flatten(data, f"in {path}"):
        _set(cfg, key, value, f"in {path}")
        _mark_explicit(cfg, [key])


def merge_opts(cfg: CfgNode, opts: list[str]) -> None:
    if len(opts) % 2:
        raise ConfigError(
            f"overrides come in KEY VALUE pairs; {opts[-1]!r} has no value "
            "(e.g. SOLVER.MAX_EPOCHS 10)"
        )
    for key, text in zip(opts[0::2], opts[1::2]):
        _set(cfg, key, _parse_cli_value(text), "on the command line")
        _mark_explicit(cfg, [key])


def validate(cfg: CfgNode) -> None:
    """Reject bad values and impossible combinations with one clear message."""
    for key, allowed in ENUMS.items():
        value = _lookup(cfg, key)
        if value not in allowed:
            raise ConfigError(
                f"{key} = {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}."
            )

    device = cfg.MODEL.DEVICE
    if not (device in ("cuda", "cpu", "auto", "mps") or device.startswith("cuda:")):
        raise ConfigError(f"MODEL.DEVICE = {device!r}: use 'cuda', 'cuda:N', 'cpu' or 'auto'.")

    def check_size(key: str) -> None:
        v = _lookup(cfg, key)
        if len(v) != 2 or any(int(x) <= 0 for x in v):
            raise ConfigError(f"{key} = {list(v)}: expected [height, width] with positive values.")

    check_size("INPUT.SIZE_TRAIN")
    check_size("INPUT.SIZE_TEST")
    for key in ("INPUT.PIXEL_MEAN", "INPUT.PIXEL_STD"):
        if len(_lookup(cfg, key)) != 3:
            raise ConfigError(f"{key} needs three values (R, G, B).")
    if any(s <= 0 for s in cfg.INPUT.PIXEL_STD):
        raise ConfigError("INPUT.PIXEL_STD values must be positive.")
    for key in ("INPUT.PROB", "INPUT.RE_PROB", "TEST.RE_RANKING_LAMBDA"):
        v = _lookup(cfg, key)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{key} = {v} must lie in [0, 1].")
    if not 0 < cfg.INPUT.RE_SL <= cfg.INPUT.RE_SH < 1:
        raise ConfigError(
            f"INPUT.RE_SL = {cfg.INPUT.RE_SL} and INPUT.RE_SH = {cfg.INPUT.RE_SH}: "
            "need 0 < RE_SL <= RE_SH < 1."
        )
    if not 0 < cfg.INPUT.RE_R1 <= 1:
        raise ConfigError(f"INPUT.RE_R1 = {cfg.INPUT.RE_R1} must lie in (0, 1].")
    if cfg.INPUT.PADDING < 0:
        raise ConfigError(f"INPUT.PADDING = {cfg.INPUT.PADDING} must be >= 0.")

    names = dataset_names(cfg)
    if not names:
        raise ConfigError("DATASETS.NAMES is empty; name at least one dataset, e.g. market1501.")
    _check_dataset_names(names + ([cfg.DATASETS.TEST_NAME] if cfg.DATASETS.TEST_NAME else []))

    for key in (
        "SOLVER.MAX_EPOCHS", "SOLVER.CHECKPOINT_PERIOD", "SOLVER.LOG_PERIOD", "SOLVER.EVAL_PERIOD",
        "SOLVER.IMS_PER_BATCH", "TEST.IMS_PER_BATCH", "DATALOADER.NUM_INSTANCE", "TEST.MAX_RANK",
        "TEST.RE_RANKING_K1", "TEST.RE_RANKING_K2", "TEST.QE_K", "SOLVER.LR_REFERENCE_BATCH",
    ):
        if _lookup(cfg, key) < 1:
            raise ConfigError(f"{key} = {_lookup(cfg, key)} must be at least 1.")
    if cfg.DATALOADER.NUM_WORKERS < 0:
        raise ConfigError(f"DATALOADER.NUM_WORKERS = {cfg.DATALOADER.NUM_WORKERS} must be >= 0.")
    if cfg.SOLVER.BASE_LR <= 0:
        raise ConfigError(f"SOLVER.BASE_LR = {cfg.SOLVER.BASE_LR} must be positive.")
    if cfg.MODEL.CLASSIFIER_INIT_STD <= 0:
        raise ConfigError(
            f"MODEL.CLASSIFIER_INIT_STD = {cfg.MODEL.CLASSIFIER_INIT_STD} must be positive "
            "(0.001 the original, 0.01 fast-reid)."
        )
    if cfg.SOLVER.MARGIN is not None and cfg.SOLVER.MARGIN < 0:
        raise ConfigError(f"SOLVER.MARGIN = {cfg.SOLVER.MARGIN} must be >= 0 (or None for soft margin).")
    if cfg.SOLVER.WARMUP_ITERS < 0:
        raise ConfigError(f"SOLVER.WARMUP_ITERS = {cfg.SOLVER.WARMUP_ITERS} must be >= 0 (epochs).")
    steps = list(cfg.SOLVER.STEPS)
    if steps != sorted(steps):
        raise ConfigError(f"SOLVER.STEPS = {steps} must be increasing epoch numbers.")

    check_losses(cfg)  # loss zoo: terms, combinations, weights (config/loss_zoo.py)
    sampler = cfg.DATALOADER.SAMPLER
    if sampler != "softmax":
        k = cfg.DATALOADER.NUM_INSTANCE
        if cfg.SOLVER.IMS_PER_BATCH % k:
            raise ConfigError(
                f"SOLVER.IMS_PER_BATCH = {cfg.SOLVER.IMS_PER_BATCH} is not divisible by "
                f"DATALOADER.NUM_INSTANCE = {k}: the P x K sampler needs whole identities per "
                f"batch (e.g. IMS_PER_BATCH {max(k, cfg.SOLVER.IMS_PER_BATCH // k * k)})."
            )
        if cfg.SOLVER.IMS_PER_BATCH // k < 2:
            raise ConfigError(
                f"SOLVER.IMS_PER_BATCH / DATALOADER.NUM_INSTANCE = {cfg.SOLVER.IMS_PER_BATCH // k}: "
                "triplet mining needs at least 2 identities per batch."
            )
    _check_layumi_keys(cfg)
    if cfg.MODEL.PRETRAIN_CHOICE == "self" and not cfg.MODEL.PRETRAIN_PATH:
        raise ConfigError("MODEL.PRETRAIN_CHOICE 'self' needs MODEL.PRETRAIN_PATH (a strongreid checkpoint).")
    _check_model_name(cfg.MODEL.NAME)
    _check_layumi_head(cfg)


def timm_kwargs(cfg: CfgNode) -> dict[str, Any]:
    """MODEL.TIMM_KWARGS as a dict (lists become tuples, as timm's img_size wants)."""
    text = cfg.MODEL.TIMM_KWARGS
    if not str(text).strip():
        return {}
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"MODEL.TIMM_KWARGS = {text!r} is not a YAML mapping: {exc}") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(
            f"MODEL.TIMM_KWARGS = {text!r}: give a mapping of timm keyword arguments, e.g. "
            "'{drop_path_rate: 0.2, img_size: [256, 128]}'."
        )
    return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}


def _check_layumi_head(cfg: CfgNode) -> None:
    # layumi heads / PCB (modeling/layumi.py) and the layumi / fast-reid training options
    m = cfg.MODEL
    if m.LINEAR_NUM < 0:
        raise ConfigError(f"MODEL.LINEAR_NUM = {m.LINEAR_NUM} must be >= 0 (0: no embedding Linear).")
    if m.PCB_LINEAR_NUM < 0:
        raise ConfigError(f"MODEL.PCB_LINEAR_NUM = {m.PCB_LINEAR_NUM} must be >= 0.")
    if not 0.0 <= m.DROPRATE < 1.0:
        raise ConfigError(f"MODEL.DROPRATE = {m.DROPRATE} must lie in [0, 1).")
    if m.PCB_PARTS < 1:
        raise ConfigError(f"MODEL.PCB_PARTS = {m.PCB_PARTS} must be at least 1 (PCB uses 6).")
    timm_kwargs(cfg)
    if len(m.NL_LAYERS) != 4 or any(int(n) < 0 for n in m.NL_LAYERS) or m.NL_INTER_CHANNELS < 0:
        raise ConfigError(
            f"MODEL.NL_LAYERS = {list(m.NL_LAYERS)} / NL_INTER_CHANNELS = {m.NL_INTER_CHANNELS}: give "
            "4 block counts >= 0 (AGW: [0, 2, 3, 0]) and a width >= 0."
        )
    if cfg.MODEL.TIMM_KWARGS.strip() and not cfg.MODEL.NAME.startswith("timm:"):
        raise ConfigError(
            f"MODEL.TIMM_KWARGS applies to timm backbones ('timm:<name>'), not to MODEL.NAME "
            f"{cfg.MODEL.NAME!r}; clear it or name the timm model."
        )
    if not 0.0 <= cfg.INPUT.AUTOAUG_PROB <= 1.0:
        raise ConfigError(f"INPUT.AUTOAUG_PROB = {cfg.INPUT.AUTOAUG_PROB} must lie in [0, 1].")
    if cfg.DATALOADER.DATA_PATH == "device" and (cfg.INPUT.COLOR_JITTER or cfg.INPUT.AUTOAUG_PROB > 0):
        raise ConfigError(
            "INPUT.COLOR_JITTER / INPUT.AUTOAUG_PROB run on PIL images; DATALOADER.DATA_PATH 'device' "
            "augments decoded batches without them: use DATA_PATH 'pil' or turn them off."
        )
    if m.HEAD_PRECISION == "fp32" and m.HEAD != "baseline":
        raise ConfigError(
            f"MODEL.HEAD_PRECISION 'fp32' applies to MODEL.HEAD 'baseline' (pooling, BNNeck and "
            f"classifier); MODEL.HEAD is {m.HEAD!r}: set HEAD_PRECISION 'amp'."
        )
    s = cfg.SOLVER
    if s.BACKBONE_LR_FACTOR < 0:
        raise ConfigError(f"SOLVER.BACKBONE_LR_FACTOR = {s.BACKBONE_LR_FACTOR} must be >= 0 (layumi: 0.1).")
    if s.NESTEROV and s.OPTIMIZER_NAME != "SGD":
        raise ConfigError(
            f"SOLVER.NESTEROV applies to SGD only; SOLVER.OPTIMIZER_NAME is {s.OPTIMIZER_NAME!r}."
        )
    for key in ("FREEZE_BACKBONE_EPOCHS", "COSINE_DELAY_EPOCHS"):
        if s[key] < 0:
            raise ConfigError(f"SOLVER.{key} = {s[key]} must be >= 0 (epochs).")
    if not 0.0 <= s.WA_START < 1.0:
        raise ConfigError(f"SOLVER.WA_START = {s.WA_START} must lie in [0, 1) (a fraction of MAX_EPOCHS).")
    if not 0.0 < s.WA_EMA_DECAY < 1.0:
        raise ConfigError(f"SOLVER.WA_EMA_DECAY = {s.WA_EMA_DECAY} must lie in (0, 1) (layumi: 0.996).")


def _check_layumi_keys(cfg: CfgNode) -> None:
    # The keys of docs/coming-from-layumi.md.
    if cfg.DATASETS.VEHICLEID_TEST_SIZE not in (800, 1600, 2400):
        raise ConfigError(
            f"DATASETS.VEHICLEID_TEST_SIZE = {cfg.DATASETS.VEHICLEID_TEST_SIZE} is not allowed; "
            "choose one of 800, 1600, 2400 (the official VehicleID test lists)."
        )
    scales = list(cfg.TEST.MULTI_SCALE)
    if not scales or any(float(s) <= 0 for s in scales):
        raise ConfigError(
            f"TEST.MULTI_SCALE = {scales}: give one or more positive scales, e.g. [1.0, 1.1] "
            "(layumi's --ms 1,1.1); [1.0] tests at INPUT.SIZE_TEST only."
        )


def _check_dataset_names(names: list[str]) -> None:
    try:
        from strongreid.data.datasets import DATASETS
    except ImportError:  # the registry is optional for printing a config
        return
    for name in names:
        if name not in DATASETS:
            close = difflib.get_close_matches(name, DATASETS.names(), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"DATASETS.NAMES: unknown dataset {name!r}.{hint} "
                f"Known: {', '.join(DATASETS.names())}."
            )


def _check_model_name(name: str) -> None:
    if name.startswith("timm:"):
        return
    try:
        from strongreid.modeling.backbones import BACKBONES
    except ImportError:
        return
    if name not in BACKBONES:
        close = difflib.get_close_matches(name, BACKBONES.names(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"MODEL.NAME = {name!r} is not a known backbone.{hint} Known: "
            f"{', '.join(BACKBONES.names())}, or any timm model as 'timm:<name>'."
        )


def load_config(config_file: str | None = None, opts: list[str] | None = None) -> CfgNode:
    """Defaults <- yml <- KEY VALUE overrides, validated and frozen."""
    cfg = get_cfg_defaults()
    if config_file:
        merge_file(cfg, config_file)
    if opts:
        merge_opts(cfg, list(opts))
    _warn_dead_keys()
    if not cfg.OUTPUT_DIR:
        cfg.OUTPUT_DIR = os.path.join("runs", "default")
    cfg.OUTPUT_DIR = os.path.expanduser(cfg.OUTPUT_DIR)
    cfg.MODEL.PRETRAIN_PATH = os.path.expanduser(cfg.MODEL.PRETRAIN_PATH)
    cfg.TEST.WEIGHT = os.path.expanduser(cfg.TEST.WEIGHT)
    validate(cfg)
    cfg.freeze()
    return cfg


def dump_config(cfg: CfgNode) -> str:
    """YAML of the config, without the dead upstream keys (they mean nothing)."""
    out = cfg.clone()
    out.defrost()
    for key in DEAD_KEYS:
        section, leaf = key.split(".")
        out[section].pop(leaf, None)
    return out.dump(sort_keys=False)


def save_config(cfg: CfgNode, path: str | os.PathLike) -> None:
    """Write the merged config atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_config(cfg))
    os.replace(tmp, path)


def with_overrides(cfg: CfgNode, overrides: dict[str, Any], source: str) -> CfgNode:
    """A validated, frozen copy of `cfg` with dotted keys set (e.g. what a foreign checkpoint
    implies about the model); `source` names who asked, for error messages."""
    out = cfg.clone()
    out.defrost()
    for key, value in overrides.items():
        _set(out, key, value, source)
    validate(out)
    out.freeze()
    return out


def with_user_options(cfg: CfgNode, opts: Sequence[str] | Mapping[str, Any]) -> CfgNode:
    """`cfg` with overrides given as a user gives them: a flat KEY VALUE list (the command line's
    text form) or a {KEY: value} mapping of Python values; validated, frozen, and counted as set
    by the user (so a checkpoint format's guesses give way to them)."""
    out = cfg.clone()
    out.defrost()
    if isinstance(opts, Mapping):
        for key, value in opts.items():
            _set(out, str(key), value, "in opts")
            _mark_explicit(out, [str(key)])
    else:
        if isinstance(opts, str):
            raise ConfigError(f"opts must be a list of KEY VALUE strings or a mapping, got the string {opts!r}")
        merge_opts(out, [str(v) for v in opts])
    _warn_dead_keys()
    validate(out)
    out.freeze()
    return out


def config_from_text(text: str) -> CfgNode:
    """Rebuild a config saved inside a checkpoint (YAML text), validated."""
    cfg = get_cfg_defaults()
    data = yaml.safe_load(text) or {}
    source = "in the checkpoint's config"
    for key, value in _flatten(data, source):
        _set(cfg, key, value, source)
    validate(cfg)
    cfg.freeze()
    return cfg
