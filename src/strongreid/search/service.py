"""`strongreid serve`: the gallery behind a FastAPI app, a JSON API and one page.

    GET  /                 the search page (static HTML + app.js; every value is set as text)
    POST /api/login        a token typed into the page -> a session cookie (security.py)
    GET  /api/info         gallery size, cameras, videos, time range, model, limits
    GET  /api/gallery      stored crops in time order (limit, offset, camera): thumbnails to click
    GET  /api/items/{key}  one stored crop's metadata
    POST /api/search       multipart: `image` (an uploaded crop) or `key` (a stored crop), and
                           k, cameras (comma-separated), start / end (seconds or ISO-8601),
                           rerank (k-reciprocal over the top `pool`), exclude_camera,
                           precision (with a calibration: each hit's P(same person)
                           and whether it passes the threshold of that precision);
                           or the crop itself as the body (Content-Type image/...), the
                           same parameters in the query string (RawUploads)
    POST /api/ingest       footage under --ingest-root, added while serving -> a job id
    GET  /api/ingest/{id}  that job's progress
    GET  /thumbs/{key}.jpg a thumbnail; any other name (../, absolute, %2e%2e) is a 404
    GET  /openapi.json     the API, described by FastAPI (no /docs: Swagger UI would come
                           from a CDN, which the page's Content-Security-Policy forbids)

Every request passes security.Guard first (Host allow-list, tokens, body limit). Uploads: at
most `max_upload` bytes (413 beyond, counted while a chunked body arrives), decoded by Pillow
only as JPEG / MPO / PNG / BMP / WebP of at most MAX_PIXELS pixels, a few at a time
(max_decodes), shrunk to QUERY_SIDE and turned upright by their EXIF orientation at once, so
that what waits for the model is small. Concurrent uploads share forward passes (Batcher),
run on onnxruntime (OnnxFeatures) or as a traced graph (TracedFeatures), either of which leaves
the event loop free while it computes (`--runtime`).

Same person. With the model's calibration (`strongreid calibrate` writes it beside the model;
`--calibration FILE` names another) every hit carries `probability`, P(same person | score),
and `same_person`, whether its score reaches the threshold of the requested precision (on the
calibration pairs); `/api/info` lists the precisions the calibration reaches. Without one the
answers are as they always were, and asking for a precision is a 409 that says how to calibrate.
"""

from __future__ import annotations

import abc
import io
import itertools
import logging
import math
import os
import re
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import uvicorn

# At module level: FastAPI resolves the endpoints' (string) annotations in these globals.
from fastapi import Body, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from PIL import Image
from uvicorn.config import STARTUP_FAILURE

from strongreid.deploy.extractor import FeatureExtractor
from strongreid.engine.inference import test_feature
from strongreid.errors import StrongReIDError
from strongreid.evaluation.calibration import Calibration, calibration_path, check_people
from strongreid.evaluation.reranking import re_ranking
from strongreid.search import security
from strongreid.search.ingest import parse_time, thumb_path
from strongreid.search.model_identity import check_serve, model_identity, unrecorded_warning
from strongreid.search.store import (
    Filters,
    GalleryStore,
    Hit,
    MilvusStore,
    StoreError,
    gallery_kind,
    is_local,
    is_milvus_lite,
    open_store,
    thumbs_dir_for,
)

logger = logging.getLogger("strongreid")

MAX_UPLOAD = 5 * 1024 * 1024
MAX_PIXELS = 4096 * 4096
QUERY_SIDE = 768  # longest side of a decoded query: ReID models see 256 or 384 pixels at most
MAX_THUMB_BYTES = 4 * 1024 * 1024
MAX_K = 200
RERANK_POOL = 100
# The precisions the page offers, where the calibration reaches them; any other in (0, 1) that
# it reaches may be asked for over the API.
PRECISIONS = (0.8, 0.9, 0.95, 0.99)
DEFAULT_PRECISION = 0.95
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "WEBP")
# fullmatch only: `$` would also accept a trailing newline.
KEY = re.compile(r"[0-9a-f]{40}")
_THUMB_NAME = re.compile(r"([0-9a-f]{40})\.jpg")
_STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
# EXIF orientation -> the transpose that makes the picture upright (what ImageOps.exif_transpose
# does; applied here after shrinking, so the copy it makes is small).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


