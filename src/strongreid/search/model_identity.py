"""Which model a gallery's features came from: recorded at its first ingest, checked ever after.

Features of two models cannot be compared (nor those of one model under other test settings),
so a gallery records the identity of the model that wrote it, and every later ingest, `serve`
and `demo search` checks the model it is given against it.

The identity is a sha256 over the model's weights (its state_dict's tensors in sorted key
order: name, dtype, shape and bytes; BatchNorm's `num_batches_tracked` counters, which no test
feature depends on, are left out) and the settings that change the features: input size, pixel
mean / std, interpolation, flip, feature norm, which feature (TEST.NECK_FEAT), multi-scale
scales, last stride, pooling and the feature dimension. So a copied or renamed checkpoint is the same
model, and the same weights served with TEST.FLIP_AUG on are not. It is computed once per
FeatureExtractor (a ResNet-50's 100 MB hash in about 0.2 s).

The store keeps it as one JSON record (`GalleryStore.model()` / `record_model()`): the digest,
the weights' digest, the settings, the model file it came from and when it was recorded. A
gallery written before this has none: the next ingest adopts its model (and says so), and
`serve` works on it as before with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

from strongreid.search.store import GalleryStore, StoreError

VERSION = "strongreid-model-identity-1"
_SKIPPED = ("num_batches_tracked",)  # training counters: no test feature depends on them
# One identity per extractor object: the weights are hashed once per process.
_CACHE: weakref.WeakKeyDictionary[Any, ModelIdentity] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ModelIdentity:
    """A model's identity: `digest` over its weights' digest and its feature settings."""

    digest: str
    weights: str
    settings: dict[str, Any] = field(compare=False, hash=False)
    path: str = field(default="", compare=False)  # the model file, as given or as recorded
    recorded: str = field(default="", compare=False)  # when a gallery recorded it (UTC)

    @property
    def short(self) -> str:
        """The digest's first 12 hex digits (what messages show)."""
        return self.digest[:12]

    def record(self) -> dict[str, Any]:
        """What a gallery stores: the identity, the model file's absolute path, and now."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"version": VERSION, "digest": self.digest, "weights": self.weights,
                "settings": self.settings, "path": os.path.abspath(self.path) if self.path else "",
                "recorded": now}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ModelIdentity:
        """The identity a gallery recorded."""
        return cls(str(record.get("digest", "")), str(record.get("weights", "")),
                   dict(record.get("settings") or {}), str(record.get("path", "")),
                   str(record.get("recorded", "")))


def _unwrapped(model: Any) -> Any:
    net = getattr(model, "module", model)  # DDP / DataParallel
    return getattr(net, "_orig_mod", net)  # torch.compile


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's state_dict: every tensor's name, dtype, shape and bytes, in sorted
    key order (on the CPU, contiguous: the device and memory format do not count)."""
    h = hashlib.sha256()
    state = _unwrapped(model).state_dict()
    for key in sorted(state):
        if key.endswith(_SKIPPED):
            continue
        value = state[key]
        h.update(key.encode() + b"\0")
        if not isinstance(value, torch.Tensor):
            h.update(repr(value).encode() + b"\0")
            continue
        t = value.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}\0".encode())
        try:
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        except (RuntimeError, TypeError):  # quantized and other exotic tensors
            h.update(repr(t.tolist()).encode())
    return h.hexdigest()


def feature_settings(extractor: Any) -> dict[str, Any]:
    """The FeatureExtractor settings that change its features (JSON-able)."""
    cfg = extractor.cfg
    net = _unwrapped(extractor.model)
    settings = {
        "input_size": [int(x) for x in extractor.input_size],
        "pixel_mean": [float(x) for x in cfg.INPUT.PIXEL_MEAN],
        "pixel_std": [float(x) for x in cfg.INPUT.PIXEL_STD],
        "interpolation": str(getattr(cfg.INPUT, "INTERPOLATION", "bilinear")),
        "flip": bool(extractor.flip),
        "feat_norm": bool(extractor.feat_norm),
        "scales": [float(s) for s in extractor.scales],
        "neck_feat": str(getattr(net, "neck_feat", cfg.TEST.NECK_FEAT)),
        "last_stride": int(getattr(cfg.MODEL, "LAST_STRIDE", 1)),
        "pooling": str(getattr(cfg.MODEL, "POOLING", "avg")),
        "feat_dim": int(extractor.feat_dim),
    }
    if settings["pooling"] == "gem":  # its exponent only counts where GeM pools
        settings["gem_p"] = float(cfg.MODEL.GEM_P)
    return settings


