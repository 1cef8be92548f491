"""`trainer serve` under load from a compiled load generator (`hey`), against a bare ASGI app
on the same server stack parsing the same body (scripts/bare_asgi.py), and against that app
doing only what any server of the model must (parse, one onnxruntime call, reply), in one
invocation.

    .venv/bin/python scripts/bench_serve.py [--model MODEL.onnx] [--requests 3000] [--repeats 3]

Each request is one real MNIST test image as a JSON pixel array (`{"instances": [...]}`),
POSTed to /predict, at each --concurrency; `trainer serve` runs with batching on (64, 5 ms)
and off (--max-batch-size 1). Printed per setting: req/s and p99 latency (median and range
of --repeats runs), the ratio to the bare app at the same concurrency, and the server's CPU
time per request (utime + stime of its process tree from /proc, over the run). hey is Go
and runs in its own process, but on a small machine it shares the cores with the server:
the bare app's figures are the ceiling of that whole loopback system. Without --model it
trains and exports the speedrun recipe (as bench_export.py does). Needs `hey` on PATH
(Debian/Ubuntu: apt-get install hey; or go install github.com/rakyll/hey@latest).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def start_serve(model: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    """`trainer serve --model MODEL FLAGS` on a free port, once /health answers 200."""
    port = _port()
    return start([sys.executable, "-m", "trainer", "serve", "--model", str(model), "--port",
                  str(port), *flags], port, "/health"), port


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def start(command: list[str], port: int, health: str) -> subprocess.Popen:
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    for _ in range(1200):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", health)
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server failed: {proc.stderr.read()}")
        time.sleep(0.1)
    raise SystemExit("server did not start in 120 s")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its children, alive or reaped by it."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], text=True,
                                                   capture_output=True).stdout.split()]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15]) / tick  # utime stime cutime cstime
    return total


def hey(port: int, body: Path, concurrency: int, requests: int, server: int):
    """One run: (req/s, p99 ms, server CPU ms per request)."""
    before = cpu_seconds(server)
    out = subprocess.run(["hey", "-n", str(requests), "-c", str(concurrency), "-t", "20",
                          "-m", "POST", "-T", "application/json", "-D", str(body),
                          f"http://127.0.0.1:{port}/predict"],
                         capture_output=True, text=True, timeout=300).stdout
    cpu = cpu_seconds(server) - before
    codes = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    if set(codes) != {"200"} or int(codes["200"]) != requests // concurrency * concurrency:
        raise SystemExit(f"not every request answered 200: {codes}\n{out[-1500:]}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = float(re.search(r"99%+ in ([\d.]+) secs", out).group(1)) * 1e3
    return rate, p99, cpu / requests * 1e3


def measure(label: str, proc: subprocess.Popen, port: int, body: Path, args) -> dict:
    results = {}
    try:
        hey(port, body, 8, 500, proc.pid)  # warm-up
        for c in args.concurrency:
            runs = [hey(port, body, c, args.requests, proc.pid) for _ in range(args.repeats)]
            results[c] = runs
            print(f"{label:24} c={c:3}: {spread([r for r, _, _ in runs])} req/s; p99 "
                  f"{spread([p for _, p, _ in runs], '{:.2f}')} ms; server CPU "
                  f"{spread([m for _, _, m in runs], '{:.3f}')} ms/request", flush=True)
    finally:
        stop(proc)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--requests", type=int, default=3000, help="requests per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    if shutil.which("hey") is None:
        raise SystemExit("bench_serve needs the load generator hey on PATH: apt-get install "
                         "hey (Debian/Ubuntu) or go install github.com/rakyll/hey@latest")
    print(describe())
    print("hey:", subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "hey"],
                                 capture_output=True, text=True).stdout or "version unknown")
    from export.readers import read_idx

    if not (MNIST / "t10k-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"real MNIST not found at {MNIST}")
    x = read_idx(MNIST / "t10k-images-idx3-ubyte.gz", 2051)[:1, None]
    with tempfile.TemporaryDirectory() as work:
        body = Path(work) / "body.json"
        body.write_text(json.dumps({"instances": [x[0].tolist()]}))
        model = args.model or _model(Path(work))
        bare = {}
        for label, extra in (("bare uvicorn app", []), ("bare app + model", [str(model)])):
            port = _port()
            bare[label] = measure(label, start([sys.executable, str(ROOT / "scripts" /
                                                                "bare_asgi.py"), str(port),
                                                *extra], port, "/"), port, body, args)
        served = {}
        for label, size in (("serve, batching on", "64"), ("serve, batching off", "1")):
            proc, port = start_serve(model, "--workers", str(args.workers),
                                     "--max-batch-size", size)
            served[label] = measure(label, proc, port, body, args)
    for c in args.concurrency:
        base, floor = ([r for r, _, _ in runs[c]] for runs in bare.values())
        on, off = ([r for r, _, _ in served[k][c]] for k in served)
        print(f"c={c:3}: serve / bare app {ratio_of_medians(on, base):.2f}x (batching on), "
              f"{ratio_of_medians(off, base):.2f}x (off); batching on / off "
              f"{ratio_of_medians(on, off):.2f}x; the bare app + model / bare app "
              f"{ratio_of_medians(floor, base):.2f}x (what any server of this model on this "
              f"stack is held to), serve / it {ratio_of_medians(on, floor):.2f}x (on), "
              f"{ratio_of_medians(off, floor):.2f}x (off)")


if __name__ == "__main__":
    main()
