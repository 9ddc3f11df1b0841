"""`strongreid serve` under load: upload latency with dynamic batching, and memory under big uploads.

    PYTHONPATH=src python benchmarks/search_service.py --out runs/bench/search_service.json
    # the same measurements against another checkout's code (e.g. before a change):
    PYTHONPATH=src python benchmarks/search_service.py --server-src /path/to/other/src
    # uploads as a raw image body instead of multipart; server options passed through:
    PYTHONPATH=src python benchmarks/search_service.py --body raw --server-arg=--workers=2
    # a load generator that spends far less of the shared cores (prebuilt requests, sockets):
    PYTHONPATH=src python benchmarks/search_service.py --body raw --client socket
    # the forward pass alone (torch, onnxruntime fp32 and int8), by batch size and threads:
    PYTHONPATH=src python benchmarks/search_service.py --forward-only

The server is a real `python -m strongreid serve` subprocess on 127.0.0.1 (a free port) over a
gallery (the default store) of the synthetic test footage, embedded by a random-weight ResNet-18
at 64x32 (tests/_search_utils.py); the clients are threads in this process, httpx clients
(`--client httpx`, the default) or prebuilt HTTP/1.1 requests over keep-alive sockets
(`--client socket`: about a quarter of httpx's CPU per query, so the server's own work sets
the latency).

1. Latency: `--single` upload queries one at a time on the idle server (p50 / p95), then
   `--clients` concurrent clients sending `--per-client` uploads each (p50 / p95); the figure
   of merit is p95 at 16 clients / p50 of one query alone. Over the concurrent phase, the
   CPU time per query of the server (its processes, from /proc) and of the clients (this
   process) says where the two shared cores went.
2. Memory: the server's RSS (VmRSS sampled every 20 ms from /proc) while `--big` concurrent
   clients upload one 4096 x 4096 PNG each (a few KB: one colour), its peak (VmHWM) and its
   RSS 3 s after the last answer.
Both are bounded in count; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live children (a server's workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(c) for c in f.read().split()]
    for p in pids:
        with contextlib.suppress(OSError), open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def build(work: Path) -> tuple[Path, Path, list[bytes]]:
    """A gallery of the test footage, its model, and PNG uploads of some of its crops."""
    from _search_utils import footage_crops, ingested_gallery
    from milvus_lite.server_manager import server_manager_instance

    world = ingested_gallery(work)
    world["store"].close()
    # Milvus Lite keeps the file's in-process server after the client closes: the server
    # subprocess could not open the file while it runs.
    server_manager_instance.release_server(str(work / "gallery.db"))
    crops = footage_crops(world["footage"])[0]
    uploads = []
    for crop in crops[:: max(1, len(crops) // 32)][:32]:
        buf = io.BytesIO()
        crop.save(buf, "PNG")
        uploads.append(buf.getvalue())
    return work / "gallery.db", world["model"], uploads


def start_server(gallery: Path, model: Path, server_src: Path,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(server_src)}
    proc = subprocess.Popen([sys.executable, "-m", "strongreid", "serve", "--gallery", str(gallery),
                             "--model", str(model), "--device", "cpu", "--host", "127.0.0.1",
                             "--port", str(port), *extra], env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):  # not listening yet: poll again
            if httpx.get(url + "/api/info", timeout=5).status_code == 200:
                wait_idle(proc.pid, deadline)
                return proc, url
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


def wait_idle(pid: int, deadline: float) -> None:
    """Until the server's processes stop using CPU: every worker has loaded its model."""
    before = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu_seconds(pid)
        if now - before < 0.05:
            return
        before = now


def upload(client, data: bytes, raw: bool = False) -> float:
    t0 = time.perf_counter()
    if raw:
        r = client.post("/api/search", params={"k": "10"}, content=data,
                        headers={"content-type": "image/png"})
    else:
        r = client.post("/api/search", files={"image": ("q.png", data, "image/png")},
                        data={"k": "10"})
    if r.status_code != 200:
        raise SystemExit(f"upload answered {r.status_code}: {r.text[:200]}")
    return (time.perf_counter() - t0) * 1000