class BadRequest(StrongReIDError):
    """A request the client can fix: the message says how (sent back with its HTTP status)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, max_bytes: int = MAX_UPLOAD, max_side: int = QUERY_SIDE
                  ) -> Image.Image:
    """An uploaded crop as an upright RGB image of at most `max_side` pixels a side.

    BadRequest: 413 too large (bytes, or pixels read from the header before decoding), 400 not
    an image. A multi-picture JPEG (MPO, what phones save) gives its first picture.
    """
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
        orientation = img.getexif().get(0x0112, 1)
        scale = max_side / max(w, h)
        if scale < 1 and fmt in ("JPEG", "MPO"):
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale directly: less memory and time.
            img.draft("RGB", (max(1, int(w * scale + 1)), max(1, int(h * scale + 1))))
        img.load()
        if max(img.size) > max_side:
            factor = max(img.size) // max_side
            if factor > 1:
                img = img.reduce(factor)
            img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
        img = img.convert("RGB")
        if orientation in _UPRIGHT:
            img = img.transpose(_UPRIGHT[orientation])
        return img
    except BadRequest:
        raise
    except Image.DecompressionBombError:
        raise BadRequest(f"the image has more than {MAX_PIXELS} pixels; at most {MAX_PIXELS} "
                         "pixels are accepted", 413) from None
    except (OSError, SyntaxError, ValueError):
        raise BadRequest("the upload is not an image that can be decoded (JPEG, PNG, BMP or "
                         "WebP expected)") from None


def _malloc_trim() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_TRIM = _malloc_trim()


class PreparedUpload:
    """A decoded upload with the model's input already made from it.

    Made on the decode threads, so that resizing and normalising run beside other queries'
    forward passes rather than inside the batcher's serial stage (under 16 clients they were a
    third of its time). The input is what the model's own preprocessing gives, so the features
    are those of the picture (or the picture itself for a model without that preprocessing).
    `ticket`: the Batcher's note that this query is on its way (Batcher.expect).
    """

    __slots__ = ("size", "input", "ticket")

    def __init__(self, size: tuple[int, int], input: torch.Tensor | Image.Image,
                 ticket: int | None = None) -> None:
        self.size, self.input, self.ticket = size, input, ticket


def _decode_and_trim(data: bytes, max_bytes: int,
                     prepare: Callable[[list[Image.Image]], torch.Tensor] | None = None
                     ) -> PreparedUpload:
    img = decode_upload(data, max_bytes)
    if _TRIM is not None and len(data) and img.width * img.height >= (QUERY_SIDE // 2) ** 2:
        # A big picture was decoded and freed: hand the pages back to the system now rather
        # than keep the peak for good.
        _TRIM(0)
    return PreparedUpload(img.size, img if prepare is None else prepare([img])[0])


class Batcher:
    """Forward passes shared by concurrent queries: dynamic batching.

    A query puts its input in a queue and waits; one worker takes what is waiting (up to
    `max_batch`) and embeds it in one forward pass under `lock` (which ingest shares, so one
    pass runs at a time and memory stays bounded). Before a pass it waits, at most `wait_ms`,
    only for queries known to be on their way: an upload announces
    itself (`expect`) when its body has arrived, before it is decoded. So a query alone never
    waits, and the queue never idles behind a fixed window while every query is already in
    it; under load the queue also fills while a pass runs, so batches grow on their own.
    """

    TICKET_S = 1.0  # an announcement older than this no longer holds a pass

    def __init__(self, embed: Any, lock: threading.Lock, max_batch: int = 16,
                 wait_ms: float = 3.0) -> None:
        if max_batch < 1 or wait_ms < 0:
            raise StrongReIDError(f"--max-batch ({max_batch}) must be >= 1 and --batch-wait-ms "
                                  f"({wait_ms}) >= 0")
        self.embed, self.lock = embed, lock
        self.max_batch, self.wait = max_batch, wait_ms / 1000
        self.batches = 0
        self.images = 0
        self._cond = threading.Condition()
        self._waiting: list[tuple[Any, Future]] = []
        # Announced queries not yet in the queue: ticket -> when announced. One whose request
        # died between the two (a client gone, an error) stops counting after TICKET_S.
        self._coming: dict[int, float] = {}
        self._tickets = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="strongreid-batcher", daemon=True)
        self._thread.start()

    @property
    def coming(self) -> int:
        """How many announced queries are not yet in the queue."""
        with self._cond:
            return len(self._coming)

    def expect(self) -> int:
        """Note that a query is on its way; its ticket goes with it (PreparedUpload.ticket)."""
        with self._cond:
            ticket = next(self._tickets)
            self._coming[ticket] = time.monotonic()
            return ticket

    def withdraw(self, ticket: int | None) -> None:
        """The announced query will not come (its upload failed); a no-op once it came."""
        if ticket is not None:
            with self._cond:
                if self._coming.pop(ticket, None) is not None:
                    self._cond.notify()

    def __call__(self, image: Any) -> np.ndarray:
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise StrongReIDError("the server is shutting down")
            if isinstance(image, PreparedUpload):
                self._coming.pop(image.ticket, None)
                image = image.input
            self._waiting.append((image, future))
            self._cond.notify()
        return future.result()

    def _wait_for_coming(self, deadline: float) -> bool:
        """Wait (lock held) until the queue changes, the window ends or an announced query
        lapses; False when there is nothing left to wait for."""
        now = time.monotonic()
        for ticket in [t for t, at in self._coming.items() if at <= now - self.TICKET_S]:
            del self._coming[ticket]
        if not self._coming or now >= deadline:
            return False
        lapse = min(self._coming.values()) + self.TICKET_S
        self._cond.wait(min(deadline, lapse) - now)
        return True

    def _next_batch(self) -> list[tuple[Any, Future]] | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if not self._waiting:
                return None
            deadline = time.monotonic() + self.wait
            while len(self._waiting) < self.max_batch and not self._closed:
                if not self._wait_for_coming(deadline):
                    break
            batch = self._waiting[:self.max_batch]
            del self._waiting[:self.max_batch]
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                with self.lock:
                    feats = np.asarray(self.embed([img for img, _ in batch]), np.float32)
                self.batches += 1
                self.images += len(batch)
                for (_, future), f in zip(batch, feats):
                    future.set_result(f)
            except BaseException as exc:  # handed to every waiting query
                for _, future in batch:
                    future.set_exception(exc)

    def close(self) -> None:
        """Stop after the queries already queued (a later one is refused)."""
        with self._cond:
            self._closed = True
            self._cond.notify()


def probe_batches(extractor: FeatureExtractor) -> list[torch.Tensor]:
    """Seeded batches of 2, 1 and 3 preprocessed-image-shaped inputs: the first traces or exports
    the graph, all three check its features (another batch size shows a size frozen into it)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, 3, *extractor.input_size, generator=gen) for n in (2, 1, 3)]


class CompiledFeatures(abc.ABC):
    """A FeatureExtractor's preprocessing in front of another runner of its forward pass
    (`features`: a preprocessed batch -> its features), called as the extractor is."""

    extractor: FeatureExtractor
    feat_dim: int

    @abc.abstractmethod
    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """A preprocessed batch's features (float32, on the CPU)."""

    def __call__(self, images: Any) -> Any:
        items = self.extractor._flatten(images)
        size = self.extractor.batch_size
        out = [self.features(self.extractor.preprocess(items[i:i + size]))
               for i in range(0, len(items), size)]
        return torch.cat(out) if out else torch.empty(0, self.feat_dim)


