"""How components hand their config rules to the loader without the loader importing them.

The config is the lowest layer: datasets, backbones, heads, losses... sit above it and know
their own keys. Each of them registers here, when its module is imported:

* `selects(key, registry)`: the key picks an entry of `registry` by name (MODEL.HEAD -> the head
  registry), so its allowed values are the registry's names, and the picked entry's `check(cfg)`
  (when it has one) validates the keys that entry reads;
* `@config_check("owner")`: a function `check(cfg)` run on every validated config, for the keys
  a module owns whatever is selected;
* `add_defaults({"SECTION.KEY": default}, owner)`: new keys with their defaults, so a component
  in a user's own code can own keys. The built-in components' keys stay in `config/defaults.py`,
  which keeps the upstream layout and the order `strongreid config` prints.

`load_components()` imports the built-in components once, before the first config is merged or
validated, through the function the package registers with `set_component_loader` (the package
root knows its parts; the config never names them).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from yacs.config import CfgNode

from strongreid.config.defaults import _C
from strongreid.errors import ConfigError
from strongreid.registry import Registry

Check = Callable[[CfgNode], None]


@dataclass
class Selector:
    """A key whose value names registry entries."""

    key: str
    registry: Registry
    # Values the key accepts besides the registry's names (e.g. 'timm:<name>' backbones).
    accepts: Callable[[str], bool] | None = None
    # The names a value holds ('triplet,circle' -> two); default: the value itself.
    names: Callable[[CfgNode], list[str]] | None = None
    # What a wrong value's message says besides the known names (e.g. how to name a timm model).
    hint: str = ""
    # The message prefix for an unknown name, e.g. "DATASETS.NAMES: unknown dataset 'x'".
    unknown: Callable[[str], str] | None = None


_selectors: dict[str, Selector] = {}
CONFIG_CHECKS: Registry[Check] = Registry("config check")
_loader: list[Callable[[], None]] = []
_loaded = [False]
# Bumped whenever keys are added, so the loader recomputes its set of valid keys.
keys_version = [0]


def selects(key: str, registry: Registry, **options: Any) -> None:
    """Make `key` select entries of `registry` by name (see `Selector` for the options)."""
    _selectors[key] = Selector(key, registry, **options)


def selector(key: str) -> Selector | None:
    return _selectors.get(key)


def selected_keys() -> list[str]:
    return list(_selectors)


def config_check(owner: str) -> Callable[[Check], Check]:
    """Decorator: run `fn(cfg)` on every validated config; `owner` names it (one per owner)."""

    def deco(fn: Check) -> Check:
        CONFIG_CHECKS.register(owner, override=True)(fn)
        return fn

    return deco


def add_defaults(values: Mapping[str, Any], owner: str) -> None:
    """Add dotted keys with their defaults (`{"MODEL.MY_WIDTH": 256}`) to the config tree.

    A key that exists already is refused unless its default is the same (a module imported
    twice), so two components cannot silently share a key.
    """
    for key, default in values.items():
        *sections, leaf = key.split(".")
        if not sections:
            raise ConfigError(f"{owner}: config key {key!r} needs a section, e.g. MODEL.{key}")
        node = _C
        for part in sections:
            if part not in node:
                node[part] = CfgNode()
            node = node[part]
            if not isinstance(node, CfgNode):
                raise ConfigError(f"{owner}: {key!r} would put a key under the value {part!r}")
        if leaf in node:
            if node[leaf] != default:
                raise ConfigError(
                    f"{owner}: config key {key} exists already with default {node[leaf]!r}; "
                    "choose another name"
                )
            continue
        # The defaults are frozen only by accident of cloning; add under defrost to be sure.
        was_frozen = _C.is_frozen()
        _C.defrost()
        node[leaf] = default
        if was_frozen:
            _C.freeze()
        keys_version[0] += 1


def set_component_loader(load: Callable[[], None]) -> None:
    """The package registers the function that imports its built-in components."""
    _loader[:] = [load]


def load_components() -> None:
    """Import the built-in components (once), so their registries and checks exist."""
    if _loaded[0]:
        return
    if not _loader:
        raise RuntimeError("no component loader: import strongreid (the package) first")
    _loaded[0] = True
    try:
        _loader[0]()
    except BaseException:
        _loaded[0] = False
        raise


def lookup(cfg: CfgNode, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_choices(cfg: CfgNode, choices: Mapping[str, Iterable[str]]) -> None:
    """Each key's value must be one of its allowed values."""
    for key, allowed in choices.items():
        allowed = tuple(allowed)
        value = lookup(cfg, key)
        if value not in allowed:
            raise ConfigError(
                f"{key} = {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}."
            )


def check_at_least(cfg: CfgNode, keys: Iterable[str], low: int = 1) -> None:
    for key in keys:
        if lookup(cfg, key) < low:
            raise ConfigError(f"{key} = {lookup(cfg, key)} must be at least {low}.")


def _check_name(sel: Selector, name: str) -> None:
    if name in sel.registry or (sel.accepts is not None and sel.accepts(name)):
        return
    known = sel.registry.names()
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    did = f" Did you mean {', '.join(close)}?" if close else ""
    if sel.unknown is not None:
        raise ConfigError(f"{sel.unknown(name)}.{did} Known: {', '.join(known)}{sel.hint}.")
    raise ConfigError(
        f"{sel.key} = {name!r} is not allowed; choose one of "
        f"{', '.join(map(repr, known))}{sel.hint}.{did}"
    )


def check_names(cfg: CfgNode) -> None:
    """Every selecting key names registered entries (or a value its selector accepts)."""
    for sel in _selectors.values():
        for name in sel.names(cfg) if sel.names else [lookup(cfg, sel.key)]:
            _check_name(sel, name)


def selected(cfg: CfgNode, key: str) -> Any:
    """The registry entry the single-valued selecting `key` names (ConfigError if none)."""
    sel = _selectors[key]
    name = lookup(cfg, key)
    _check_name(sel, name)
    return sel.registry.get(name)


def check_entries(cfg: CfgNode) -> None:
    """Each selected entry's `check(cfg)`, for the keys that entry reads."""
    for sel in _selectors.values():
        names = sel.names(cfg) if sel.names else [lookup(cfg, sel.key)]
        for name in dict.fromkeys(names):
            entry = sel.registry.get(name) if name in sel.registry else None
            check = getattr(entry, "check", None)
            if callable(check):
                check(cfg)


def run_checks(cfg: CfgNode) -> None:
    """The selecting keys' names, the components' checks in registration order, then the
    selected entries' own checks."""
    load_components()
    check_names(cfg)
    for owner in CONFIG_CHECKS.names_in_order():
        CONFIG_CHECKS.get(owner)(cfg)
    check_entries(cfg)