class SocketClient:
    """One keep-alive HTTP/1.1 connection that sends prebuilt requests and reads the answers:
    a load generator that costs the shared cores far less than httpx (no URL, header or
    multipart building per request), so that the server's own work sets the latency."""

    def __init__(self, url: str) -> None:
        host, port = url.split("//", 1)[1].split(":")
        self.host = f"{host}:{port}"
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def request(self, data: bytes, raw: bool) -> bytes:
        """The bytes of one upload query (built once per upload, before timing)."""
        if raw:
            ctype, body = b"image/png", data
            target = b"/api/search?k=10"
        else:
            boundary = b"strongreidbenchboundary"
            ctype = b"multipart/form-data; boundary=" + boundary
            body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="k"\r\n\r\n10\r\n'
                    + b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; '
                    b'filename="q.png"\r\nContent-Type: image/png\r\n\r\n' + data + b"\r\n--"
                    + boundary + b"--\r\n")
            target = b"/api/search"
        return (b"POST " + target + b" HTTP/1.1\r\nHost: " + self.host.encode() +
                b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\n\r\n" + body)

    def send(self, request: bytes) -> float:
        t0 = time.perf_counter()
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status = head[9:12]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.buf) < length:
            self.buf += self._recv()
        body, self.buf = self.buf[:length], self.buf[length:]
        if status != b"200":
            raise SystemExit(f"upload answered {status.decode()}: {body[:200]!r}")
        return (time.perf_counter() - t0) * 1000

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise SystemExit("the server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def pct(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1), "n": len(ms)}


def bench_latency(url: str, pid: int, uploads: list[bytes], single: int, clients: int,
                  per_client: int, raw: bool = False, client_kind: str = "httpx") -> dict:
    if client_kind == "socket":
        return _bench_latency_sockets(url, pid, uploads, single, clients, per_client, raw)
    import httpx

    with httpx.Client(base_url=url, timeout=300) as client:
        for data in uploads[:3] * 2:  # warm-up: first forward passes, allocator, every worker
            upload(client, data, raw)
        alone = [upload(client, uploads[i % len(uploads)], raw) for i in range(single)]

        def worker(c: int) -> list[float]:
            return [upload(client, uploads[(c * per_client + i) % len(uploads)], raw)
                    for i in range(per_client)]

        return _loaded(alone, worker, pid, clients)


def _bench_latency_sockets(url: str, pid: int, uploads: list[bytes], single: int, clients: int,
                           per_client: int, raw: bool) -> dict:
    conns = [SocketClient(url) for _ in range(clients)]
    try:
        requests = [conns[0].request(data, raw) for data in uploads]
        for c in conns:  # warm-up: every connection, first forward passes, every worker
            c.send(requests[0])
        alone = [conns[0].send(requests[i % len(requests)]) for i in range(single)]

        def worker(c: int) -> list[float]:
            return [conns[c].send(requests[(c * per_client + i) % len(requests)])
                    for i in range(per_client)]

        return _loaded(alone, worker, pid, clients)
    finally:
        for c in conns:
            c.close()


def _loaded(alone: list[float], worker, pid: int, clients: int) -> dict:
    """`clients` concurrent workers, timed with the server's and this process's CPU."""
    server0, client0, t0 = cpu_seconds(pid), time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        loaded = [ms for part in pool.map(worker, range(clients)) for ms in part]
    wall = time.perf_counter() - t0
    server_cpu, client_cpu = cpu_seconds(pid) - server0, time.process_time() - client0
    single_p50 = float(np.percentile(alone, 50))
    n = len(loaded)
    return {"single": pct(alone), f"concurrent_{clients}": pct(loaded),
            "throughput_qps": round(n / wall, 1),
            "p95_concurrent_over_single_p50": round(float(np.percentile(loaded, 95)) / single_p50, 2),
            "server_cpu_ms_per_query": round(server_cpu * 1000 / n, 2),
            "client_cpu_ms_per_query": round(client_cpu * 1000 / n, 2),
            "cores_busy": round((server_cpu + client_cpu) / wall, 2)}


def bench_memory(url: str, pid: int, big: int) -> dict:
    import httpx
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4096, 4096), (90, 120, 150)).save(buf, "PNG", optimize=True)
    data = buf.getvalue()
    before = status_kb(pid, "VmRSS")
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(status_kb(pid, "VmRSS"))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with httpx.Client(base_url=url, timeout=600) as client, ThreadPoolExecutor(big) as pool:
        ms = list(pool.map(lambda _: upload(client, data), range(big)))
    done.set()
    sampler.join()
    time.sleep(3)
    mib = 1 / 1024
    return {"uploads": big, "png_bytes": len(data), "rss_before_mib": round(before * mib),
            "rss_peak_sampled_mib": round(max(samples) * mib),
            "vm_hwm_mib": round(status_kb(pid, "VmHWM") * mib),
            "rss_after_3s_mib": round(status_kb(pid, "VmRSS") * mib), "latency": pct(ms)}


