"""`trainer serve` under load, in one invocation: a closed-loop client on loopback sends
single-image requests (real MNIST test images as JSON pixel arrays) at concurrency 1, 8 and
64, against the server with dynamic batching on and off (--max-batch-size 1); the
in-process Predictor on the same images is the ceiling.

    .venv/bin/python scripts/bench_serve.py [--model MODEL.onnx] [--requests 1500] [--repeats 3]

Without --model it trains and exports the speedrun recipe (as bench_export.py does). The
client runs in this process (threads, one keep-alive connection each), so on a small
machine it shares the cores with the server: the figures are the whole loopback system's.
Each measurement is bounded in requests and in time (--max-seconds per run).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from machine import describe, ratio_of_medians, spread

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MNIST = ROOT.parent / "shared" / "data" / "mnist"


def _model(work: Path) -> Path:
    from bench_export import recipe_checkpoint
    from trainer.freeze import export_checkpoint

    out = work / "model.onnx"
    export_checkpoint(recipe_checkpoint(work), out)
    return out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "serve", "--model", str(model),
                             "--port", str(port), *flags], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server failed: {proc.stderr.read()}")
        time.sleep(0.1)
    raise SystemExit("server did not start in 60 s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def load(port: int, bodies: list[bytes], concurrency: int, requests: int,
         max_seconds: float) -> tuple[float, list[float]]:
    """Closed loop: each thread sends its next request when the last one is answered.
    Returns requests/s and the latencies (ms)."""
    latencies, lock, sent = [], threading.Lock(), [0]
    deadline = time.perf_counter() + max_seconds

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        while True:
            with lock:
                if sent[0] >= requests or time.perf_counter() > deadline:
                    break
                i = sent[0]
                sent[0] += 1
            t = time.perf_counter()
            conn.request("POST", "/predict", bodies[i % len(bodies)],
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise SystemExit(f"request failed with HTTP {resp.status}")
            mine.append((time.perf_counter() - t) * 1e3)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return len(latencies) / (time.perf_counter() - t), latencies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--requests", type=int, default=1500, help="requests per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=20.0, help="time bound of one run")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    print(describe())
    from export.readers import read_idx
    from export.runtime import Predictor

    if not (MNIST / "t10k-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"real MNIST not found at {MNIST}")
    x = read_idx(MNIST / "t10k-images-idx3-ubyte.gz", 2051)[:2000, None]
    bodies = [json.dumps({"instances": [img.tolist()]}).encode() for img in x]
    with tempfile.TemporaryDirectory() as work:
        model = args.model or _model(Path(work))

        predictor = Predictor(model)
        singles, batched = [], []
        for _ in range(5):
            t = time.perf_counter()
            for i in range(500):
                predictor.predict(x[i:i + 1])
            singles.append(500 / (time.perf_counter() - t))
            t = time.perf_counter()
            for i in range(0, 2000, 64):
                predictor.predict(x[i:i + 64])
            batched.append(2000 / (time.perf_counter() - t))
        print(f"ceiling, in-process Predictor: {spread(singles)} images/s one at a time, "
              f"{spread(batched)} images/s in batches of 64")

        results = {}
        for label, flags in (("batching on (64, 5 ms)", ["--max-batch-size", "64"]),
                             ("batching off", ["--max-batch-size", "1"])):
            proc, port = start(model, "--workers", str(args.workers), *flags)
            try:
                load(port, bodies, 8, 200, args.max_seconds)  # warm-up
                for c in args.concurrency:
                    runs = [load(port, bodies, c, args.requests, args.max_seconds)
                            for _ in range(args.repeats)]
                    rates = [r for r, _ in runs]
                    p50 = [float(np.percentile(lat, 50)) for _, lat in runs]
                    p99 = [float(np.percentile(lat, 99)) for _, lat in runs]
                    results[label, c] = rates
                    print(f"{label:24} concurrency {c:3}: {spread(rates)} req/s; "
                          f"p50 {spread(p50, '{:.2f}')} ms; p99 {spread(p99, '{:.2f}')} ms")
            finally:
                stop(proc)
        for c in args.concurrency:
            print(f"batching on / off at concurrency {c}: "
                  f"{ratio_of_medians(results['batching on (64, 5 ms)', c], results['batching off', c]):.2f}x")
        best = max(statistics.median(v) for v in results.values())
        print(f"workers {args.workers}, cores {os.cpu_count()}: best median {best:,.0f} req/s")


if __name__ == "__main__":
    main()
