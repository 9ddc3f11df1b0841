"""`strongreid serve`: the gallery behind a FastAPI app, a JSON API and one page.

    GET  /                 the search page (static HTML + app.js; every value is set as text)
    GET  /api/info         gallery size, cameras, videos, time range, model
    GET  /api/gallery      stored crops in time order (limit, offset, camera): thumbnails to click
    GET  /api/items/{key}  one stored crop's metadata
    POST /api/search       multipart: `image` (an uploaded crop) or `key` (a stored crop), and
                           k, cameras (comma-separated), start / end (seconds or ISO-8601),
                           rerank (k-reciprocal over the top `pool`), exclude_camera
    GET  /thumbs/{key}.jpg a thumbnail; any other name (../, absolute, %2e%2e) is a 404
    GET  /docs, /openapi.json   the API, documented by FastAPI

Uploads: at most `max_upload` bytes (413 beyond), decoded by Pillow only as JPEG / PNG / BMP /
WebP of at most MAX_PIXELS pixels; anything else is a 400 with a message. Thumbnails are
served by key only: the path is built from a 40-hex-digit key, never from the request.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np

# At module level: FastAPI resolves the endpoints' (string) annotations in these globals.
from fastapi import File, Form, UploadFile
from PIL import Image

from strongreid.deploy.extractor import FeatureExtractor
from strongreid.errors import StrongReIDError
from strongreid.evaluation.reranking import re_ranking
from strongreid.search.ingest import parse_time, thumb_path
from strongreid.search.store import (
    KEY_RE,
    Filters,
    GalleryStore,
    Hit,
    MilvusStore,
    StoreError,
    thumbs_dir_for,
)

logger = logging.getLogger("strongreid")

MAX_UPLOAD = 5 * 1024 * 1024
MAX_PIXELS = 4096 * 4096
MAX_K = 200
RERANK_POOL = 100
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP")
_THUMB_NAME = re.compile(r"^([0-9a-f]{40})\.jpg$")
_STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


class BadRequest(StrongReIDError):
    """A request the client can fix: the message says how (sent back with its HTTP status)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, max_bytes: int = MAX_UPLOAD) -> Image.Image:
    """An uploaded crop as an RGB image, or BadRequest (413 too large, 400 not an image)."""
    if len(data) > max_bytes:
        raise BadRequest(f"the upload is {len(data)} bytes; the limit is {max_bytes}", 413)
    if not data:
        raise BadRequest("the upload is empty: send a JPEG, PNG, BMP or WebP crop")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        if fmt not in IMAGE_FORMATS:
            raise BadRequest(f"the upload is a {fmt} image; send JPEG, PNG, BMP or WebP")
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise BadRequest(f"the image is {w}x{h}; at most {MAX_PIXELS} pixels are accepted", 413)
        img.load()
        return img.convert("RGB")
    except BadRequest:
        raise
    except Image.DecompressionBombError:
        raise BadRequest(f"the image has more than {MAX_PIXELS} pixels; at most {MAX_PIXELS} "
                         "pixels are accepted", 413) from None
    except (OSError, SyntaxError, ValueError):
        raise BadRequest("the upload is not an image that can be decoded (JPEG, PNG, BMP or "
                         "WebP expected)") from None


def iso(t: float) -> str:
    """Unix seconds as ISO-8601 UTC (times before 2000 are shown as offsets in seconds)."""
    if t < 946_684_800:
        return f"+{t:.2f}s"
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def hit_json(key: str, meta: dict[str, Any], score: float | None = None) -> dict[str, Any]:
    """What the API says about one stored crop."""
    out = {
        "key": key, "camera": meta.get("camera", ""), "video": meta.get("video", ""),
        "source": meta.get("source", ""), "frame": int(meta.get("frame", -1)),
        "timestamp": float(meta.get("timestamp", 0.0)), "time": iso(float(meta.get("timestamp", 0))),
        "box": [int(meta.get(k, -1)) for k in ("left", "top", "width", "height")],
        "track": int(meta.get("track", -1)), "pid": int(meta.get("pid", -1)),
        "thumb": f"/thumbs/{key}.jpg",
    }
    if score is not None:
        out["score"] = round(float(score), 6)
    return out