class TracedFeatures(CompiledFeatures):
    """A FeatureExtractor whose forward pass runs as one traced TorchScript graph.

    The same operations in the same order (the features are checked bitwise against the
    eager model's on two batch sizes), but the graph runs without Python's GIL: an eager
    forward pass needs the GIL between every layer, so under load it waits behind the event
    loop (HTTP, multipart, JSON) at each layer, and the two serialise. Traced, the forward
    pass of one batch and the requests of the next share the CPU cores.
    """

    def __init__(self, extractor: FeatureExtractor, graph: Any) -> None:
        self.extractor, self.graph = extractor, graph
        self.feat_dim = extractor.feat_dim

    @classmethod
    def wrap(cls, embed: Any) -> Any:
        """`embed` traced when it is a FeatureExtractor the trace reproduces exactly, else
        `embed` unchanged (mixed precision, a model the tracer cannot follow)."""
        if not isinstance(embed, FeatureExtractor) or embed.amp_dtype is not None:
            return embed
        ex = embed

        class Forward(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = ex.model

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return test_feature(self.model, x, ex.flip, ex.scales, ex.feat_norm, None,
                                    ex.channels_last)

        probes = probe_batches(ex)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings: the bitwise check decides
                graph = torch.jit.trace(Forward().eval(), probes[0].to(ex.device),
                                        check_trace=False)
            traced = cls(ex, graph)
            same = all(torch.equal(traced.features(x), ex.features(x)) for x in probes)
        except Exception as exc:  # any tracing failure means: stay eager
            logger.info("serving the eager model (tracing it failed: %s)", exc)
            return embed
        if not same:
            logger.info("serving the eager model (its traced graph gives other features)")
            return embed
        return traced

    def features(self, batch: Any) -> Any:
        with torch.inference_mode():
            return self.graph(batch.to(self.extractor.device)).float().cpu()


class OnnxFeatures(CompiledFeatures):
    """A FeatureExtractor whose forward pass runs in ONNX Runtime (CPU, fp32).

    The graph `strongreid export --format onnx` writes, kept in memory. On a CPU, onnxruntime
    ran the search benchmark's ResNet-18 at 64 x 32 4.2x faster than the traced graph for one
    image and 1.6x for a batch of 8 (torch picks its slow im2col convolution for a batch of
    one), with features within 1.6e-7; like the traced graph it computes without Python's GIL.
    Served only when the features of three probe batches agree with the eager model's within
    PARITY_TOLERANCE.
    """

    def __init__(self, extractor: FeatureExtractor, run: Any, difference: float) -> None:
        self.extractor, self.run, self.difference = extractor, run, difference
        self.feat_dim = extractor.feat_dim

    @classmethod
    def build(cls, embed: Any) -> OnnxFeatures:
        """`embed` on onnxruntime, or a StrongReIDError that says why it cannot be."""
        import importlib.util
        import tempfile

        from strongreid.deploy.export import (
            PARITY_TOLERANCE,
            InferenceModel,
            max_abs_diff,
            write_onnx,
        )
        from strongreid.deploy.runtimes import run_onnx

        if not isinstance(embed, FeatureExtractor):
            raise StrongReIDError("only a FeatureExtractor's model can run on onnxruntime")
        ex = embed
        if ex.amp_dtype is not None or ex.device.type != "cpu":
            raise StrongReIDError(f"onnxruntime serves fp32 features on the CPU; this model runs on "
                                  f"{ex.device} in {ex.amp_dtype or 'fp32'} (use --device cpu and "
                                  "TEST.PRECISION fp32)")
        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise StrongReIDError(f"--runtime onnxruntime needs {' and '.join(missing)}: "
                                  "pip install 'strongreid[search]'")
        probes = probe_batches(ex)
        graph = InferenceModel(ex.model, ex.flip, ex.feat_norm, ex.scales).eval()
        with tempfile.TemporaryDirectory(prefix="strongreid-serve-") as tmp:
            path = Path(tmp) / "model.onnx"
            write_onnx(graph, probes[0], path, {})
            try:
                # The session holds the graph in memory. Its threads sleep between passes:
                # spinning, they took the cores the requests' threads needed.
                run = run_onnx(path, torch.get_num_threads(), spin=False)
                difference = max_abs_diff(ex.features, run, probes)
            except StrongReIDError:
                raise
            except Exception as exc:  # noqa: BLE001 - an op onnxruntime lacks, a failed run
                raise StrongReIDError(f"onnxruntime cannot run this model's graph: "
                                      f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        if not difference <= PARITY_TOLERANCE:
            raise StrongReIDError(f"onnxruntime's features differ from the model's by {difference:.2e} "
                                  f"(more than {PARITY_TOLERANCE:g})")
        return cls(ex, run, difference)

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(batch.numpy()))


RUNTIMES = ("auto", "onnxruntime", "torch")


def serving_runtime(embed: Any, runtime: str = "auto") -> Any:
    """What runs the forward pass of queries and ingest: 'onnxruntime' (OnnxFeatures, or an
    error saying why not), 'torch' (the traced graph where it reproduces the eager features,
    else the eager model), or 'auto': onnxruntime where it is installed and agrees, else torch."""
    if runtime not in RUNTIMES:
        raise StrongReIDError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "onnxruntime":
        return OnnxFeatures.build(embed)
    if runtime == "auto" and isinstance(embed, FeatureExtractor):
        try:
            return OnnxFeatures.build(embed)
        except StrongReIDError as exc:
            logger.info("serving with torch (onnxruntime: %s)", exc)
    return TracedFeatures.wrap(embed)


def runtime_name(embed: Any) -> str:
    """'onnxruntime', 'torchscript' or 'eager': what /api/info reports."""
    if isinstance(embed, OnnxFeatures):
        return "onnxruntime"
    return "torchscript" if isinstance(embed, TracedFeatures) else "eager"


UPLOAD_PARAMS = ("k", "cameras", "videos", "start", "end", "rerank", "exclude_camera", "pool",
                 "precision")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def upload_params(query: bytes) -> dict[str, Any]:
    """The query string of a raw-body upload as search() arguments, checked as the form's are."""
    from urllib.parse import parse_qs

    try:
        given = parse_qs(query.decode("ascii"), keep_blank_values=True, max_num_fields=32)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the query string cannot be read: send k, cameras, videos, start, end, "
                         "rerank, exclude_camera, pool and precision as ASCII name=value pairs") from None
    unknown = sorted(set(given) - set(UPLOAD_PARAMS))
    if unknown:
        raise BadRequest(f"unknown parameter(s) {', '.join(unknown)} for an image body: use "
                         f"{', '.join(UPLOAD_PARAMS)} (a stored crop's key goes in a form)")
    one = {name: values[-1] for name, values in given.items()}

    def integer(name: str, default: int) -> int:
        text = one.get(name, str(default)).strip()
        if not text.lstrip("-").isdigit() or len(text) > 9:
            raise BadRequest(f"{name} must be a whole number, got {text[:20]!r}")
        return int(text)

    def flag(name: str) -> bool:
        text = one.get(name, "false").strip().lower()
        if text not in _TRUE + _FALSE:
            raise BadRequest(f"{name} must be true or false, got {text[:20]!r}")
        return text in _TRUE

    pool = integer("pool", RERANK_POOL)
    if not 2 <= pool <= 1000:
        raise BadRequest(f"pool must be between 2 and 1000, got {pool}")
    return {"k": integer("k", 20), "use_rerank": flag("rerank"), "pool": pool,
            "exclude_camera": flag("exclude_camera"),
            "precision": parse_precision(one.get("precision", "")),
            "filters": _filters(one.get("cameras", ""), one.get("videos", ""),
                                one.get("start", ""), one.get("end", ""))}