def model_identity(extractor: Any) -> ModelIdentity:
    """The identity of a FeatureExtractor's model (computed once per extractor)."""
    cached = _CACHE.get(extractor)
    if cached is not None:
        return cached
    weights = weights_digest(extractor.model)
    settings = feature_settings(extractor)
    digest = hashlib.sha256(f"{VERSION}\n{weights}\n{json.dumps(settings, sort_keys=True)}"
                            .encode()).hexdigest()
    identity = ModelIdentity(digest, weights, settings, os.fspath(extractor.weights))
    _CACHE[extractor] = identity
    return identity


def recorded(store: GalleryStore) -> ModelIdentity | None:
    """The identity the gallery recorded (None: it records none)."""
    record = store.model()
    return ModelIdentity.from_record(record) if record else None


def _difference(have: ModelIdentity, given: ModelIdentity) -> str:
    if have.weights != given.weights:
        return "other weights"
    changed = [f"{k} {have.settings.get(k)!r} -> {given.settings.get(k)!r}"
               for k in sorted(set(have.settings) | set(given.settings))
               if have.settings.get(k) != given.settings.get(k)]
    return "the same weights with other feature settings (" + ", ".join(changed) + ")"


def _built_with(gallery: str, have: ModelIdentity, given: ModelIdentity) -> str:
    return (f"the gallery {gallery} holds features of the model {have.path or '(path unknown)'} "
            f"(identity {have.short}, recorded {have.recorded or 'at an unknown time'}); "
            f"--model {given.path} (identity {given.short}) has {_difference(have, given)}, "
            "and features of different models cannot be compared")


def check_ingest(store: GalleryStore, model: ModelIdentity, gallery: str) -> str | None:
    """Before an ingest reads anything: a StoreError if the gallery records another model. A
    gallery from before identities (rows, no record) will adopt `model` once the ingest's
    inputs are found (bind_first_write): the note that says so. Writes nothing."""
    have = recorded(store)
    if have is None:
        if store.dim is None:
            return None  # a new gallery: bind_first_write records the model with its first rows
        return (f"note: the gallery {gallery} did not record its model (it was built before "
                f"strongreid recorded one); it now records {os.path.abspath(model.path)} "
                f"(identity {model.short}), which every later ingest and `strongreid serve` "
                "must use")
    if have.digest != model.digest:
        raise StoreError(f"{_built_with(gallery, have, model)}: nothing was added. Ingest with "
                         f"--model {have.path or 'THE_MODEL_IT_WAS_BUILT_WITH'} (a copy with the "
                         "same weights and settings will do), or into a new gallery file "
                         "(--gallery NEW.db)")
    return None


def bind_first_write(store: GalleryStore, model: ModelIdentity, gallery: str) -> None:
    """Records `model` unless one is recorded (the store is open: before a new gallery's first
    rows, or when an old one adopts it), and refuses if another process recorded another
    model first."""
    have = ModelIdentity.from_record(store.record_model(model.record()))
    if have.digest != model.digest:
        raise StoreError(f"{_built_with(gallery, have, model)} (another ingest recorded it "
                         "meanwhile): nothing was added. Ingest into a new gallery file "
                         "(--gallery NEW.db)")


def check_serve(store: GalleryStore, model: ModelIdentity, gallery: str) -> str | None:
    """Before serving: a StoreError if the gallery records another model; the warning line for
    a gallery that records none (built before identities); None when all is well."""
    have = recorded(store)
    if have is None:
        if store.dim is None:
            return None
        return unrecorded_warning(gallery, model.path)
    if have.digest != model.digest:
        raise StoreError(f"{_built_with(gallery, have, model)}, so its searches would rank "
                         f"nonsense. Serve it with --model {have.path or 'THE_MODEL_IT_WAS_BUILT_WITH'}"
                         " (a copy with the same weights and settings will do), or ingest the "
                         f"footage into a new gallery file with this model (`strongreid gallery "
                         f"ingest --gallery NEW.db --model {model.path} ...`) and serve that")
    return None


def unrecorded_warning(gallery: str, model: str) -> str:
    """The one line `serve` prints for a gallery built before it recorded its model."""
    return (f"WARNING: the gallery {gallery} does not record which model wrote its features "
            f"(built before strongreid recorded it): its searches are meaningful only if --model "
            f"{model} is that model; the next `strongreid gallery ingest` records the model it is "
            "given")