def group_by_camera(hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The timeline: one row per camera (best camera first), its hits in time order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for h in hits:
        groups.setdefault(h["camera"], []).append(h)
    rows = [{"camera": cam, "best": max(h["score"] for h in hs),
             "hits": sorted(hs, key=lambda h: (h["timestamp"], -h["score"]))}
            for cam, hs in groups.items()]
    return sorted(rows, key=lambda r: (-r["best"], r["camera"]))


def rerank(query: np.ndarray, hits: list[Hit]) -> list[tuple[Hit, float]]:
    """k-reciprocal re-ranking (Zhong et al.) of the candidates: (hit, re-ranked distance)."""

    g = np.stack([np.asarray(h.meta["vector"], np.float32) for h in hits])
    n = len(hits)
    k1 = max(1, min(20, n - 1))
    k2 = max(1, min(6, k1))
    dist = re_ranking(query[None, :].astype(np.float32), g, k1=k1, k2=k2, lambda_value=0.3)[0]
    order = np.argsort(dist, kind="stable")
    return [(hits[i], float(dist[i])) for i in order]


class SearchService:
    """The gallery, the model and the thumbnails behind the app (usable without HTTP)."""

    def __init__(self, store: GalleryStore, embed: Any, thumbs: str | Path,
                 model_name: str = "") -> None:
        self.store, self.embed, self.thumbs = store, embed, Path(thumbs)
        self.model_name = model_name
        # One forward pass at a time: torch's CPU kernels are parallel already, and a queue
        # bounds memory under load; the store's client is thread-safe.
        self._model_lock = threading.Lock()
        self._facets: dict[str, Any] | None = None
        self._facets_at = 0.0

    def facets(self) -> dict[str, Any]:
        """Cameras / videos / time range, recomputed at most every 10 s (an ingest may run)."""
        if self._facets is None or time.monotonic() - self._facets_at > 10:
            self._facets, self._facets_at = self.store.facets(), time.monotonic()
        return self._facets

    def info(self) -> dict[str, Any]:
        f = self.facets()
        return {"count": self.store.count(), "dim": self.store.dim, "model": self.model_name,
                "cameras": f["cameras"], "videos": f["videos"], "start": f["start"],
                "end": f["end"], "max_upload": MAX_UPLOAD, "max_k": MAX_K}

    def query_vector(self, image: Image.Image | None, key: str | None) -> tuple[np.ndarray, dict]:
        """The query's feature and what it is (an upload or a stored crop)."""
        if key:
            if not KEY_RE.match(key):
                raise BadRequest("key must be a gallery key (40 hexadecimal digits)", 404)
            rows = self.store.get([key], with_vectors=True)
            if not rows:
                raise BadRequest(f"no stored crop has the key {key}", 404)
            row = rows[0]
            return np.asarray(row["vector"], np.float32), {"kind": "key", **hit_json(key, row)}
        if image is None:
            raise BadRequest("send an image (multipart field 'image') or a stored crop's 'key'")
        with self._model_lock:
            feat = np.asarray(self.embed([image]), np.float32)[0]
        return feat, {"kind": "upload", "size": list(image.size)}

    def search(self, image: Image.Image | None = None, key: str | None = None, *, k: int = 20,
               filters: Filters | None = None, exclude_camera: bool = False,
               use_rerank: bool = False, pool: int = RERANK_POOL) -> dict[str, Any]:
        """Top-k across cameras, grouped per camera on a timeline."""
        t0 = time.perf_counter()
        if not 1 <= k <= MAX_K:
            raise BadRequest(f"k must be between 1 and {MAX_K}, got {k}")
        if self.store.dim is None:
            raise BadRequest("the gallery is empty: ingest crops or videos first", 409)
        vec, query = self.query_vector(image, key)
        filters = filters or Filters()
        if key:
            filters.exclude_keys = [*filters.exclude_keys, key]
            if exclude_camera and query["camera"]:
                others = [c for c in (filters.cameras or self.facets()["cameras"])
                          if c != query["camera"]]
                if not others:
                    return self._answer(query, [], filters, use_rerank, t0)
                filters.cameras = others
        limit = max(k, pool) if use_rerank else k
        hits = self.store.search(vec, limit, filters, with_vectors=use_rerank)[0]
        if use_rerank and len(hits) > 1:
            ranked = rerank(vec, hits)[:k]
            out = [{**hit_json(h.key, h.meta, h.score), "rerank_distance": round(d, 6)}
                   for h, d in ranked]
        else:
            out = [hit_json(h.key, h.meta, h.score) for h in hits[:k]]
        return self._answer(query, out, filters, use_rerank, t0)

    @staticmethod
    def _answer(query: dict, hits: list[dict], filters: Filters, reranked: bool,
                t0: float) -> dict[str, Any]:
        return {"query": query, "hits": hits, "timeline": group_by_camera(hits),
                "filters": {k: v for k, v in asdict(filters).items() if k != "exclude_keys"},
                "reranked": reranked, "took_ms": round((time.perf_counter() - t0) * 1000, 2)}


def _filters(cameras: str, videos: str, start: str, end: str) -> Filters:
    def split(s: str) -> list[str]:
        return [x.strip() for x in s.split(",") if x.strip()]

    try:
        return Filters(cameras=split(cameras), videos=split(videos),
                       start=parse_time(start, "start") if start.strip() else None,
                       end=parse_time(end, "end") if end.strip() else None)
    except StrongReIDError as exc:
        raise BadRequest(str(exc)) from None


def create_app(service: SearchService, max_upload: int = MAX_UPLOAD) -> Any:
    """The FastAPI app over `service`."""
    from fastapi import FastAPI, Query, Request
    from fastapi.responses import FileResponse, JSONResponse, Response

    app = FastAPI(title="strongreid gallery search", version="1",
                  description="Search a gallery of person crops across cameras.")
    page = resources.files("strongreid.search").joinpath("static")

    @app.exception_handler(BadRequest)
    async def _bad(_request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(StoreError)
    async def _store(_request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        # Refuse an oversized body before the multipart parser spools it to disk.
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_upload + 65536):
            return JSONResponse({"detail": f"the request is larger than the {max_upload}-byte "
                                 "upload limit"}, status_code=413)
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return Response(page.joinpath("index.html").read_bytes(), media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in _STATIC:
            return JSONResponse({"detail": "not found"}, status_code=404)
        return Response(page.joinpath(name).read_bytes(), media_type=_STATIC[name])

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        """Gallery size, cameras, videos, time range and the limits."""
        return service.info()

    @app.get("/api/gallery")
    def gallery(limit: int = Query(60, ge=1, le=500), offset: int = Query(0, ge=0, le=100_000),
                camera: str = "") -> dict[str, Any]:
        """Stored crops in time order: the thumbnails the page offers as queries."""
        rows = service.store.browse(limit, offset, _filters(camera, "", "", ""))
        return {"items": [hit_json(r["key"], r) for r in rows], "offset": offset}

    @app.get("/api/items/{key}")
    def item(key: str) -> dict[str, Any]:
        """One stored crop's metadata."""
        if not KEY_RE.match(key):
            raise BadRequest("not a gallery key", 404)
        rows = service.store.get([key])
        if not rows:
            raise BadRequest(f"no stored crop has the key {key}", 404)
        return hit_json(key, rows[0])

    @app.post("/api/search")
    async def search(image: Annotated[UploadFile | None, File()] = None,
                     key: Annotated[str, Form()] = "", k: Annotated[int, Form()] = 20,
                     cameras: Annotated[str, Form()] = "", videos: Annotated[str, Form()] = "",
                     start: Annotated[str, Form()] = "", end: Annotated[str, Form()] = "",
                     rerank: Annotated[bool, Form()] = False,
                     exclude_camera: Annotated[bool, Form()] = False,
                     pool: Annotated[int, Form(ge=2, le=1000)] = RERANK_POOL) -> dict[str, Any]:
        """Top-k across cameras for an uploaded crop or a stored one, grouped per camera."""
        from starlette.concurrency import run_in_threadpool

        img = None
        if image is not None and not key:
            data = await image.read(max_upload + 1)
            img = decode_upload(data, max_upload)
        filters = _filters(cameras, videos, start, end)
        return await run_in_threadpool(service.search, img, key or None, k=k, filters=filters,
                                       exclude_camera=exclude_camera, use_rerank=rerank, pool=pool)

    @app.get("/thumbs/{name:path}", include_in_schema=False)
    def thumb(name: str) -> Response:
        m = _THUMB_NAME.match(name)
        path = thumb_path(service.thumbs, m.group(1)) if m else None
        if path is None or not path.is_file():
            return JSONResponse({"detail": "not found"}, status_code=404)
        return FileResponse(path, media_type="image/jpeg",
                            headers={"Cache-Control": "public, max-age=86400, immutable"})

    return app


def serve_command(gallery: str, model: str, config: str | None = None, device: str = "auto",
                  token: str = "", thumbs: str | None = None, host: str = "127.0.0.1",
                  port: int = 8000, max_upload: int = 5 * 1024 * 1024) -> int:
    """`strongreid serve --gallery gallery.db --model best.pt` (127.0.0.1:8000 by default)."""
    import uvicorn

    # faiss (imported on the way by the evaluation package) announces its SIMD build at INFO.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    store = MilvusStore(gallery, token=token or "", create=False)
    extractor = FeatureExtractor(config, model, device=device)
    if store.dim is not None and store.dim != extractor.feat_dim:
        raise StoreError(f"the gallery {gallery} holds {store.dim}-dimensional features but "
                         f"{model} gives {extractor.feat_dim}: serve it with the model that "
                         "built it")
    service = SearchService(store, extractor, thumbs_dir_for(gallery, thumbs), model_name=str(model))
    app = create_app(service, max_upload=max_upload)
    print(f"serving {store.count()} crops of {gallery} on http://{host}:{port}/ "
          "(Ctrl-C stops)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        store.close()
    return 0
