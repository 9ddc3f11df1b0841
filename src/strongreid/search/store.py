"""The gallery's vector store: embedded (one `gallery.db` file) by default, Milvus for a server.

`GalleryStore` is the small interface the ingest and the service use. Backends are registered
in STORES and chosen by `open_store(uri)` from the URI: a Milvus server or cluster
(`http://host:19530`, with a token) and an existing Milvus Lite gallery go to `MilvusStore`
(here, over `pymilvus.MilvusClient`); any other local path is the embedded store,
`FaissStore` (faiss_store.py: SQLite rows + an in-process faiss index), which is what a new
`gallery.db` becomes. `strongreid gallery migrate` copies a Milvus Lite gallery into one.

One row is one crop: its embedding and where it came from. The primary key is the crop's
content key (see ingest.py), so writing a crop twice is an upsert, never a duplicate.
Filter values are quoted as Milvus string literals (quote()): a camera called
`a" or "1"=="1` is a name, not an expression.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from strongreid.errors import StrongReIDError
from strongreid.registry import Registry

COLLECTION = "gallery"
KEY_LENGTH = 40  # hex sha1
INDEX_TYPES = ("FLAT", "IVF_FLAT", "HNSW")
# A backend's own default index when none is asked for (its `default_index`), else this one:
# HNSW on a Milvus server. The embedded store's is IVF_FLAT (faiss_store.py says why).
DEFAULT_INDEX = "HNSW"
# Build and search parameters per index type (Milvus and faiss use the same names).
DEFAULT_INDEX_PARAMS: dict[str, dict[str, int]] = {
    "FLAT": {}, "IVF_FLAT": {"nlist": 1024}, "HNSW": {"M": 32, "efConstruction": 80},
}
DEFAULT_SEARCH_PARAMS: dict[str, dict[str, int]] = {
    "FLAT": {}, "IVF_FLAT": {"nprobe": 32}, "HNSW": {"ef": 128},
}
METRIC = "COSINE"
# The collection property in which MilvusStore keeps the gallery's model identity (JSON).
MODEL_PROPERTY = "strongreid.model"
_TEXT = 512  # longest camera / video / source text stored
# Metadata fields besides the key and the vector, with their Milvus types.
FIELDS: dict[str, str] = {
    "camera": "VARCHAR", "video": "VARCHAR", "source": "VARCHAR", "frame": "INT64",
    "timestamp": "DOUBLE", "left": "INT64", "top": "INT64", "width": "INT64",
    "height": "INT64", "track": "INT64", "pid": "INT64", "score": "FLOAT",
}
KEY_RE = re.compile(r"^[0-9a-f]{40}$")
_SQLITE_KINDS = {"VARCHAR": "TEXT", "INT64": "INTEGER", "DOUBLE": "REAL", "FLOAT": "REAL"}
# Gallery store backends by name, asked in registration order whether they claim a URI.
STORES: Registry[Any] = Registry("gallery store")


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
    def rows(self, batch: int = 4096) -> Iterator[list[dict[str, Any]]]: ...
    # The identity of the model whose features the gallery holds (model_identity.py): a JSON
    # record, or None in a gallery that records none (new, or written before it was recorded).
    def model(self) -> dict[str, Any] | None: ...
    # Records `record` unless the gallery records a model already; returns the one recorded
    # (another process's, when it was first). Only on an open gallery (open(dim) done).
    def record_model(self, record: dict[str, Any]) -> dict[str, Any]: ...
    def close(self) -> None: ...


def is_local(uri: str) -> bool:
    """A gallery file (a path) rather than a server URI."""
    return "://" not in uri


def sqlite_kind(kind: str) -> str:
    """The SQLite column type of a FIELDS type."""
    return _SQLITE_KINDS[kind]


def clean_row(r: dict[str, Any]) -> dict[str, Any]:
    """A row's key and FIELDS values with their stored types (missing ones get defaults)."""
    row: dict[str, Any] = {"key": str(r["key"])}
    for name, kind in FIELDS.items():
        v = r.get(name)
        if kind == "VARCHAR":
            row[name] = str(v if v is not None else "")[:_TEXT]
        elif kind == "INT64":
            row[name] = int(v) if v is not None else -1
        else:
            row[name] = float(v) if v is not None else 0.0
    return row