def forward_costs(model: Path, uploads: list[bytes]) -> dict:
    """The served forward pass alone, by runtime: wall time and CPU per image by batch size, on
    one and on two threads. Runtimes: the traced graph (`--runtime torch`), onnxruntime fp32
    (`--runtime onnxruntime`, what `auto` serves) and, for comparison, the same graph quantised to
    int8 (deploy.quantize, calibrated on the uploads; its features' cosine to fp32 reported)."""
    import torch

    from strongreid.deploy.export import InferenceModel, write_onnx
    from strongreid.deploy.extractor import FeatureExtractor
    from strongreid.deploy.quantize import int8_parity, quantize_int8
    from strongreid.deploy.runtimes import run_onnx
    from strongreid.search.service import TracedFeatures, decode_upload

    extractor = FeatureExtractor(None, model, device="cpu")
    traced = TracedFeatures.wrap(extractor)
    crops = extractor.preprocess([decode_upload(u) for u in uploads]).numpy()
    calib = [crops[i:i + 8] for i in range(0, len(crops), 8)]
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-forward-") as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        graph = InferenceModel(extractor.model, extractor.flip, extractor.feat_norm,
                               extractor.scales).eval()
        write_onnx(graph, torch.from_numpy(calib[0]), fp32, {})
        quantize_int8(fp32, int8, calib)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runtimes = {"torch": lambda x: traced.graph(torch.from_numpy(x)),
                        "onnxruntime": run_onnx(fp32, threads, spin=False),
                        "onnxruntime_int8": run_onnx(int8, threads, spin=False)}
            if threads == 1:
                out["int8_parity"] = int8_parity(runtimes["onnxruntime"],
                                                 runtimes["onnxruntime_int8"], calib)
            for name, run in runtimes.items():
                for batch in (1, 4, 8, 16):
                    x = np.ascontiguousarray(np.resize(crops, (batch, *crops.shape[1:])))
                    walls, cpus = [], []
                    with torch.inference_mode():
                        for i in range(35):
                            w0, c0 = time.perf_counter(), time.process_time()
                            run(x)
                            if i >= 5:  # the first passes warm the allocators and oneDNN
                                walls.append(time.perf_counter() - w0)
                                cpus.append(time.process_time() - c0)
                    out[f"{name}_threads{threads}_batch{batch}"] = {
                        "wall_ms": round(float(np.median(walls)) * 1000, 2),
                        "cpu_ms_per_image": round(float(np.median(cpus)) * 1000 / batch, 2)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server-src", default=str(ROOT / "src"),
                    help="the src folder whose strongreid the server runs")
    ap.add_argument("--single", type=int, default=40, help="uploads one at a time")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=10)
    ap.add_argument("--big", type=int, default=32, help="concurrent 4096x4096 uploads (0: no memory phase)")
    ap.add_argument("--body", choices=("multipart", "raw"), default="multipart",
                    help="uploads as a multipart form or as a raw image body (Content-Type image/png)")
    ap.add_argument("--client", choices=("httpx", "socket"), default="httpx",
                    help="the load generator: httpx clients, or prebuilt requests over plain "
                         "keep-alive sockets (far less client CPU on the server's cores)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="an option passed to `strongreid serve` (repeatable: --server-arg=--workers=2)")
    ap.add_argument("--forward-only", action="store_true",
                    help="time the forward pass alone by runtime (no server)")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        gallery, model, uploads = build(Path(tmp))
        if args.forward_only:
            print(json.dumps(forward_costs(model, uploads), indent=2))
            return 0
        extra = tuple(args.server_arg)
        result: dict = {"server_src": args.server_src, "server_args": list(extra),
                        "body": args.body, "client": args.client, "load_before": os.getloadavg()}
        # Memory first, on a fresh server: its RSS says what the big uploads cost.
        if args.big > 0:
            proc, url = start_server(gallery, model, Path(args.server_src), extra)
            try:
                result["memory"] = bench_memory(url, proc.pid, args.big)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
        proc, url = start_server(gallery, model, Path(args.server_src), extra)
        try:
            result["latency"] = bench_latency(url, proc.pid, uploads, args.single, args.clients,
                                              args.per_client, args.body == "raw", args.client)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
