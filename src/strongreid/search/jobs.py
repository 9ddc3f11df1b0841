"""Ingest while serving: footage under one folder (`--ingest-root`), one job at a time.

Milvus Lite lets one process open a gallery file, so footage added while `strongreid serve`
runs is ingested inside the serving process. A job names folders relative to the root
(anything resolving outside it is refused, symlinks included); jobs run in order on one
worker thread, and GET /api/ingest/{id} reports their progress.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from strongreid.errors import StrongReIDError
from strongreid.search.ingest import ingest

logger = logging.getLogger("strongreid")
MAX_JOBS_KEPT = 50


class JobError(StrongReIDError):
    """An ingest request the client can fix (HTTP 400)."""


@dataclass
class Job:
    """One ingest request and its progress."""

    id: str
    videos: list[str]
    crops: list[str]
    meta: str | None = None
    detections: str = "auto"
    frame_step: int = 1
    state: str = "queued"  # queued, running, done, failed
    done: int = 0
    total: int = 0
    added: int = 0
    skipped: int = 0
    error: str = ""
    created: float = field(default_factory=time.time)
    finished: float | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class IngestJobs:
    """A FIFO of ingest jobs run by one thread into the served store."""

    def __init__(self, root: str | Path, run: Callable[..., Any],
                 on_done: Callable[[], None] = lambda: None) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise StrongReIDError(f"--ingest-root {root} is not a folder")
        self._run, self._on_done = run, on_done
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._worker, name="strongreid-ingest", daemon=True)
        self._thread.start()

    def _inside(self, rel: Any, what: str) -> str:
        if not isinstance(rel, str) or not rel.strip() or "\0" in rel:
            raise JobError(f"{what}: give a folder relative to the ingest root")
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):
            raise JobError(f"{what} {rel!r} is outside the ingest root")
        if not path.exists():
            raise JobError(f"{what} {rel!r} does not exist under the ingest root")
        return str(path)

    def submit(self, request: dict[str, Any]) -> Job:
        """Checks a request ({videos, crops, meta, detections, frame_step}) and queues it."""
        videos, crops = request.get("videos") or [], request.get("crops") or []
        if not isinstance(videos, list) or not isinstance(crops, list) or not (videos or crops):
            raise JobError("send {'videos': [folders], 'crops': [folders]} relative to the "
                           "ingest root (at least one)")
        detections = request.get("detections", "auto")
        if detections not in ("auto", "gt", "det"):
            raise JobError(f"detections {detections!r}: use auto, gt or det")
        step = request.get("frame_step", 1)
        if not isinstance(step, int) or isinstance(step, bool) or not 1 <= step <= 10_000:
            raise JobError("frame_step must be an integer from 1 to 10000")
        meta = request.get("meta")
        job = Job(id=secrets.token_hex(8),
                  videos=[self._inside(v, "videos") for v in videos],
                  crops=[self._inside(c, "crops") for c in crops],
                  meta=self._inside(meta, "meta") if meta else None,
                  detections=detections, frame_step=step)
        with self._wake:
            self._jobs[job.id] = job
            while len(self._jobs) > MAX_JOBS_KEPT:
                oldest = next(iter(self._jobs.values()))
                if oldest.state in ("queued", "running"):
                    break
                self._jobs.popitem(last=False)
            self._wake.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def list(self) -> list[Job]:
        with self._lock:
            return list(reversed(self._jobs.values()))

    def _worker(self) -> None:
        while True:
            with self._wake:
                while not (queued := [j for j in self._jobs.values() if j.state == "queued"]):
                    self._wake.wait()
                job = queued[0]
                job.state = "running"

            def progress(done: int, total: int, job: Job = job) -> None:
                job.done, job.total = done, total

            try:
                stats = self._run(crops=job.crops, meta_csv=job.meta, videos=job.videos,
                                  detections=job.detections, frame_step=job.frame_step,
                                  on_progress=progress)
                job.added, job.skipped, job.state = stats.added, stats.skipped, "done"
            except StrongReIDError as exc:
                job.error, job.state = str(exc), "failed"
            except Exception as exc:  # the server keeps serving; the job says what happened
                logger.exception("ingest job %s failed", job.id)
                job.error, job.state = f"internal error: {type(exc).__name__}", "failed"
            finally:
                job.finished = time.time()
                self._on_done()


def ingest_runner(store: Any, embed: Callable, thumbs: Path, model: Any = None) -> Callable[..., Any]:
    """`ingest` bound to the served store, model and thumbnail folder; `model`: the served
    model's identity (model_identity.ModelIdentity), which the gallery records or checks."""
    def run(**kw: Any) -> Any:
        return ingest(store, embed, thumbs, progress=False, model=model, **kw)
    return run