def gallery_kind(path: str | os.PathLike) -> str:
    """What a local gallery path holds, found without writing to it: 'new' (nothing yet, or an
    empty file or database), 'embedded' (a strongreid gallery.db), 'milvus-lite' (a Milvus
    Lite 3 folder, or a Milvus Lite 2 SQLite file: its `collection_meta` table), or 'foreign':
    any other file (a text file, another application's database), which no store may open."""
    p = Path(path)
    if p.is_dir():
        return "milvus-lite"
    if not p.exists():
        return "new"
    if not p.is_file():
        return "foreign"
    if p.stat().st_size == 0:
        return "new"
    try:
        with open(p, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                return "foreign"
        con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            fmt = con.execute("SELECT value FROM info WHERE name = 'format'").fetchone() \
                if {"info", "crops"} <= tables else None
        finally:
            con.close()
    except (OSError, sqlite3.DatabaseError):
        return "foreign"
    if fmt is not None and str(fmt[0]).startswith("strongreid-gallery"):
        return "embedded"  # this format or another (FaissStore names both)
    if "collection_meta" in tables:
        return "milvus-lite"
    return "foreign" if tables else "new"


def is_milvus_lite(path: str | os.PathLike) -> bool:
    """An existing Milvus Lite gallery: a folder (Milvus Lite 3) or a Milvus Lite 2 SQLite file."""
    return gallery_kind(path) == "milvus-lite"


def refuse_foreign(path: str | os.PathLike, kind: str | None = None) -> None:
    """A StoreError, before anything touches it, when a local gallery path is some other file
    (`kind`: its gallery_kind when the caller has it)."""
    if (kind or gallery_kind(path)) == "foreign":
        # No flag named: `gallery ingest --gallery`, `serve --gallery` and `migrate --from/--to`
        # all come here.
        raise StoreError(f"{path} is not a strongreid gallery (neither a gallery.db that "
                         "strongreid wrote nor a Milvus Lite gallery): it was left untouched. "
                         "Give a new file name (e.g. gallery.db) or an existing gallery")


def query_matrix(vectors: np.ndarray, dim: int | None) -> np.ndarray:
    """Query vectors as a (Q, dim) float32 matrix, or a StoreError naming both dimensions."""
    q = np.atleast_2d(np.asarray(vectors, np.float32))
    if q.shape[1] != dim:
        raise StoreError(f"query features have dimension {q.shape[1]}, the gallery {dim}")
    return q


def open_store(uri: str, *, token: str = "", index_type: str | None = None,
               index_params: dict[str, Any] | None = None,
               search_params: dict[str, Any] | None = None, create: bool = True) -> GalleryStore:
    """The gallery at `uri`, opened by the first registered backend that claims it."""
    uri = str(uri)
    for name in STORES.names_in_order():
        backend = STORES.get(name)
        if backend.claims(uri):
            kind = index_type or getattr(backend, "default_index", DEFAULT_INDEX)
            return backend(uri, token=token, index_type=kind, index_params=index_params,
                           search_params=search_params, create=create)
    raise StoreError(f"no gallery store opens {uri!r}: give a file path (gallery.db) or a "
                     "Milvus server URI (http://host:19530)")


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


@STORES.register("milvus")
class MilvusStore:
    """GalleryStore over pymilvus: Milvus Lite for a path, a Milvus server for a URI."""

    @staticmethod
    def claims(uri: str) -> bool:
        """A server URI, or a Milvus Lite gallery already on disk."""
        return not is_local(uri) or is_milvus_lite(uri)

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
        self.index_params = {**DEFAULT_INDEX_PARAMS[index_type], **dict(index_params or {})}
        self.search_params = {**DEFAULT_SEARCH_PARAMS[index_type], **dict(search_params or {})}
        if is_local(self.uri):
            path = Path(self.uri)
            refuse_foreign(path)
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
        # pymilvus flattens `params` into the request; a server reads the flat keys, Milvus
        # Lite only a nested "params" (flat ones are dropped: every HNSW would get its defaults).
        build = {"params": self.index_params} if is_local(self.uri) else self.index_params
        params.add_index("vector", index_type=self.index_type, metric_type=METRIC, params=build)
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

    def model(self) -> dict[str, Any] | None:
        """The recorded model identity: a collection property (MODEL_PROPERTY), JSON."""
        if self.dim is None:
            return None
        props = self.client.describe_collection(self.collection).get("properties") or {}
        value = props.get(MODEL_PROPERTY)
        return json.loads(value) if value else None

    def record_model(self, record: dict[str, Any]) -> dict[str, Any]:
        """Records the model identity unless one is recorded (Milvus has no transaction: two
        processes recording at the same moment is not detected here)."""
        self._need()
        have = self.model()
        if have is not None:
            return have
        try:
            self.client.alter_collection_properties(
                self.collection, properties={MODEL_PROPERTY: json.dumps(record, sort_keys=True)})
        except Exception as exc:  # pymilvus raises its own types
            raise StoreError(f"gallery {self.uri}: cannot record the model identity as a "
                             f"collection property: {exc}") from None
        return self.model() or record

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
        """Writes rows (key, vector and every FIELDS entry) and flushes them: durable when this
        returns (unflushed rows are also what makes Milvus Lite's searches slow)."""
        self._need()
        if not rows:
            return
        clean = [{**clean_row(r), "vector": np.asarray(r["vector"], np.float32).tolist()}
                 for r in rows]
        self.client.upsert(self.collection, clean)
        self.client.flush(self.collection)

    def search(self, vectors: np.ndarray, k: int, filters: Filters | None = None,
               with_vectors: bool = False) -> list[list[Hit]]:
        """Top-k rows by cosine similarity for each query vector, within `filters`."""
        self._need()
        q = query_matrix(vectors, self.dim)
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
        """Rows in time order (ties by camera, then key): every row once across pages.

        Milvus has no ORDER BY, so the order is computed over the (timestamp, camera, key) of
        every matching row, streamed; then the page's rows are fetched by key.
        """
        if self.dim is None:
            return []
        order = sorted(self._scan((filters or Filters()).expression(),
                                  ["key", "timestamp", "camera"]),
                       key=lambda r: (r["timestamp"], r["camera"], r["key"]))
        page = [r["key"] for r in order[int(offset):int(offset) + int(limit)]]
        by_key = rows_by_key(self.get(page))
        return [by_key[k] for k in page if k in by_key]

    def _scan(self, expr: str, fields: list[str]) -> list[dict[str, Any]]:
        return [r for batch in self._batches(expr, fields, 4096) for r in batch]

    def _batches(self, expr: str, fields: list[str], size: int) -> Iterator[list[dict[str, Any]]]:
        it = self.client.query_iterator(self.collection, batch_size=size, filter=expr,
                                        output_fields=fields)
        try:
            while batch := it.next():
                yield batch
        finally:
            it.close()

    def rows(self, batch: int = 4096) -> Iterator[list[dict[str, Any]]]:
        """Every stored row with its vector, `batch` at a time (what a migration copies)."""
        if self.dim is not None:
            yield from self._batches("", ["key", *FIELDS, "vector"], batch)

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
        # Streams every row's few scalar fields; fine at gallery sizes one machine serves, and
        # cached by the service.
        for r in self._scan("", ["camera", "video", "timestamp"]):
            cams.add(r["camera"])
            vids.add(r["video"])
            t = float(r["timestamp"])
            lo = t if lo is None else min(lo, t)
            hi = t if hi is None else max(hi, t)
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


def migrate(src: GalleryStore, dst: GalleryStore, batch: int = 4096) -> int:
    """Copies every row of `src` into `dst` (keys already there are replaced); rows copied."""
    if src.dim is None:
        raise StoreError("the source gallery is empty: nothing to migrate")
    dst.open(src.dim)
    model = src.model()
    if model is not None and dst.record_model(model).get("digest") != model.get("digest"):
        raise StoreError("the target gallery records another model than the source: migrate "
                         "into a new gallery")
    copied = 0
    for rows in src.rows(batch):
        dst.upsert(rows)
        copied += len(rows)
    return copied


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def migrate_command(source: str, target: str, token: str = "", target_token: str = "",
                    thumbs_from: str | None = None, thumbs_to: str | None = None,
                    index_type: str | None = None) -> int:
    """`strongreid gallery migrate --from old.db --to new.db`: any gallery into any other
    (a Milvus Lite file into the embedded store, or the embedded store into a Milvus server);
    the thumbnails follow (hard links where the file system allows)."""
    if str(source) == str(target):
        raise StoreError("--from and --to name the same gallery")
    src = open_store(source, token=token or "", create=False)
    try:
        dst = open_store(target, token=target_token or "", index_type=index_type)
        try:
            if dst.count():
                raise StoreError(f"{target} already holds {dst.count()} rows: migrate into "
                                 "a new gallery")
            copied = migrate(src, dst)
        finally:
            dst.close()
    finally:
        src.close()
    old = thumbs_dir_for(source, thumbs_from)
    new = thumbs_dir_for(target, thumbs_to)
    if old.is_dir() and old.resolve() != new.resolve():
        shutil.copytree(old, new, copy_function=_link_or_copy, dirs_exist_ok=True)
    print(f"{copied} rows copied from {source} to {target}; thumbnails in {new}")
    return 0
