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

from strongreid.config import components
from strongreid.config.defaults import _C
from strongreid.errors import ConfigError
from strongreid.paths import atomic_write_text

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

# Flags that take a third value besides their two spellings (checked by their owners).
FLAG_CHOICES: dict[str, tuple[str, ...]] = {
    "MODEL.CHANNELS_LAST": ("auto", "on", "off"),
    "MODEL.SYNC_BN": ("auto", "on", "off"),
    "SOLVER.TRIPLET_GATHER": ("auto", "on", "off"),
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


_valid_keys_cache: dict[int, frozenset[str]] = {}


def valid_keys() -> frozenset[str]:
    """Every key of the tree, including those components added (`components.add_defaults`)."""
    version = components.keys_version[0]
    if version not in _valid_keys_cache:
        _valid_keys_cache.clear()
        _valid_keys_cache[version] = frozenset(_all_keys(_C))
    return _valid_keys_cache[version]


def _unknown_key_error(key: str, source: str) -> ConfigError:
    # Compare against full names and against last components, so both `SOLVER.BASE_LRR` and a
    # key put under the wrong section (`MODEL.BASE_LR`) get a useful suggestion.
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    leaf = key.rsplit(".", 1)[-1]
    for k in sorted(keys):
        if k.rsplit(".", 1)[-1] == leaf and k not in close:
            close.append(k)
    if not close:
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.3)
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
            if text in FLAG_CHOICES.get(key, (true_word, false_word)):
                return text
            if text in _TRUE_WORDS:
                return true_word
            if text in _FALSE_WORDS:
                return false_word
        allowed = FLAG_CHOICES.get(key, (true_word, false_word))
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
    if key not in valid_keys():
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


def _is_section(name: str) -> bool:
    """Whether `name` holds keys (MODEL, SOLVER, MODEL.TRANSREID ...) rather than a value."""
    return name not in valid_keys() and any(key.startswith(name + ".") for key in valid_keys())


def _flatten(d: dict, source: str, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        full = f"{prefix}{k}"
        if isinstance(v, dict):
            if full in valid_keys():  # a value that happens to be a mapping
                yield full, v
            else:
                if not _is_section(full):
                    raise _unknown_key_error(full, source)
                yield from _flatten(v, source, full + ".")
        elif _is_section(full):
            # `MODEL: 3`, or a section left empty (`MODEL:` with its keys indented wrongly).
            raise ConfigError(f"{full} is a section of keys ({source}), but it is given the value "
                              f"{v!r}: write its keys indented under it, e.g. {full}.{_first_child(full)}")
        else:
            yield full, v


def _first_child(section: str) -> str:
    """The first key below `section` (in the defaults' order), for an example in a message."""
    try:
        return next(iter(_lookup(_C, section)))
    except (KeyError, TypeError, StopIteration):  # a section only a component registers
        return min(k[len(section) + 1:].split(".")[0] for k in valid_keys()
                   if k.startswith(section + "."))


def _read_yaml(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a file: give --config the .yml "
                          "file itself (e.g. configs/softmax_triplet.yml)")
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist (check the path given to --config)")
    try:
        with p.open(encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not a text file (byte {exc.start} is not UTF-8): "
                          "give --config a YAML config such as configs/softmax_triplet.yml"
                          ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path} ({exc.strerror or exc}); check "
                          "the path given to --config and its permissions") from None
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
    """Reject bad values and impossible combinations with one clear message.

    The rules belong to the components that read the keys (datasets, backbones, heads,
    losses, solver, ...): they registered them in `config.components`, which runs them here.
    """
    components.run_checks(cfg)


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


def load_config(config_file: str | None = None, opts: list[str] | None = None) -> CfgNode:
    """Defaults <- yml <- KEY VALUE overrides, validated and frozen."""
    components.load_components()  # their keys (add_defaults) and checks
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
    atomic_write_text(path, dump_config(cfg))


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
    components.load_components()
    cfg = get_cfg_defaults()
    data = yaml.safe_load(text) or {}
    source = "in the checkpoint's config"
    for key, value in _flatten(data, source):
        _set(cfg, key, value, source)
    validate(cfg)
    cfg.freeze()
    return cfg
