"""The gallery's vector store: Milvus, embedded (Milvus Lite, one `gallery.db` file) by default.

`GalleryStore` is the small interface the ingest and the service use; `MilvusStore` is its
implementation over `pymilvus.MilvusClient`, so the same code runs against Milvus Lite (a
local path ending in `.db`) or a Milvus server / cluster (`http://host:19530`, with a token).

One row is one crop: its embedding and where it came from. The primary key is the crop's
content key (see ingest.py), so writing a crop twice is an upsert, never a duplicate.
Filter values are quoted as Milvus string literals (quote()): a camera called
`a" or "1"=="1` is a name, not an expression.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from strongreid.errors import StrongReIDError

COLLECTION = "gallery"
KEY_LENGTH = 40  # hex sha1
INDEX_TYPES = ("FLAT", "IVF_FLAT", "HNSW")
METRIC = "COSINE"
_TEXT = 512  # longest camera / video / source text stored
# Metadata fields besides the key and the vector, with their Milvus types.
FIELDS: dict[str, str] = {
    "camera": "VARCHAR", "video": "VARCHAR", "source": "VARCHAR", "frame": "INT64",
    "timestamp": "DOUBLE", "left": "INT64", "top": "INT64", "width": "INT64",
    "height": "INT64", "track": "INT64", "pid": "INT64", "score": "FLOAT",
}
KEY_RE = re.compile(r"^[0-9a-f]{40}$")


class StoreError(StrongReIDError):
    """The gallery store cannot be opened or does not hold what was asked for."""


@dataclass
class Filters:
    """Which rows a search may return: cameras, videos, and a [start, end] time window (s)."""

    cameras: Sequence[str] = ()
    videos: Sequence[str] = ()
    start: float | None = None
    end: float | None = None
    exclude_keys: Sequence[str] = ()

    def expression(self) -> str:
        """The Milvus filter expression ('' when nothing is filtered)."""
        parts = []
        if self.cameras:
            parts.append(f"camera in {quote_list(self.cameras)}")
        if self.videos:
            parts.append(f"video in {quote_list(self.videos)}")
        if self.start is not None:
            parts.append(f"timestamp >= {_number(self.start)}")
        if self.end is not None:
            parts.append(f"timestamp <= {_number(self.end)}")
        if self.exclude_keys:
            parts.append(f"key not in {quote_list(self.exclude_keys)}")
        return " and ".join(parts)


def quote(text: str) -> str:
    """A Milvus string literal: double quotes, with backslash and quote escaped.

    Milvus Lite does not take filter templates (filter_params), so values are quoted here;
    control characters are refused rather than trusted to the parser's escapes.
    """
    text = str(text)
    if any(ord(ch) < 32 for ch in text):
        raise StoreError(f"filter value {text!r} has control characters")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_list(values: Iterable[str]) -> str:
    """A Milvus list literal of strings."""
    return "[" + ", ".join(quote(v) for v in values) + "]"


def _number(x: float) -> str:
    x = float(x)
    if not np.isfinite(x):
        raise StoreError(f"time filter {x} must be a finite number of seconds")
    return repr(x)


@dataclass
class Hit:
    """One search result: the row's key, its cosine similarity and its metadata."""

    key: str
    score: float
    meta: dict[str, Any] = field(default_factory=dict)


