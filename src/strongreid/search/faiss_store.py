"""The embedded gallery store: rows in SQLite, vectors in an in-process faiss index.

`gallery.db` is a SQLite database (write-ahead log, a full sync per commit): one row per crop
with its metadata and its feature, so every `upsert` is durable when it returns and a crash
(kill -9) loses nothing already written. The faiss index is derived from those rows: kept in
memory, saved beside the database (`gallery.faiss`) on close, and on open loaded and caught up
with the rows written since it was saved (or rebuilt when it is missing or does not match).

Each row has a slot, its position in the index, taken from a counter that never goes back:
replacing a key writes a new row in a new slot and deletes the old row, whose slot is then
dead (a live mask leaves it out of every search). Filters (cameras, videos, a time window,
keys to leave out) are evaluated exactly on in-memory columns and applied inside the index
search (a faiss IDSelector), never after it, so a filtered top-k is not cut short; when an
approximate index cannot fill k from a narrow selection, the selection is scanned exactly.

Index types: FLAT (exact), IVF_FLAT (nlist cells, nprobe searched; an exact flat index until
the gallery holds TRAIN_PER_LIST * nlist rows to train on, then trained once on a random sample
of them; nlist 0: exact below IVF_FROM rows, then cells_for(rows) cells, trained again on a
sample of every row each time the gallery grows fourfold) and HNSW (M links, efConstruction;
ef at search). The parameters are faiss' own: they reach the index.
Other processes may read and write the same file (SQLite serialises writers); a search first
catches up with rows another process committed.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from strongreid.paths import atomic_path
from strongreid.search.store import (
    _TEXT,
    DEFAULT_INDEX_PARAMS,
    DEFAULT_SEARCH_PARAMS,
    FIELDS,
    INDEX_TYPES,
    STORES,
    Filters,
    Hit,
    StoreError,
    clean_row,
    gallery_kind,
    query_matrix,
    refuse_foreign,
    sqlite_kind,
)

logger = logging.getLogger("strongreid")

FORMAT = "strongreid-gallery-1"
# faiss' k-means wants at least 39 points per centroid; a random sample of this many per cell
# is what it trains on (more rows only cost time: 1M rows, 4096 cells, recall@10 1.000).
TRAIN_PER_LIST = 40
IVF_FROM = 40_960  # a growing IVF_FLAT (nlist 0) is exact (flat) below this many rows
EXACT_BELOW = 20_000  # a narrower filtered selection is scanned exactly
# The embedded IVF_FLAT grows its cells with the gallery (nlist 0); Milvus sets its own nlist.
INDEX_PARAMS: dict[str, dict[str, int]] = {**DEFAULT_INDEX_PARAMS, "IVF_FLAT": {"nlist": 0}}
_COLUMNS = ["key", *FIELDS]
_SQL_COLUMNS = ", ".join(f'"{c}"' for c in _COLUMNS)


_FAISS: Any = None


def _faiss() -> Any:
    # Loaded once: the loader also quietens faiss' logger, and setting a logger's level clears
    # every logger's cache, which cost more than a small search.
    global _FAISS
    if _FAISS is None:
        from strongreid.search.retrieval import _faiss as load

        _FAISS = load()
    return _FAISS


def cells_for(n: int) -> int:
    """IVF cells for an n-row gallery: the power of two nearest 4 sqrt(n) (faiss' guideline is
    4 to 16 sqrt(n)), at most n / TRAIN_PER_LIST; so the cells double each time the gallery
    grows fourfold (1024 from 40 960 rows, 2048 from 131 072, 4096 from 524 288)."""
    n = int(n)
    # log2(4 sqrt(n)) = 2 + log2(n) / 2, rounded half up, in integers: 2 + bit_length(n) // 2.
    nearest = 2 + n.bit_length() // 2
    most = max(0, (n // TRAIN_PER_LIST).bit_length() - 1)
    return 1 << min(nearest, most)


def _normalised(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norm > 0, norm, 1.0), dtype=np.float32)


@STORES.register("faiss")
class FaissStore:
    """GalleryStore over SQLite (the rows) and faiss (the index): one file, one process or many."""

    @staticmethod
    def claims(uri: str) -> bool:
        """Any local path that is not a Milvus Lite gallery (a new gallery is one of these)."""
        return "://" not in uri

    # IVF_FLAT with cells that grow with the gallery: at 1M rows recall@10 1.000 within a few
    # ms, at ingest rates HNSW's graph build cannot reach on a small machine (docs/search.md).
    default_index = "IVF_FLAT"

    def __init__(self, uri: str, *, token: str = "", index_type: str | None = None,
                 index_params: dict[str, Any] | None = None,
                 search_params: dict[str, Any] | None = None, create: bool = True) -> None:
        del token  # a local file has no server to log in to
        index_type = index_type or self.default_index
        if index_type not in INDEX_TYPES:
            raise StoreError(f"unknown index type {index_type!r}: use {', '.join(INDEX_TYPES)}")
        self.uri = str(uri)
        self.path = Path(uri)
        self.index_path = self.path.with_suffix(".faiss")
        kind = gallery_kind(self.path)
        if kind == "milvus-lite":
            raise StoreError(f"{self.path} is a Milvus Lite gallery: open it with open_store(), or "
                             f"copy it into this store with `strongreid gallery migrate --from "
                             f"{self.path} --to NEW.db`")
        refuse_foreign(self.path, kind)  # another application's file: not even opened for writing
        if not self.path.exists():
            if not create:
                raise StoreError(f"gallery {self.path} does not exist; build it with "
                                 f"`strongreid gallery ingest --gallery {self.path} ...`")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                      timeout=60)
            # 16 KiB pages hold seven 512-d rows; at the default 4 KiB one 2 KiB row takes a page.
            # (Takes effect in a new file only.)
            self.db.execute("PRAGMA page_size=16384")
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: each commit reaches the disk before upsert returns (WAL sync per commit).
            self.db.execute("PRAGMA synchronous=FULL")
            self._create_tables()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the gallery {self.path} as a strongreid gallery "
                             f"(SQLite): {exc}") from None
        self._closed = False
        self.trainings: list[dict[str, Any]] = []  # IVF trainings in this session: rows, nlist, s
        self._given = (index_type, index_params, search_params)
        self.dim: int | None = None
        self.index: Any = None
        self._data_version = -1
        self._refresh_info()

    def _refresh_info(self) -> None:
        """Reads the gallery's settings; a gallery another process created is adopted."""
        if self.dim is not None:
            return
        info = self._info()
        index_type, index_params, search_params = self._given
        self.index_type = info.get("index_type", index_type)
        # A stored gallery keeps the parameters it was built with; a new one takes the given.
        built = json.loads(info["index_params"]) if "index_params" in info else index_params
        self.index_params = {**INDEX_PARAMS[self.index_type], **dict(built or {})}
        # Search parameters are per session: the given ones, else those the gallery was built with.
        stored = json.loads(info["search_params"]) if "search_params" in info else {}
        self.search_params = {**DEFAULT_SEARCH_PARAMS[self.index_type], **stored,
                              **dict(search_params or {})}
        if "dim" in info:
            self.dim = int(info["dim"])
            self._load_index()

    # -- schema and bookkeeping ------------------------------------------------------------

    def _create_tables(self) -> None:
        cols = ", ".join(f'"{name}" {sqlite_kind(kind)} NOT NULL' for name, kind in FIELDS.items())
        self.db.executescript(f"""
            CREATE TABLE IF NOT EXISTS info (name TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS crops (
                slot INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, {cols}, vector BLOB NOT NULL);
            CREATE INDEX IF NOT EXISTS crops_time ON crops(timestamp, camera, key);
            CREATE INDEX IF NOT EXISTS crops_camera ON crops(camera, timestamp, key);
            INSERT OR IGNORE INTO info VALUES ('format', '{FORMAT}');
            INSERT OR IGNORE INTO info VALUES ('next_slot', '0');
        """)
        fmt = self._info().get("format")
        if fmt != FORMAT:
            raise StoreError(f"gallery {self.path} has format {fmt!r}; this strongreid reads "
                             f"{FORMAT!r}")

    def _info(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT name, value FROM info").fetchall())

    def open(self, dim: int) -> None:
        """Creates the gallery for `dim`-dimensional vectors, or checks the existing one."""
        with self._lock:
            self._refresh_info()
            if self.dim is not None:
                if self.dim != dim:
                    raise StoreError(
                        f"gallery {self.uri} holds {self.dim}-dimensional features but the model "
                        f"gives {dim}: ingest into a new gallery file, or use the model that "
                        "built this one")
                return
            values = {"dim": str(int(dim)), "index_type": self.index_type,
                      "index_params": json.dumps(self.index_params),
                      "search_params": json.dumps(self.search_params)}
            self.db.execute("BEGIN IMMEDIATE")
            try:
                # INSERT OR IGNORE: when another process created the gallery meanwhile, its
                # settings stand (and are checked below).
                self.db.executemany("INSERT OR IGNORE INTO info VALUES (?, ?)", values.items())
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self._refresh_info()
            if self.dim != dim:
                self.open(dim)

    def model(self) -> dict[str, Any] | None:
        """The recorded model identity (the info table's 'model' row, JSON), if any."""
        with self._lock:
            row = self.db.execute("SELECT value FROM info WHERE name = 'model'").fetchone()
        return json.loads(row[0]) if row else None

    def record_model(self, record: dict[str, Any]) -> dict[str, Any]:
        """Records the model identity unless one is recorded (one atomic INSERT OR IGNORE: of
        two processes recording at once, the first wins); returns the one recorded."""
        with self._lock:
            self.db.execute("INSERT OR IGNORE INTO info VALUES ('model', ?)",
                            (json.dumps(record, sort_keys=True),))
        return self.model() or record

    def _need(self) -> None:
        self._refresh_info()
        if self.dim is None:
            raise StoreError(f"gallery {self.uri} is empty: ingest images or videos into it first "
                             "with `strongreid gallery ingest`")

    # -- the index -------------------------------------------------------------------------

    def _new_index(self, flat: bool = False) -> Any:
        faiss = _faiss()
        p = self.index_params
        if self.index_type == "HNSW" and not flat:
            index = faiss.IndexHNSWFlat(self.dim, int(p["M"]), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(p["efConstruction"])
            return index
        # IVF_FLAT starts flat (exact) and is trained once enough rows exist (_maybe_train).
        return faiss.IndexFlatIP(self.dim)

    def _trained_ivf(self) -> bool:
        return self.index_type == "IVF_FLAT" and "IVF" in type(self.index).__name__

    def _load_index(self) -> None:
        """The saved index if it matches the rows, caught up; else one built from the rows."""
        faiss = _faiss()
        self.index = None
        if self.index_path.is_file():
            try:
                index = faiss.read_index(str(self.index_path))
                next_slot = int(self._info()["next_slot"])
                if index.d == self.dim and index.ntotal <= next_slot:
                    self.index = index
                    if self._trained_ivf():
                        faiss.extract_index_ivf(index).set_direct_map_type(faiss.DirectMap.Array)
            except RuntimeError as exc:
                logger.warning("rebuilding the index of %s: %s does not load (%s)", self.path,
                               self.index_path, exc)
        if self.index is None:
            self.index = self._new_index()
        self._slots = 0
        self._grow(0)
        self._reload_columns()
        self._catch_up()

    def _grow(self, n: int) -> None:
        """Makes the per-slot columns hold at least n slots."""
        cap = len(getattr(self, "_live", ()))
        if n <= cap and cap:
            return
        size = max(1024, n, 2 * cap)
        for name, dtype in (("_live", bool), ("_cam", np.int32), ("_vid", np.int32),
                            ("_time", np.float64)):
            old = getattr(self, name, np.zeros(0, dtype))
            new = np.zeros(size, dtype)
            new[:len(old)] = old
            setattr(self, name, new)

    def _code(self, table: dict[str, int], names: list[str], value: str) -> int:
        code = table.get(value)
        if code is None:
            code = table[value] = len(names)
            names.append(value)
        return code

    def _reload_columns(self) -> None:
        """The live mask and the filter columns of every stored row, from SQLite."""
        self._cams: dict[str, int] = {}
        self._cam_names: list[str] = []
        self._vids: dict[str, int] = {}
        self._vid_names: list[str] = []
        self._live[:] = False
        self._data_version = self._version()
        cur = self.db.execute("SELECT slot, camera, video, timestamp FROM crops")
        while chunk := cur.fetchmany(65536):
            slots = np.fromiter((r[0] for r in chunk), np.int64, len(chunk))
            self._grow(int(slots.max()) + 1)
            self._set_columns(slots, [r[1] for r in chunk], [r[2] for r in chunk],
                              [r[3] for r in chunk])
        self._n_live = int(self._live.sum())

    def _set_columns(self, slots: np.ndarray, cams: list[str], vids: list[str],
                     times: list[float]) -> None:
        self._live[slots] = True
        self._cam[slots] = [self._code(self._cams, self._cam_names, c) for c in cams]
        self._vid[slots] = [self._code(self._vids, self._vid_names, v) for v in vids]
        self._time[slots] = times

    def _version(self) -> int:
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def _catch_up(self) -> None:
        """Adds the rows the index does not hold yet (written since it was saved, or by another
        process), slot by slot; slots whose rows are gone get a zero placeholder."""
        start = self.index.ntotal
        next_slot = int(self._info()["next_slot"])
        self._grow(next_slot)
        step = 16384
        for lo in range(start, next_slot, step):
            hi = min(lo + step, next_slot)
            block = np.zeros((hi - lo, self.dim), np.float32)
            rows = self.db.execute("SELECT slot, vector, camera, video, timestamp FROM crops "
                                   "WHERE slot >= ? AND slot < ?", (lo, hi)).fetchall()
            for r in rows:
                block[r[0] - lo] = np.frombuffer(r[1], np.float32)
            if rows:
                self._set_columns(np.array([r[0] for r in rows]), [r[2] for r in rows],
                                  [r[3] for r in rows], [r[4] for r in rows])
            self._add(block)
        self._slots = next_slot
        self._n_live = int(self._live.sum())

    def _add(self, vectors: np.ndarray) -> None:
        self.index.add(_normalised(vectors))
        self._maybe_train()

    def _maybe_train(self) -> None:
        """IVF_FLAT: trains the cells once enough rows exist, and (nlist 0) trains them again,
        with more cells, each time the gallery has grown enough for its size to ask for more."""
        if self.index_type != "IVF_FLAT":
            return
        n = self.index.ntotal
        nlist = int(self.index_params["nlist"])
        if nlist == 0:  # grows with the gallery (its live rows: replaced ones are not trained on)
            live = int(self._live[:n].sum())
            if live < IVF_FROM:
                return
            nlist = cells_for(live)
            if self._trained_ivf() and self.index.nlist >= nlist:
                return
        elif self._trained_ivf() or n < TRAIN_PER_LIST * nlist:
            return
        self._train(nlist)

    def _train(self, nlist: int) -> None:
        """Replaces the index by an IVF of `nlist` cells trained on a random sample of every
        live row (not the first rows: a gallery fills camera by camera, day by day), every
        slot moved in."""
        faiss = _faiss()
        t0 = time.perf_counter()
        n = self.index.ntotal
        live = np.flatnonzero(self._live[:n])
        if not len(live):
            return
        rng = np.random.default_rng(n)
        sample = self._vectors(np.sort(rng.choice(live, min(len(live), TRAIN_PER_LIST * nlist),
                                                  replace=False)))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist,
                                 faiss.METRIC_INNER_PRODUCT)
        # One level of k-means over every cell. Two levels (sqrt(nlist) groups, then cells
        # within each) trained 8192 cells in 46 s instead of 131 s at 1M rows, but recall@10
        # fell from 1.000 to 0.52 at nprobe 32 on the benchmark's gallery: 64 coarse groups
        # cut through what the fine cells should keep together (a person's views from other
        # cameras ended in cells the query's nprobe did not reach).
        ivf.train(sample)
        # An array direct map (slot -> list entry) lets narrow selections be scanned exactly.
        ivf.set_direct_map_type(faiss.DirectMap.Array)
        for lo in range(0, n, 65536):  # in slot order: slot i stays entry i
            ivf.add(self._vectors(np.arange(lo, min(n, lo + 65536))))
        self.index = ivf
        self.trainings.append({"rows": n, "nlist": nlist,
                               "seconds": round(time.perf_counter() - t0, 2)})
        logger.info("%s: %d IVF cells trained on %d of %d rows in %.1f s", self.path, nlist,
                    len(sample), n, time.perf_counter() - t0)

    def _sync(self) -> None:
        """Catches up with what other processes committed since this one last looked."""
        if self._version() == self._data_version:
            return
        if int(self._info()["next_slot"]) > self.index.ntotal:
            self._catch_up()
        count = int(self.db.execute("SELECT count(*) FROM crops").fetchone()[0])
        if count != self._n_live or self._slots != self.index.ntotal:
            self._reload_columns()
        self._data_version = self._version()

    def save_index(self) -> None:
        """Writes the index beside the database (atomically), so the next open need not rebuild."""
        with self._lock:
            if self.index is None:
                return
            with atomic_path(self.index_path) as tmp:
                _faiss().write_index(self.index, str(tmp))

    # -- writing ---------------------------------------------------------------------------

    def upsert(self, rows: list[dict[str, Any]]) -> None:
        """Writes rows (key, vector and every FIELDS entry), durably; a stored key is replaced."""
        self._need()
        if not rows:
            return
        last: dict[str, dict[str, Any]] = {}
        for r in rows:  # the same key twice in one call: the last one wins
            last[r["key"]] = r
        clean = [clean_row(r) for r in last.values()]
        vectors = np.stack([np.asarray(r["vector"], np.float32).reshape(-1) for r in last.values()])
        if vectors.shape[1] != self.dim:
            raise StoreError(f"rows have {vectors.shape[1]}-dimensional vectors; the gallery "
                             f"{self.uri} holds {self.dim}")
        if not np.isfinite(vectors).all():
            raise StoreError("a row's vector has NaN or infinite values; nothing was written")
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                first = int(self.db.execute(
                    "SELECT value FROM info WHERE name = 'next_slot'").fetchone()[0])
                keys = list(last)
                dead: list[int] = []
                for i in range(0, len(keys), 500):
                    chunk = keys[i:i + 500]
                    dead += [r[0] for r in self.db.execute(
                        f"DELETE FROM crops WHERE key IN ({','.join('?' * len(chunk))}) "
                        "RETURNING slot", chunk)]
                marks = ", ".join("?" * (len(_COLUMNS) + 2))
                self.db.executemany(
                    f"INSERT INTO crops (slot, {_SQL_COLUMNS}, vector) VALUES ({marks})",
                    [(first + i, *(r[c] for c in _COLUMNS), vectors[i].tobytes())
                     for i, r in enumerate(clean)])
                self.db.execute("UPDATE info SET value = ? WHERE name = 'next_slot'",
                                (str(first + len(clean)),))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            # The rows are durable; the index follows (from SQLite if another process wrote).
            if self.index.ntotal != first or self._slots != first:
                self._data_version = -1
                self._sync()
                return
            self._grow(first + len(clean))
            self._live[dead] = False  # the replaced keys' old slots
            slots = np.arange(first, first + len(clean))
            self._set_columns(slots, [r["camera"] for r in clean], [r["video"] for r in clean],
                              [r["timestamp"] for r in clean])
            self._add(vectors)
            self._slots = first + len(clean)
            self._n_live = int(self._live.sum())
            self._data_version = self._version()

    # -- reading ---------------------------------------------------------------------------

    def existing(self, keys: Sequence[str]) -> set[str]:
        """The keys among `keys` already stored (what a resumed ingest skips)."""
        found: set[str] = set()
        keys = list(keys)
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                found.update(r[0] for r in self.db.execute(
                    f"SELECT key FROM crops WHERE key IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def _rows(self, where: str, args: Sequence[Any], with_vectors: bool,
              tail: str = "") -> list[dict[str, Any]]:
        cols = _SQL_COLUMNS + (", vector" if with_vectors else "") + ", slot"
        out = []
        for r in self.db.execute(f"SELECT {cols} FROM crops {where} {tail}", list(args)):
            row = dict(zip(_COLUMNS, r))
            if with_vectors:
                row["vector"] = np.frombuffer(r[len(_COLUMNS)], np.float32).tolist()
            row["slot"] = r[-1]
            out.append(row)
        return out

    def get(self, keys: Sequence[str], with_vectors: bool = False) -> list[dict[str, Any]]:
        """The stored rows of `keys` (unknown keys are left out), in no particular order."""
        out: list[dict[str, Any]] = []
        keys = list(keys)
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                out += self._rows(f"WHERE key IN ({','.join('?' * len(chunk))})", chunk,
                                  with_vectors)
        for r in out:
            del r["slot"]
        return out

    def browse(self, limit: int, offset: int = 0, filters: Filters | None = None) -> list[dict]:
        """Rows in time order (ties by camera, then key): every row once across pages."""
        where, args = _where(filters or Filters())
        with self._lock:
            rows = self._rows(where, [*args, int(limit), int(offset)], False,
                              "ORDER BY timestamp, camera, key LIMIT ? OFFSET ?")
        for r in rows:
            del r["slot"]
        return rows

    def count(self) -> int:
        """Rows stored."""
        with self._lock:
            return int(self.db.execute("SELECT count(*) FROM crops").fetchone()[0])

    def facets(self) -> dict[str, Any]:
        """Cameras and videos present and the time range: what the page offers as filters."""
        with self._lock:
            self._refresh_info()
            if self.dim is None:
                return {"cameras": [], "videos": [], "start": None, "end": None}
            self._sync()
            live = self._live[:self._slots]
            if not live.any():
                return {"cameras": [], "videos": [], "start": None, "end": None}
            cams = sorted(self._cam_names[c] for c in np.unique(self._cam[:self._slots][live]))
            vids = sorted(self._vid_names[v] for v in np.unique(self._vid[:self._slots][live]))
            times = self._time[:self._slots][live]
            return {"cameras": cams, "videos": [v for v in vids if v],
                    "start": float(times.min()), "end": float(times.max())}

    def rows(self, batch: int = 4096) -> Iterator[list[dict[str, Any]]]:
        """Every stored row with its vector, in slot (write) order, `batch` at a time."""
        last = -1
        while True:
            with self._lock:
                rows = self._rows("WHERE slot > ?", [last, int(batch)], True,
                                  "ORDER BY slot LIMIT ?")
            if not rows:
                return
            last = rows[-1]["slot"]
            for r in rows:
                del r["slot"]
            yield rows

    # -- search ----------------------------------------------------------------------------

    def _mask(self, filters: Filters) -> np.ndarray | None:
        """Which slots a search may return (None: every slot)."""
        n = self._slots
        restricted = (filters.cameras or filters.videos or filters.start is not None
                      or filters.end is not None or filters.exclude_keys
                      or self._n_live != n)
        if not restricted:
            return None
        mask = self._live[:n].copy()
        if filters.cameras:
            codes = [self._cams[c] for c in filters.cameras if c in self._cams]
            mask &= np.isin(self._cam[:n], codes)
        if filters.videos:
            codes = [self._vids[v] for v in filters.videos if v in self._vids]
            mask &= np.isin(self._vid[:n], codes)
        if filters.start is not None:
            mask &= self._time[:n] >= _finite(filters.start)
        if filters.end is not None:
            mask &= self._time[:n] <= _finite(filters.end)
        if filters.exclude_keys:
            keys = list(filters.exclude_keys)
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                for (slot,) in self.db.execute(
                        f"SELECT slot FROM crops WHERE key IN ({','.join('?' * len(chunk))})", chunk):
                    mask[slot] = False
        return mask

    def _params(self, selector: Any = None) -> Any:
        faiss = _faiss()
        if self.index_type == "HNSW":
            return faiss.SearchParametersHNSW(efSearch=int(self.search_params["ef"]), sel=selector)
        if self._trained_ivf():
            return faiss.SearchParametersIVF(nprobe=int(self.search_params["nprobe"]), sel=selector)
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    def _vectors(self, slots: np.ndarray) -> np.ndarray:
        """The indexed (normalised) vectors of `slots`."""
        faiss = _faiss()
        flat = self.index.storage if self.index_type == "HNSW" else self.index
        if isinstance(flat, faiss.IndexFlat):  # contiguous storage: read it in place
            n = flat.ntotal
            xb = faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim)
            return xb[slots]
        return self.index.reconstruct_batch(slots)

    def _exact(self, q: np.ndarray, k: int, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of the given slots (a narrow selection an ANN index cannot fill)."""
        best_s = np.full((len(q), 0), -np.inf, np.float32)
        best_i = np.zeros((len(q), 0), np.int64)
        for lo in range(0, len(slots), 65536):
            part = slots[lo:lo + 65536]
            s = q @ self._vectors(part).T
            best_s = np.concatenate([best_s, s], axis=1)
            best_i = np.concatenate([best_i, np.broadcast_to(part, s.shape)], axis=1)
            keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
            best_s = np.take_along_axis(best_s, keep, 1)
            best_i = np.take_along_axis(best_i, keep, 1)
        return best_s, best_i

    def _scan(self, q: np.ndarray, k: int, mask: np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over a flat index's storage, read in place (one BLAS product: faster
        than faiss' one-query flat search here)."""
        faiss = _faiss()
        n = self.index.ntotal
        xb = faiss.rev_swig_ptr(self.index.get_xb(), n * self.dim).reshape(n, self.dim)
        sims = q @ xb.T
        if mask is not None:
            sims[:, ~mask] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < n else \
            np.broadcast_to(np.arange(n), sims.shape)
        top_s = np.take_along_axis(sims, top, 1)
        order = np.lexsort((top, -top_s), axis=1)  # by score, ties by slot
        return np.take_along_axis(top_s, order, 1), np.take_along_axis(top, order, 1)

    def search(self, vectors: np.ndarray, k: int, filters: Filters | None = None,
               with_vectors: bool = False) -> list[list[Hit]]:
        """Top-k rows by cosine similarity for each query vector, within `filters`."""
        self._need()
        q = _normalised(query_matrix(vectors, self.dim))
        k = int(k)
        with self._lock:
            self._sync()
            mask = self._mask(filters or Filters())
            allowed = self._slots if mask is None else int(mask.sum())
            want = min(k, allowed)
            if want <= 0:
                return [[] for _ in q]
            if isinstance(self.index, _faiss().IndexFlat):  # FLAT, or IVF_FLAT not trained yet
                scores, slots = self._scan(q, want, mask)
            elif mask is not None and allowed <= EXACT_BELOW:
                scores, slots = self._exact(q, want, np.flatnonzero(mask))
            else:
                selector = None
                if mask is not None:
                    selector = _faiss().IDSelectorBitmap(np.packbits(mask, bitorder="little"))
                scores, slots = self.index.search(q, want, params=self._params(selector))
                short = (slots < 0).any(axis=1)
                if short.any():  # an ANN walk that met too few allowed rows: scan them exactly
                    pick = np.flatnonzero(mask) if mask is not None else \
                        np.arange(self._slots)
                    s2, i2 = self._exact(q[short], want, pick)
                    scores, slots = scores.copy(), slots.copy()
                    scores[short], slots[short] = s2, i2
            found = self._rows(f"WHERE slot IN ({','.join('?' * slots.size)})",
                               [int(s) for s in slots.ravel()], with_vectors)
        by_slot = {r.pop("slot"): r for r in found}
        return [[Hit(by_slot[s]["key"], float(sc), _meta(by_slot[s]))
                 for s, sc in zip(row_i.tolist(), row_s.tolist()) if s in by_slot]
                for row_s, row_i in zip(scores, slots)]

    # -- closing ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Rows are durable at each upsert already; this saves the index too."""
        self.save_index()

    def close(self) -> None:
        """Saves the index and closes the database (other processes may keep using it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self.dim is not None and self.index is not None:
                    self._sync()
                    self.save_index()
            finally:
                self.db.close()


def read_info(path: str | os.PathLike) -> dict[str, str]:
    """A gallery file's settings (its info table: format, dim, model...), read only: without
    opening the store (no index is loaded)."""
    try:
        con = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
        try:
            return dict(con.execute("SELECT name, value FROM info").fetchall())
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"cannot read the gallery {path}: {exc}") from None


def _meta(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "key"}


def _finite(x: float) -> float:
    x = float(x)
    if not np.isfinite(x):
        raise StoreError(f"time filter {x} must be a finite number of seconds")
    return x


def _where(filters: Filters) -> tuple[str, list[Any]]:
    """A parameterised SQL WHERE clause for `filters` (values are bound, never spliced)."""
    parts: list[str] = []
    args: list[Any] = []
    for column, values in (("camera", filters.cameras), ("video", filters.videos)):
        if values:
            parts.append(f"{column} IN ({','.join('?' * len(values))})")
            args += [str(v)[:_TEXT] for v in values]
    if filters.start is not None:
        parts.append("timestamp >= ?")
        args.append(_finite(filters.start))
    if filters.end is not None:
        parts.append("timestamp <= ?")
        args.append(_finite(filters.end))
    if filters.exclude_keys:
        parts.append(f"key NOT IN ({','.join('?' * len(filters.exclude_keys))})")
        args += list(filters.exclude_keys)
    return ("WHERE " + " AND ".join(parts)) if parts else "", args