class RawUploads:
    """POST /api/search with the crop as the body (Content-Type image/...), parameters in the
    query string: no multipart parsing, no form validation, no spooled temporary file.

    Sits inside security.Guard (Host, tokens and the request's byte limit are checked first)
    and counts the body's bytes against the upload limit while it arrives (413 beyond).
    Any other request goes to the FastAPI app unchanged.
    """

    def __init__(self, app: Any, service: SearchService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/api/search" and \
                scope["method"] == "POST" and _content_type(scope).startswith(b"image/"):
            try:
                response = await self._search(scope, receive)
            except BadRequest as exc:
                response = JSONResponse({"detail": str(exc)}, status_code=exc.status)
            except StoreError as exc:
                response = JSONResponse({"detail": str(exc)}, status_code=400)
            if response is not None:
                await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _search(self, scope: dict, receive: Any) -> Response | None:
        from starlette.concurrency import run_in_threadpool

        service, limit = self.service, self.service.max_upload
        params = upload_params(scope.get("query_string", b""))
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                response = JSONResponse({"detail": f"the upload is more than {limit} bytes; the "
                                                   f"limit is {limit}"}, status_code=413)
                response.headers["connection"] = "close"
                return response
        img = await service.decode(bytes(body))
        return await run_in_threadpool(service.answer, img, None, params)


def _content_type(scope: dict) -> bytes:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-type":
            return value.split(b";", 1)[0].strip().lower()
    return b""


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
    """The gallery, the model and the thumbnails behind the app (usable without HTTP).

    `calibration`: the Calibration that turns scores into P(same person) and decisions; None:
    the FeatureExtractor's own (the one beside its weights) if it has one; False: none.
    """

    def __init__(self, store: GalleryStore, embed: Any, thumbs: str | Path,
                 model_name: str = "", *, max_upload: int = MAX_UPLOAD, max_batch: int = 16,
                 batch_wait_ms: float = 3.0, max_decodes: int = 2,
                 calibration: Calibration | bool | None = None, runtime: str = "auto") -> None:
        if max_decodes < 1:
            raise StrongReIDError(f"--max-decodes must be >= 1, got {max_decodes}")
        check_max_upload(max_upload)
        if calibration is None:
            calibration = getattr(embed, "calibration", None) \
                if isinstance(embed, FeatureExtractor) else None
        if calibration is True or (calibration is not False and calibration is not None
                                   and not isinstance(calibration, Calibration)):
            raise StrongReIDError(f"calibration must be a Calibration, None or False, got "
                                  f"{type(calibration).__name__}")
        self.calibration: Calibration | None = calibration or None
        self.operating_points = self._offered_points()
        self.store, self.thumbs = store, Path(thumbs)
        # The model's identity (model_identity.py), which ingest jobs record or check.
        self.model_identity = model_identity(embed) if isinstance(embed, FeatureExtractor) \
            else None
        self.gallery_warning: str | None = None  # set by _open_service: printed at start
        self.embed = serving_runtime(embed, runtime)
        self.runtime = runtime_name(self.embed)
        self._thumbs_root = self.thumbs.resolve()
        # The name only: the model's path on disk is nobody's business over HTTP.
        self.model_name = Path(model_name).name if model_name else ""
        self.max_upload = max_upload
        # One forward pass at a time (queries' batches and ingest batches share the lock):
        # torch's CPU kernels are parallel already, and memory stays bounded under load.
        self._model_lock = threading.Lock()
        self.batcher = Batcher(self.embed, self._model_lock, max_batch, batch_wait_ms)
        # The model's preprocessing, run where uploads are decoded (PreparedUpload).
        extractor = self.embed.extractor if isinstance(self.embed, CompiledFeatures) else \
            self.embed if isinstance(self.embed, FeatureExtractor) else None
        self._prepare = extractor.preprocess if extractor is not None else None
        # Full-size pixels exist only inside decode_upload, on max_decodes threads of their
        # own: a queue, not a pile, and the allocator reuses those threads' few arenas
        # instead of leaving freed 48 MB images scattered over every request thread's.
        self._decoder = ThreadPoolExecutor(max_decodes, thread_name_prefix="strongreid-decode")
        self._facets: dict[str, Any] | None = None
        self._facets_at = 0.0
        self.jobs: Any = None  # IngestJobs when ingest over HTTP is on

    def embed_locked(self, crops: list[Image.Image]) -> np.ndarray:
        """A batch embedded under the model lock (what ingest jobs call)."""
        with self._model_lock:
            return np.asarray(self.embed(crops), np.float32)

    async def decode(self, data: bytes) -> PreparedUpload:
        """decode_upload on the decode threads (at most max_decodes at a time), with the model's
        preprocessing when the service knows it. The batcher expects the query from now on:
        its pass may wait for it (`ticket`); a failed decode withdraws it."""
        import asyncio

        loop = asyncio.get_running_loop()
        ticket = self.batcher.expect()
        try:
            upload = await loop.run_in_executor(self._decoder, _decode_and_trim, data,
                                                self.max_upload, self._prepare)
        except BaseException:
            self.batcher.withdraw(ticket)
            raise
        upload.ticket = ticket
        return upload

    def forget_facets(self) -> None:
        self._facets = None

    def facets(self) -> dict[str, Any]:
        """Cameras / videos / time range, recomputed at most every 10 s (an ingest may run)."""
        if self._facets is None or time.monotonic() - self._facets_at > 10:
            self._facets, self._facets_at = self.store.facets(), time.monotonic()
        return self._facets

    def info(self) -> dict[str, Any]:
        f = self.facets()
        return {"count": self.store.count(), "dim": self.store.dim, "model": self.model_name,
                "cameras": f["cameras"], "videos": f["videos"], "start": f["start"],
                "end": f["end"], "max_upload": self.max_upload, "max_k": MAX_K,
                "ingest": self.jobs is not None, "calibration": self.calibration_info(),
                "runtime": self.runtime}

    # -- same person ------------------------------------------------------------------------------

    def _offered_points(self) -> dict[float, dict[str, float]]:
        """The operating point of each of PRECISIONS that the calibration reaches."""
        points: dict[float, dict[str, float]] = {}
        if self.calibration is None:
            return points
        for p in PRECISIONS:
            try:
                points[p] = self.calibration.operating_point(p)
            except StrongReIDError:  # this calibration's pairs never reach p
                continue
        return points

    @property
    def default_precision(self) -> float | None:
        """DEFAULT_PRECISION when the calibration reaches it, else the highest offered one."""
        if DEFAULT_PRECISION in self.operating_points:
            return DEFAULT_PRECISION
        return max(self.operating_points, default=None)

    def calibration_info(self) -> dict[str, Any] | None:
        """What /api/info says about the calibration: numbers only, no file or data path."""
        cal = self.calibration
        if cal is None:
            return None
        measured = cal.source.get("measurement")
        return {
            "precisions": list(self.operating_points), "default": self.default_precision,
            # The highest precision any threshold reaches under the calibration's rule and
            # population (rounded down, so it can be asked for): a request above it is refused.
            "max_precision": math.floor(cal.max_precision() * 1e6) / 1e6,
            "points": [{"precision": p, "threshold": round(pt["threshold"], 6),
                        "recall": round(pt["recall"], 6)}
                       for p, pt in self.operating_points.items()],
            "kind": cal.source.get("kind"),
            "measured": None if not isinstance(measured, dict) else
            {k: measured.get(k) for k in ("requested", "measured", "recall", "identities")},
        }

    def decision(self, precision: float | None) -> dict[str, float] | None:
        """{precision, threshold, recall} of the requested precision (None: the default), or None
        without a calibration. BadRequest: a precision without a calibration (409), or one
        outside (0, 1) or above what the calibration reaches (400)."""
        if self.calibration is None:
            if precision is None:
                return None
            raise BadRequest(
                f"this server has no same-person calibration for its model {self.model_name}: "
                "search without 'precision', or restart `strongreid serve` after `strongreid "
                "calibrate --model MODEL --data LABELLED_IMAGES` (or with --calibration FILE)", 409)
        if precision is None:
            precision = self.default_precision
            if precision is None:
                return None
        if isinstance(precision, bool) or not isinstance(precision, (int, float)) \
                or not 0.0 < precision < 1.0:
            raise BadRequest(f"precision must be a number between 0 and 1 (exclusive), e.g. "
                             f"{DEFAULT_PRECISION}, got {precision!r}")
        point = self.operating_points.get(precision)
        if point is None:
            try:
                point = self.calibration.operating_point(precision)
            except StrongReIDError as exc:
                raise BadRequest(str(exc)) from None
        return {"precision": float(precision), "threshold": round(point["threshold"], 6),
                "recall": round(point["recall"], 6)}

    def _judge(self, hits: list[dict[str, Any]], scores: list[float],
               decision: dict[str, float] | None) -> None:
        """Each hit's P(same person) and, with a decision, whether it passes (in place)."""
        if self.calibration is None or not hits:
            return
        probability = self.calibration.probability(scores)
        same = self.calibration.same_person(scores, decision["precision"]) if decision else None
        for i, h in enumerate(hits):
            h["probability"] = round(float(probability[i]), 6)
            if same is not None:
                h["same_person"] = bool(same[i])

    def thumbnail(self, key: str) -> bytes | None:
        """A thumbnail's bytes, only from a regular file inside the folder (no symlink)."""
        if not KEY.fullmatch(key):
            return None
        path = thumb_path(self._thumbs_root, key)
        try:
            if not stat.S_ISDIR(os.lstat(path.parent).st_mode):  # a symlinked fan-out folder
                return None
            if not path.resolve().is_relative_to(self._thumbs_root):
                return None
            # O_NOFOLLOW: a symlink fails to open; O_NONBLOCK: a FIFO does not hang the open.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_THUMB_BYTES:
                return None
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read(MAX_THUMB_BYTES)
        finally:
            os.close(fd)

    def query_vector(self, image: Image.Image | PreparedUpload | None, key: str | None
                     ) -> tuple[np.ndarray, dict]:
        """The query's feature and what it is (an upload or a stored crop)."""
        if key:
            if not KEY.fullmatch(key):
                raise BadRequest("key must be a gallery key (40 hexadecimal digits)", 404)
            rows = self.store.get([key], with_vectors=True)
            if not rows:
                raise BadRequest(f"no stored crop has the key {key}", 404)
            row = rows[0]
            return np.asarray(row["vector"], np.float32), {"kind": "key", **hit_json(key, row)}
        if image is None:
            raise BadRequest("send an image (multipart field 'image') or a stored crop's 'key'")
        return self.batcher(image), {"kind": "upload", "size": list(image.size)}

    def search(self, image: Image.Image | PreparedUpload | None = None, key: str | None = None, *,
               k: int = 20, filters: Filters | None = None, exclude_camera: bool = False,
               use_rerank: bool = False, pool: int = RERANK_POOL,
               precision: float | None = None) -> dict[str, Any]:
        """Top-k across cameras, grouped per camera on a timeline; with a calibration, each
        hit's P(same person) and its decision at `precision` (None: the default one)."""
        t0 = time.perf_counter()
        if not 1 <= k <= MAX_K:
            raise BadRequest(f"k must be between 1 and {MAX_K}, got {k}")
        decision = self.decision(precision)
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
                    return self._answer(query, [], filters, use_rerank, t0, decision)
                filters.cameras = others
        limit = max(k, pool) if use_rerank else k
        hits = self.store.search(vec, limit, filters, with_vectors=use_rerank)[0]
        if use_rerank and len(hits) > 1:
            ranked = rerank(vec, hits)[:k]
            out = [{**hit_json(h.key, h.meta, h.score), "rerank_distance": round(d, 6)}
                   for h, d in ranked]
            scores = [h.score for h, _ in ranked]
        else:
            out = [hit_json(h.key, h.meta, h.score) for h in hits[:k]]
            scores = [h.score for h in hits[:k]]
        # Judged on the store's scores, not on the 6-digit ones the answer shows.
        self._judge(out, scores, decision)
        return self._answer(query, out, filters, use_rerank, t0, decision)

    def answer(self, image: Image.Image | PreparedUpload | None, key: str | None,
               params: dict[str, Any]) -> Response:
        """search() rendered as the JSON response (in the caller's thread: FastAPI's own
        encoding of a returned dict, validation and then a generic walk, cost more per query
        than the search itself)."""
        try:
            return JSONResponse(self.search(image, key, **params))
        finally:
            if isinstance(image, PreparedUpload):  # a query refused before its forward pass
                self.batcher.withdraw(image.ticket)

    @staticmethod
    def _answer(query: dict, hits: list[dict], filters: Filters, reranked: bool,
                t0: float, decision: dict[str, float] | None = None) -> dict[str, Any]:
        return {"query": query, "hits": hits, "timeline": group_by_camera(hits),
                "filters": {k: v for k, v in asdict(filters).items() if k != "exclude_keys"},
                "reranked": reranked, "decision": decision,
                "took_ms": round((time.perf_counter() - t0) * 1000, 2)}

    def close(self) -> None:
        self.batcher.close()
        self._decoder.shutdown(wait=False)


def _filters(cameras: str, videos: str, start: str, end: str) -> Filters:
    def split(s: str) -> list[str]:
        return [x.strip() for x in s.split(",") if x.strip()]

    try:
        filters = Filters(cameras=split(cameras), videos=split(videos),
                          start=parse_time(start, "start") if start.strip() else None,
                          end=parse_time(end, "end") if end.strip() else None)
    except StrongReIDError as exc:
        raise BadRequest(str(exc)) from None
    if filters.start is not None and filters.end is not None and filters.start > filters.end:
        # An empty answer would read as "nobody was seen": the window itself is wrong.
        raise BadRequest(f"start ({start.strip()}) is after end ({end.strip()}): give the "
                         "earlier time as start")
    return filters


def parse_precision(form: str, url: str = "") -> float | None:
    """The `precision` of a search request (form field or URL query; None when neither)."""
    form, url = form.strip(), url.strip()
    if form and url and form != url:
        raise BadRequest(f"precision is given twice, {form!r} in the form and {url!r} in the "
                         "URL: give it once")
    text = form or url
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 1.0:  # NaN fails too
        raise BadRequest(f"precision must be a number between 0 and 1 (exclusive), e.g. "
                         f"{DEFAULT_PRECISION}, got {text!r}")
    return value


def create_app(service: SearchService, max_upload: int | None = None, *,
               auth: security.TokenAuth | None = None,
               allowed_hosts: Iterable[str] | None = None,
               ingest_root: str | Path | None = None) -> Any:
    """The FastAPI app over `service`, behind security.Guard (an ASGI app).

    `auth`: a security.TokenAuth (None: no tokens, for loopback only); `allowed_hosts`: Host
    names served (default: loopback names); `ingest_root`: the folder POST /api/ingest may read
    (needs `auth`).
    """
    from fastapi import FastAPI

    from strongreid.search.jobs import IngestJobs, JobError, ingest_runner

    if max_upload is not None:
        service.max_upload = max_upload
    max_upload = service.max_upload
    if ingest_root is not None:
        if auth is None:
            raise StrongReIDError("--ingest-root lets clients add footage: it needs --auth-file")
        service.jobs = IngestJobs(ingest_root, ingest_runner(service.store, service.embed_locked,
                                                             service.thumbs,
                                                             service.model_identity),
                                  on_done=service.forget_facets)
    # No /docs or /redoc: their Swagger UI / ReDoc assets come from a CDN, which the CSP
    # forbids (and this service never fetches from elsewhere); /openapi.json stays.
    app = FastAPI(title="strongreid gallery search", version="1", docs_url=None, redoc_url=None,
                  description="Search a gallery of person crops across cameras.")
    page = resources.files("strongreid.search").joinpath("static")

    @app.exception_handler(BadRequest)
    async def _bad(_request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(StoreError)
    async def _store(_request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(JobError)
    async def _job(_request: Request, exc: JobError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return Response(page.joinpath("index.html").read_bytes(), media_type="text/html",
                        headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in _STATIC:
            return JSONResponse({"detail": "not found"}, status_code=404)
        return Response(page.joinpath(name).read_bytes(), media_type=_STATIC[name])

    @app.post("/api/login")
    def login(request: Request, token: Annotated[str, Form(max_length=200)] = "") -> Response:
        """A token typed into the page: sets the session cookie (HttpOnly, SameSite=Strict)."""
        if auth is None:
            return JSONResponse({"ok": True, "auth": False})
        status, headers, body = security.login_response(auth, token,
                                                        request.url.scheme == "https")
        response = JSONResponse(body, status_code=status)
        for name, value in headers:
            response.headers.append(name.decode(), value.decode())
        return response

    @app.post("/api/logout")
    def logout(request: Request) -> Response:
        """Ends the page's session."""
        if auth is not None:
            sid = request.cookies.get(security.COOKIE, "")
            if sid:
                auth.end_session(sid)
        response = JSONResponse({"ok": True})
        name, value = security.cookie_header("", request.url.scheme == "https", max_age=0)
        response.headers.append(name.decode(), value.decode())
        return response

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        """Gallery size, cameras, videos, time range and the limits."""
        return {**service.info(), "auth": auth is not None}

    @app.get("/api/gallery")
    def gallery(limit: int = Query(60, ge=1, le=500), offset: int = Query(0, ge=0, le=100_000),
                camera: str = "") -> dict[str, Any]:
        """Stored crops in time order: the thumbnails the page offers as queries."""
        rows = service.store.browse(limit, offset, _filters(camera, "", "", ""))
        return {"items": [hit_json(r["key"], r) for r in rows], "offset": offset}

    @app.get("/api/items/{key}")
    def item(key: str) -> dict[str, Any]:
        """One stored crop's metadata."""
        if not KEY.fullmatch(key):
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
                     pool: Annotated[int, Form(ge=2, le=1000)] = RERANK_POOL,
                     precision: Annotated[str, Form(max_length=40)] = "",
                     precision_url: Annotated[str, Query(alias="precision", max_length=40)] = ""
                     ) -> Response:
        """Top-k across cameras for an uploaded crop or a stored one, grouped per camera.
        `precision` (form field or URL query, with a calibration): each hit's P(same person)
        and whether it passes that precision's threshold (default: /api/info's default).

        An upload may also be the request's whole body (Content-Type image/jpeg, image/png,
        ...) with these parameters in the query string: the lighter path for API clients.
        """
        from starlette.concurrency import run_in_threadpool

        params = {"k": k, "filters": _filters(cameras, videos, start, end),
                  "exclude_camera": exclude_camera, "use_rerank": rerank, "pool": pool,
                  "precision": parse_precision(precision, precision_url)}
        img = None
        if image is not None and not key:
            data = await image.read(max_upload + 1)
            img = await service.decode(data)
        return await run_in_threadpool(service.answer, img, key or None, params)

    def _jobs() -> Any:
        if service.jobs is None:
            raise BadRequest("ingest over HTTP is off: start the server with --ingest-root DIR "
                             "(and --auth-file)", 404)
        return service.jobs

    @app.post("/api/ingest", status_code=202)
    def ingest_start(request: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        """Queues footage under the ingest root: {videos: [...], crops: [...], meta,
        detections, frame_step}, folders relative to the root. Returns the job (its id)."""
        return _jobs().submit(request).as_json()

    @app.get("/api/ingest")
    def ingest_list() -> dict[str, Any]:
        """Recent ingest jobs, newest first."""
        return {"jobs": [j.as_json() for j in _jobs().list()]}

    @app.get("/api/ingest/{job_id}")
    def ingest_status(job_id: str) -> dict[str, Any]:
        """One job's progress: state, done / total crops, added, skipped, error."""
        job = _jobs().get(job_id)
        if job is None:
            raise BadRequest(f"no ingest job {job_id}", 404)
        return job.as_json()

    @app.get("/thumbs/{name:path}", include_in_schema=False)
    def thumb(name: str, request: Request) -> Response:
        # Starlette's route pattern ends in `$`, which lets `<name>\n` through as `<name>`.
        m = _THUMB_NAME.fullmatch(name) if request.scope["path"] == f"/thumbs/{name}" else None
        data = service.thumbnail(m.group(1)) if m else None
        if data is None:
            return JSONResponse({"detail": "not found"}, status_code=404)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=86400, immutable"})

    hosts = allowed_hosts if allowed_hosts is not None else security.allowed_hosts()
    return security.Guard(RawUploads(app, service), auth=auth, hosts=frozenset(hosts),
                          max_body=max_upload + 65536)


def _open_service(gallery: str, model: str, config: str | None, device: str, token: str,
                  thumbs: str | None, max_upload: int, max_batch: int, batch_wait_ms: float,
                  max_decodes: int, calibration: Calibration | Literal[False] = False,
                  runtime: str = "auto") -> SearchService:
    """The gallery and the model behind a SearchService (the caller closes service and store);
    `calibration`: the same-person calibration serve_command read, or False for none."""
    # faiss (imported on the way by the evaluation package) announces its SIMD build at INFO.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    store = open_store(gallery, token=token or "", create=False)
    try:
        extractor = FeatureExtractor(config, model, device=device, calibration=False)
        # The gallery's features must be this model's (a StoreError names both models);
        # a gallery from before identities were recorded is served with a warning.
        warning = check_serve(store, model_identity(extractor), gallery)
        if store.dim is not None and store.dim != extractor.feat_dim:
            raise StoreError(f"the gallery {gallery} holds {store.dim}-dimensional features but "
                             f"{model} gives {extractor.feat_dim}: serve it with the model that "
                             "built it")
        service = SearchService(store, extractor, thumbs_dir_for(gallery, thumbs),
                                model_name=str(model), max_upload=max_upload,
                                max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                                max_decodes=max_decodes, calibration=calibration,
                                runtime=runtime)
    except BaseException:
        store.close()
        raise
    service.gallery_warning = warning
    return service


def check_max_upload(max_upload: int) -> None:
    """--max-upload must let an upload through (0 would answer 413 to every one)."""
    if isinstance(max_upload, bool) or not max_upload >= 1:
        raise StrongReIDError(f"--max-upload {max_upload} must be a positive number of bytes "
                              f"(the default is {MAX_UPLOAD}, 5 MiB)")


def check_port(port: int) -> None:
    """--port must be a TCP port that can be named in the printed address."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise StrongReIDError(f"--port {port} must be within 1..65535 (the default is 8000)")


def _records_no_model(gallery: str, token: str) -> bool:
    """Whether the gallery holds rows but records no model (served with a warning); read
    without loading its index (what the parent of several workers checks)."""
    if is_local(gallery) and gallery_kind(gallery) == "embedded":
        from strongreid.search.faiss_store import read_info

        info = read_info(gallery)
        return "dim" in info and "model" not in info
    if is_local(gallery) and gallery_kind(gallery) != "milvus-lite":
        return False  # nothing there yet, or not a gallery: a worker says so
    store = open_store(gallery, token=token or "", create=False)
    try:
        return store.dim is not None and store.model() is None
    finally:
        store.close()


class _ClosingOnShutdown:
    """Closes a worker's service and store when uvicorn ends the app's lifespan."""

    def __init__(self, app: Any, service: SearchService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.service.close()
                self.service.store.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


class WorkerConfig(uvicorn.Config):
    """uvicorn's settings plus the service's: each worker process (spawned, so it shares no
    torch or faiss state with the parent) opens the gallery and loads the model itself."""

    def __init__(self, service_args: dict[str, Any], hosts: frozenset[str], workers: int,
                 auth: tuple[list[tuple[str, str]], str] | None = None, **kwargs: Any) -> None:
        # auth: the token hashes and the SQLite file of the sessions all workers share.
        self.service_args, self.hosts, self.auth = service_args, hosts, auth
        super().__init__(app="strongreid.search.service:create_app", workers=workers,
                         lifespan="on", **kwargs)

    def load_app(self) -> Any:
        # Each worker takes its share of the CPU threads: N workers with every core each would
        # make N x cores threads compete for the same cores.
        torch.set_num_threads(max(1, torch.get_num_threads() // max(1, self.workers)))
        try:
            service = _open_service(**self.service_args)
        except StrongReIDError as exc:
            print(f"error: {exc}", flush=True)
            raise SystemExit(STARTUP_FAILURE) from None  # the parent stops too
        auth = None
        if self.auth is not None:
            auth = security.TokenAuth(self.auth[0], security.SharedSessions(self.auth[1]))
        return _ClosingOnShutdown(create_app(service, auth=auth, allowed_hosts=self.hosts), service)


def _serve_workers(workers: int, service_args: dict[str, Any], hosts: frozenset[str],
                   host: str, port: int, auth: security.TokenAuth | None = None) -> int:
    """`workers` processes answering on one listening socket (uvicorn's supervisor restarts a
    worker that dies); with `auth` (a TokenAuth), their page sessions live in one SQLite file
    in a private temporary folder, removed at the end."""
    import shutil
    import tempfile

    from uvicorn.supervisors import Multiprocess

    folder = tempfile.mkdtemp(prefix="strongreid-sessions-") if auth is not None else None
    try:
        shared = None
        if folder is not None:
            path = str(Path(folder) / "sessions.db")
            security.SharedSessions(path)  # the table exists before any worker starts
            shared = (list(auth.hashes), path)
        config = WorkerConfig(service_args, hosts, workers, auth=shared, host=host, port=port,
                              log_level="warning")
        supervisor = Multiprocess(config, sockets=[config.bind_socket()])
        supervisor.run()
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        raise StrongReIDError("a worker process could not start (its error is printed above)")
    return 0


def serving_calibration(model: str, path: str | None = None, off: bool = False,
                        people: int | None = None) -> tuple[Calibration | None, Path | None]:
    """The calibration `serve` uses and its file: `path`, else the one beside `model` if any;
    re-targeted to a gallery of `people` people when given."""
    if off:
        if path or people is not None:
            raise StrongReIDError(f"--{'calibration' if path else 'people'} and --no-calibration "
                                  "contradict each other: give one of them")
        return None, None
    if people is not None:
        check_people(people, "--people")
    file = Path(path) if path else calibration_path(model)
    if path is None and not file.is_file():
        if people is not None:
            raise StrongReIDError(f"--people {people} re-targets a same-person calibration, and "
                                  f"{file} does not exist: run `strongreid calibrate --model "
                                  f"{model} ...` first, or name one with --calibration")
        return None, None
    try:
        loaded = Calibration.load(file)
    except StrongReIDError as exc:
        if path is not None:
            raise
        raise StrongReIDError(f"{exc} (it lies beside --model {model}; or serve without "
                              "same-person marks: --no-calibration)") from None
    # Outside the file's error handling: a bad --people is the flag's fault, not the file's.
    return (loaded if people is None else loaded.for_people(people)), file


def _describe_calibration(service: SearchService, file: Path | None, model: str) -> str:
    """The console line about the calibration (the operator may see its path; clients never)."""
    if service.calibration is None:
        return (f"no calibration (hits carry scores only); `strongreid calibrate --model {model} "
                f"--data LABELLED_IMAGES` writes {calibration_path(model)}")
    made_for = service.calibration.source.get("model")
    note = ""
    if made_for and made_for != Path(model).name:
        note = f"; WARNING: it was made for the model {made_for}, not {Path(model).name}"
    info = service.calibration_info() or {}
    offered = ", ".join(f"{p:g}" for p in info.get("precisions", [])) or "none of the page's"
    cal = service.calibration
    among = cal.people or cal.own_people
    return (f"calibration {file}: precisions {offered} (at most {info.get('max_precision'):g}"
            f"{f' among {among} people' if among else ''}), default "
            f"{service.default_precision}{note}")


_PLAIN_HTTP_WARNING = (
    "WARNING: {host}:{port} is reachable from other machines over plain HTTP: every crop "
    "(pictures of people), camera and time of this gallery is served to any token holder, and "
    "tokens, cookies and pictures cross the network unencrypted unless a TLS reverse proxy is "
    "the only way in (docs/search.md).")


def serve_command(gallery: str, model: str, config: str | None = None, device: str = "auto",
                  token: str = "", thumbs: str | None = None, host: str = "127.0.0.1",
                  port: int = 8000, max_upload: int = 5 * 1024 * 1024,
                  auth_file: str | None = None, allowed_host: tuple[str, ...] = (),
                  ingest_root: str | None = None, max_batch: int = 16, batch_wait_ms: float = 3.0,
                  max_decodes: int = 2, calibration: str | None = None,
                  no_calibration: bool = False, workers: int = 1, runtime: str = "auto",
                  people: int | None = None) -> int:
    """`strongreid serve --gallery gallery.db --model best.pt` (127.0.0.1:8000 by default)."""
    import uvicorn

    check_port(port)
    check_max_upload(max_upload)
    loopback = security.is_loopback(host)
    if not loopback and not auth_file:
        raise StrongReIDError(
            f"refusing to serve on {host} without authentication: anyone who reaches that "
            "address would see every crop of the gallery. Create a token with `strongreid "
            "gallery token --auth-file tokens.txt`, then pass --auth-file tokens.txt "
            "(or keep --host 127.0.0.1 behind a TLS reverse proxy; see docs/search.md)")
    if workers < 1:
        raise StrongReIDError(f"--workers must be >= 1, got {workers}")
    if workers > 1 and ingest_root:
        raise StrongReIDError(
            f"--workers {workers} cannot be combined with --ingest-root: ingest jobs live in one "
            "process's memory, so another worker would not know them. Serve ingest with "
            "--workers 1 (docs/search.md)")
    if workers > 1 and is_local(gallery) and is_milvus_lite(gallery):
        raise StrongReIDError(f"{gallery} is a Milvus Lite gallery, which one process at a time "
                              "may open: serve it with --workers 1, or migrate it to the embedded "
                              "store (`strongreid gallery migrate`)")
    auth = security.TokenAuth.from_file(auth_file) if auth_file else None
    hosts = security.allowed_hosts(allowed_host or (), host)
    # Before the model and the gallery: a broken calibration is found in a second, not a minute.
    same_person, calibration_file = serving_calibration(model, calibration, no_calibration,
                                                        people)
    service_args = {"gallery": gallery, "model": model, "config": config, "device": device,
                    "token": token, "thumbs": thumbs, "max_upload": max_upload,
                    "max_batch": max_batch, "batch_wait_ms": batch_wait_ms,
                    "max_decodes": max_decodes,
                    "calibration": same_person or False, "runtime": runtime}
    shown = f"[{host}]" if ":" in host else host

    def access_lines() -> None:
        print(f"  Host names answered: {', '.join(sorted(hosts))}", flush=True)
        if auth is not None:
            print(f"  {len(auth.hashes)} token(s) from {auth_file}: open "
                  f"http://{shown}:{port}/?token=<token> once, or send 'Authorization: Bearer "
                  f"<token>'{' (page sessions are shared by the workers)' if workers > 1 else ''}",
                  flush=True)
        if not loopback:
            print(_PLAIN_HTTP_WARNING.format(host=host, port=port), flush=True)

    if workers > 1:
        print(f"serving {gallery} with {workers} worker processes on http://{shown}:{port}/ "
              "(Ctrl-C stops)", flush=True)
        access_lines()
        if _records_no_model(gallery, token):  # each worker checks a recorded model itself
            print(unrecorded_warning(gallery, model), flush=True)
        return _serve_workers(workers, service_args, hosts, host, port, auth)
    service = _open_service(**service_args)
    store = service.store
    if service.gallery_warning:
        print(service.gallery_warning, flush=True)
    app = create_app(service, auth=auth, allowed_hosts=hosts, ingest_root=ingest_root)
    print(f"serving {store.count()} crops of {gallery} on http://{shown}:{port}/ "
          "(Ctrl-C stops)", flush=True)
    access_lines()
    if ingest_root:
        print(f"  token holders may ingest footage under {ingest_root} (POST /api/ingest)",
              flush=True)
    print(f"  same person: {_describe_calibration(service, calibration_file, model)}", flush=True)
    print(f"  forward pass: {service.runtime}", flush=True)
    if isinstance(store, MilvusStore) and is_local(gallery):
        print("  note: an old Milvus Lite gallery's embedded server listens on a 127.0.0.1 port "
              "of its own, without authentication: other users of this machine can read the "
              "gallery's rows there (docs/search.md, 'The Milvus Lite side port')", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        service.close()
        store.close()
    return 0
