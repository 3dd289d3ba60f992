"""Throughput and latency of `patchcore serve` against the library's batch predict.

Fits (or reuses) an efficientnet_lite2 model on magnetic_tile, then measures

* the CLI path: `PatchCore.predict(files)` over the test images (what `patchcore predict` runs,
  without writing outputs), images per second;
* the service, started as `patchcore serve` in its own process, with micro-batching
  (--max-batch 8) and without (--max-batch 1): requests per second, p50 and p99 latency at
  concurrency 1, 4 and 16 (one image per request, multipart upload), and the server's peak RSS.

Writes benchmarks/out/serve.json and prints a Markdown table. Not a test: timings depend on the
machine and on what else runs on it.

    python benchmarks/serve_bench.py --train 100 --requests 96
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "magnetic_tile"
OUT = ROOT / "benchmarks" / "out"


def fit_model(folder: Path, train: int, threads: int) -> None:
    """Fit efficientnet_lite2 on the first `train` training images (kept when present)."""
    from patchcore import PatchCore
    from patchcore.storage import is_model_folder

    if is_model_folder(folder):
        return
    files = sorted((DATA / "train" / "good").glob("*.jpg"))[:train]
    import torch

    torch.set_num_threads(threads)
    model = PatchCore(backbone="efficientnet_lite2", percentage=0.1, resize=256, imagesize=224,
                      device="cpu", progress=False)
    model.fit(files).save(folder)


def library_throughput(folder: Path, files: list[Path], threads: int, batch: int) -> dict:
    """Images/s of PatchCore.predict on all `files` at once (the CLI's batch path)."""
    import torch

    from patchcore import PatchCore

    torch.set_num_threads(threads)
    model = PatchCore.load(folder, device="cpu", batch_size=batch, progress=False)
    model.predict(files[:2])  # warm-up
    out: dict = {"images": len(files)}
    for where in ("main_thread", "worker_thread"):  # the CLI runs in the main thread
        seconds: list[float] = []

        def timed(seconds: list[float] = seconds) -> None:
            start = time.perf_counter()
            model.predict(files)
            seconds.append(time.perf_counter() - start)

        if where == "main_thread":
            timed()
        else:
            worker = threading.Thread(target=timed)
            worker.start()
            worker.join()
        out[where] = {"seconds": round(seconds[0], 2),
                      "images_per_s": round(len(files) / seconds[0], 2)}
    out["images_per_s"] = out["main_thread"]["images_per_s"]
    return out


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(folder: Path, port: int, max_batch: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PATCHCORE_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "patchcore.cli", "-q", "serve", str(folder), "--port",
           str(port), "--device", "cpu", "--max-batch", str(max_batch), "--batch-size",
           str(max(8, max_batch)), "--queue-size", "64", "--db", str(OUT / "serve_bench.sqlite")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become ready")


def load(url: str, bodies: list[tuple[str, bytes]], concurrency: int, requests: int) -> dict:
    """`requests` single-image predictions from `concurrency` clients."""
    latencies: list[float] = []
    errors = 0

    with httpx.Client(base_url=url, timeout=120) as http:
        def one(i: int) -> None:
            nonlocal errors
            name, data = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            r = http.post("/v1/models/model/predict", files={"image": (name, data, "image/jpeg")})
            latencies.append(time.perf_counter() - t0)
            errors += r.status_code != 200

        for i in range(min(concurrency, 4)):  # warm-up
            one(i)
        latencies.clear()
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))
        seconds = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"concurrency": concurrency, "requests": requests, "errors": errors,
            "requests_per_s": round(requests / seconds, 2), "p50_ms": round(q[49] * 1000, 1),
            "p99_ms": round(q[98] * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=100, help="training images")
    parser.add_argument("--requests", type=int, default=96, help="requests per level")
    parser.add_argument("--images", type=int, default=96, help="test images used")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    work = OUT / "serve_bench"
    folder = work / "model"
    fit_model(folder, args.train, args.threads)
    files = sorted((DATA / "test").glob("*/*.jpg"))[:: max(1, 592 // args.images)][:args.images]
    bodies = [(p.name, p.read_bytes()) for p in files]
    result: dict = {"machine": f"{platform.processor() or platform.machine()}, "
                    f"{os.cpu_count()} CPUs, torch threads {args.threads}",
                    "when": time.strftime("%Y-%m-%d %H:%M"), "images": len(files),
                    "library_batch": library_throughput(folder, files, args.threads, 8),
                    "service": []}
    for max_batch in (8, 1):
        proc = start_server(folder, args.port, max_batch, args.threads)
        try:
            for c in args.concurrency:
                row = {"max_batch": max_batch,
                       **load(f"http://127.0.0.1:{args.port}", bodies, c, args.requests)}
                result["service"].append(row)
                print(json.dumps(row), flush=True)
            result["service"][-1]["server_peak_rss_mb"] = round(peak_rss_mb(proc.pid))
        finally:
            proc.terminate()
            proc.wait(30)
    (OUT / "serve.json").write_text(json.dumps(result, indent=2))
    lib = result["library_batch"]["images_per_s"]
    thread = result["library_batch"]["worker_thread"]["images_per_s"]
    print(f"\nlibrary batch predict: {lib} img/s in the main thread (as the CLI), {thread} "
          f"img/s in a worker thread ({result['machine']})\n")
    print("| micro-batching | concurrency | req/s | p50 ms | p99 ms | errors | vs batch |")
    print("|---|---|---|---|---|---|---|")
    for r in result["service"]:
        print(f"| {'max 8' if r['max_batch'] > 1 else 'off'} | {r['concurrency']} | "
              f"{r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | "
              f"{r['requests_per_s'] / lib:.0%} |")


if __name__ == "__main__":
    main()