class GalleryStore(Protocol):
    """What ingest and the service need from a vector store."""

    dim: int | None

    def open(self, dim: int) -> None: ...
    def existing(self, keys: Sequence[str]) -> set[str]: ...
    def upsert(self, rows: list[dict[str, Any]]) -> None: ...
    def search(self, vectors: np.ndarray, k: int, filters: Filters | None = None,
               with_vectors: bool = False) -> list[list[Hit]]: ...
    def get(self, keys: Sequence[str], with_vectors: bool = False) -> list[dict[str, Any]]: ...
    def browse(self, limit: int, offset: int = 0, filters: Filters | None = None) -> list[dict]: ...
    def count(self) -> int: ...
    def facets(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


def is_local(uri: str) -> bool:
    """A Milvus Lite file (a path) rather than a server URI."""
    return "://" not in uri


def thumbs_dir_for(uri: str, thumbs: str | os.PathLike | None = None) -> Path:
    """Where thumbnails live: `--thumbs`, else `<gallery>.thumbs/` beside a Milvus Lite file."""
    if thumbs:
        return Path(thumbs)
    if not is_local(uri):
        raise StoreError(f"gallery {uri} is a Milvus server: pass --thumbs DIR, the folder that "
                         "holds (or will hold) its thumbnails")
    p = Path(uri)
    return p.with_name(p.stem + ".thumbs")


def _quiet_pymilvus() -> None:
    # pymilvus logs every failed RPC with a traceback at ERROR; our errors say it once. Milvus
    # Lite's in-process gRPC server logs each call it does not implement (AllocTimestamp,
    # which the client probes and then does without).
    for name in ("pymilvus", "pymilvus.decorators", "milvus_lite", "grpc._server"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


class MilvusStore:
    """GalleryStore over pymilvus: Milvus Lite for a path, a Milvus server for a URI."""

    def __init__(self, uri: str, *, token: str = "", collection: str = COLLECTION,
                 index_type: str = "FLAT", index_params: dict[str, Any] | None = None,
                 search_params: dict[str, Any] | None = None, create: bool = True) -> None:
        try:
            from pymilvus import MilvusClient
        except ImportError as exc:
            raise StoreError("the gallery needs pymilvus and Milvus Lite: "
                             "pip install 'strongreid[search]'") from exc
        if index_type not in INDEX_TYPES:
            raise StoreError(f"unknown index type {index_type!r}: use {', '.join(INDEX_TYPES)}")
        _quiet_pymilvus()
        self.uri, self.collection = str(uri), collection
        self.index_type = index_type
        self.index_params = dict(index_params or {})
        self.search_params = dict(search_params or {})
        if is_local(self.uri):
            path = Path(self.uri)
            if not path.exists() and not create:
                raise StoreError(f"gallery {path} does not exist; build it with "
                                 "`strongreid gallery ingest --gallery {path} ...`")
            if path.suffix != ".db":
                raise StoreError(f"gallery {path}: a Milvus Lite file name must end with .db")
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client = MilvusClient(self.uri, token=token) if token else MilvusClient(self.uri)
        except Exception as exc:  # pymilvus raises several unrelated types for a bad URI
            raise StoreError(f"cannot open the gallery {self.uri}: {exc}; a Milvus Lite file is "
                             "opened by one process at a time") from None
        self.dim: int | None = None
        if self.client.has_collection(collection):
            desc = self.client.describe_collection(collection)
            for f in desc["fields"]:
                if f["name"] == "vector":
                    self.dim = int(f["params"]["dim"])
            self.client.load_collection(collection)

    def open(self, dim: int) -> None:
        """Creates the collection for `dim`-dimensional vectors, or checks the existing one."""
        if self.dim is not None:
            if self.dim != dim:
                raise StoreError(
                    f"gallery {self.uri} holds {self.dim}-dimensional features but the model gives "
                    f"{dim}: ingest into a new gallery file, or use the model that built this one")
            return
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=KEY_LENGTH)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dim))
        for name, kind in FIELDS.items():
            if kind == "VARCHAR":
                schema.add_field(name, DataType.VARCHAR, max_length=_TEXT)
            else:
                schema.add_field(name, getattr(DataType, kind))
        params = self.client.prepare_index_params()
        params.add_index("vector", index_type=self.index_type, metric_type=METRIC,
                         params=self.index_params)
        # Scalar indexes make camera / time filters cheap on a large gallery.
        params.add_index("camera", index_type="INVERTED")
        params.add_index("timestamp", index_type="INVERTED")
        self.client.create_collection(self.collection, schema=schema, index_params=params)
        self.client.load_collection(self.collection)
        self.dim = int(dim)

    def _need(self) -> None:
        if self.dim is None:
            raise StoreError(f"gallery {self.uri} is empty: ingest images or videos into it first "
                             "with `strongreid gallery ingest`")

    def existing(self, keys: Sequence[str]) -> set[str]:
        """The keys among `keys` already stored (what a resumed ingest skips)."""
        if self.dim is None or not keys:
            return set()
        found: set[str] = set()
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            chunk = keys[i:i + 1000]
            rows = self.client.query(self.collection, filter=f"key in {quote_list(chunk)}",
                                     output_fields=["key"])
            found.update(r["key"] for r in rows)
        return found

    def upsert(self, rows: list[dict[str, Any]]) -> None:
        """Writes rows (key, vector and every FIELDS entry); a stored key is replaced."""
        self._need()
        if not rows:
            return
        clean = []
        for r in rows:
            row = {"key": r["key"], "vector": np.asarray(r["vector"], np.float32).tolist()}
            for name, kind in FIELDS.items():
                v = r.get(name)
                if kind == "VARCHAR":
                    row[name] = str(v if v is not None else "")[:_TEXT]
                elif kind == "INT64":
                    row[name] = int(v) if v is not None else -1
                else:
                    row[name] = float(v) if v is not None else 0.0
            clean.append(row)
        self.client.upsert(self.collection, clean)

    def search(self, vectors: np.ndarray, k: int, filters: Filters | None = None,
               with_vectors: bool = False) -> list[list[Hit]]:
        """Top-k rows by cosine similarity for each query vector, within `filters`."""
        self._need()
        q = np.atleast_2d(np.asarray(vectors, np.float32))
        if q.shape[1] != self.dim:
            raise StoreError(f"query features have dimension {q.shape[1]}, the gallery {self.dim}")
        expr = (filters or Filters()).expression()
        fields = [*FIELDS, *(["vector"] if with_vectors else [])]
        res = self.client.search(
            self.collection, data=q.tolist(), limit=int(k), filter=expr,
            output_fields=fields,
            search_params={"metric_type": METRIC, "params": self.search_params},
        )
        return [[Hit(h["id"] if "id" in h else h["key"], float(h["distance"]), dict(h["entity"]))
                 for h in hits] for hits in res]

    def get(self, keys: Sequence[str], with_vectors: bool = False) -> list[dict[str, Any]]:
        """The stored rows of `keys` (unknown keys are left out), in no particular order."""
        if self.dim is None or not keys:
            return []
        fields = ["key", *FIELDS, *(["vector"] if with_vectors else [])]
        return list(self.client.get(self.collection, ids=list(keys), output_fields=fields))

    def browse(self, limit: int, offset: int = 0, filters: Filters | None = None) -> list[dict]:
        """Rows in time order, for the page's gallery strip."""
        if self.dim is None:
            return []
        expr = (filters or Filters()).expression()
        # A query needs a filter or a limit; the time sort is ours (Milvus returns key order).
        rows = self.client.query(self.collection, filter=expr,
                                 output_fields=["key", *FIELDS], limit=int(limit) + int(offset))
        rows = sorted(rows, key=lambda r: (r["timestamp"], r["camera"], r["key"]))
        return rows[offset:offset + limit]

    def count(self) -> int:
        """Rows stored."""
        if self.dim is None:
            return 0
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def facets(self) -> dict[str, Any]:
        """Cameras and videos present and the time range: what the page offers as filters."""
        if self.dim is None:
            return {"cameras": [], "videos": [], "start": None, "end": None}
        cams: set[str] = set()
        vids: set[str] = set()
        lo, hi = None, None
        # query_iterator streams every row's few scalar fields; fine at gallery sizes one
        # machine serves, and computed once at start-up (the service caches it).
        it = self.client.query_iterator(self.collection, batch_size=4096, filter="",
                                        output_fields=["camera", "video", "timestamp"])
        try:
            while batch := it.next():
                for r in batch:
                    cams.add(r["camera"])
                    vids.add(r["video"])
                    t = float(r["timestamp"])
                    lo = t if lo is None else min(lo, t)
                    hi = t if hi is None else max(hi, t)
        finally:
            it.close()
        return {"cameras": sorted(cams), "videos": sorted(v for v in vids if v),
                "start": lo, "end": hi}

    def flush(self) -> None:
        """Makes written rows durable (Milvus Lite persists on flush and on close)."""
        if self.dim is not None:
            self.client.flush(self.collection)

    def close(self) -> None:
        """Flushes and releases the client (Milvus Lite lets another process open the file)."""
        try:
            self.flush()
        finally:
            self.client.close()


def rows_by_key(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`get()` results keyed by their key."""
    return {r["key"]: r for r in rows}
