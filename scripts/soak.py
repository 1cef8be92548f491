"""Soak: what runs for days or over huge inputs must not grow (issue #29).

    .venv/bin/python scripts/soak.py [--requests 100000] [--rows 100000 10000000]
                                     [--images 10000 100000] [--only serve|csv|images]

- serve: `trainer serve` (digits model) gets a warm-up, then --requests requests from `hey`
  (the compiled load generator; `apt-get install hey`), half good (JSON pixels, a raw PNG)
  and half of every class the server refuses (not JSON, wrong shape, values out of range,
  too many instances, an unknown content type, a bad top_k). The server's RSS (its process
  and every child: API servers, workers) is read after the warm-up and at the end: it may
  grow by at most 20 MB.
- csv: `trainer predict` of a wine model over a CSV of each --rows size; its peak RSS must
  not grow with the rows (bounded chunks).
- images: `trainer predict` over PNG folders of each --images size; its peak RSS must
  not grow with the images (the listing is streamed).

Prints the machine, every figure and PASS/FAIL per check; exit 1 on a FAIL.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_serve import start_serve, stop
from machine import describe

ROOT = Path(__file__).resolve().parents[1]
GROWTH_MB = 20


def trainer(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"trainer {args[0]} failed: {proc.stderr[-2000:]}")
    return proc


def fit(config: str, work: Path, *extra: str) -> Path:
    trainer("fit", "--config", str(ROOT / "configs" / config), "--trainer.max_epochs", "3",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir",
            str(work / "runs"), "--report.plots", "false", *extra, cwd=work)
    return next((work / "runs").rglob("model.onnx"))


def tree_rss_mb(pid: int) -> float:
    """RSS of `pid` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def bodies(x: np.ndarray) -> list[tuple[str, str, bytes, int]]:
    """(name, content type, body, share of the requests): half good, half refused."""
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(x[0, 0]).save(png, format="PNG")
    one = json.dumps({"instances": x[:1].tolist()}).encode()
    return [
        ("good json", "application/json", one, 4),
        ("good png", "image/png", png.getvalue(), 2),
        ("good base64 png", "application/json",
         json.dumps({"instances": [base64.b64encode(png.getvalue()).decode()]}).encode(), 2),
        ("not json", "application/json", b"{not json", 1),
        ("wrong shape", "application/json", json.dumps({"instances": [[[1, 2], [3, 4]]]}).encode(), 1),
        ("out of range", "application/json",
         json.dumps({"instances": (x[:1].astype(int) + 300).tolist()}).encode(), 1),
        ("too many instances", "application/json",
         json.dumps({"instances": x[:1].tolist() * 2000}).encode(), 1),
        ("unknown type", "text/plain", b"hello", 1),
        ("not an image", "image/png", b"\x89PNG garbage", 1),
    ]


def hey(port: int, content_type: str, body: Path, n: int, query: str = "") -> set[int]:
    """Send `n` copies of `body`; the HTTP statuses they got."""
    out = subprocess.run(["hey", "-n", str(n), "-c", "16", "-m", "POST", "-T", content_type,
                          "-D", str(body), f"http://127.0.0.1:{port}/predict{query}"],
                         check=True, capture_output=True, text=True, timeout=3600).stdout
    return {int(m) for m in re.findall(r"\[(\d{3})\]\s+\d+ responses", out)}


def soak_serve(work: Path, requests: int) -> bool:
    if shutil.which("hey") is None:
        raise SystemExit("serve soak needs the compiled load generator hey: apt-get install hey")
    model = fit("digits.yaml", work)
    trainer("data", "--config", str(ROOT / "configs" / "digits.yaml"), "--split", "test",
            "--out", str(work / "x.npz"), cwd=work)
    x = np.load(work / "x.npz")["x"]
    kinds = bodies(x)
    files = []
    for i, (name, ctype, body, share) in enumerate(kinds):
        (work / f"body{i}").write_bytes(body)
        files.append((name, ctype, work / f"body{i}", share))
    server, port = start_serve(model)
    try:
        statuses: dict[str, set[int]] = {}

        def round_of(total: int) -> None:
            unit = total / sum(f[3] for f in files)
            for name, ctype, path, share in files:
                statuses.setdefault(name, set()).update(
                    hey(port, ctype, path, max(16, int(unit * share))))
            statuses.setdefault("bad top_k", set()).update(
                hey(port, "application/json", files[0][2], max(16, int(unit)), "?top_k=0"))

        round_of(5000)  # warm-up: every path taken, every buffer sized
        before, t0 = tree_rss_mb(server.pid), time.perf_counter()
        for _ in range(10):
            round_of(requests // 10)
        after = tree_rss_mb(server.pid)
        alive = server.poll() is None
    finally:
        stop(server)
    answered = all(statuses[name] == ({200} if name.startswith("good") else
                                      statuses[name] & set(range(400, 500)) or {0})
                   for name in statuses)
    print("serve: statuses " + ", ".join(f"{k} {sorted(v)}" for k, v in statuses.items()))
    ok = alive and answered and after - before <= GROWTH_MB
    print(f"serve: {requests:,} requests ({len(files)} kinds + bad top_k, half refused) in "
          f"{time.perf_counter() - t0:.0f} s: server tree RSS {before:.1f} -> {after:.1f} MB "
          f"({after - before:+.1f}, at most +{GROWTH_MB}) {'PASS' if ok else 'FAIL'}")
    return ok


def peak_rss_mb(*args: str, cwd: Path) -> float:
    """Peak RSS of one `trainer` process: VmHWM of its own memory map at exit (ru_maxrss
    would carry the high-water mark of the process that started it)."""
    code = ("import re, runpy, sys; sys.argv = ['trainer', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('trainer', run_name='__main__')\n"
            "finally:\n    hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())\n"
            "    print('PEAK', hwm.group(1), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if "PEAK" not in proc.stderr or proc.returncode not in (0, None):
        raise SystemExit(f"trainer {args[0]} failed: {proc.stderr[-2000:]}")
    return int(proc.stderr.rsplit("PEAK", 1)[1].split()[0]) / 1024


def soak_csv(work: Path, sizes: list[int]) -> bool:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    from sklearn.datasets import load_wine

    wine = load_wine()
    table = work / "wine.csv"
    cols = {n: wine.data[:, i] for i, n in enumerate(wine.feature_names)}
    pacsv.write_csv(pa.table({**cols, "label": [str(t) for t in wine.target]}), table)
    model = fit("tabular.yaml", work, "--data.root", str(table), "--data.target", "label")
    peaks = []
    rng = np.random.default_rng(0)
    for rows in sizes:
        path = work / f"rows{rows}.csv"
        with pacsv.CSVWriter(path, pa.schema([(n, pa.float64()) for n in cols])) as w:
            for at in range(0, rows, 500_000):
                pick = rng.integers(0, len(wine.data), min(500_000, rows - at))
                w.write_table(pa.table({n: v[pick] for n, v in cols.items()}))
        t0 = time.perf_counter()
        peaks.append(peak_rss_mb("predict", "--model", str(model), "--input", str(path),
                                 "--output", str(work / f"p{rows}.csv"), "--no-progress",
                                 cwd=work))
        print(f"csv: {rows:,} rows: peak RSS {peaks[-1]:.1f} MB, {time.perf_counter() - t0:.0f} s")
        path.unlink()
        (work / f"p{rows}.csv").unlink()
    ok = peaks[-1] - peaks[0] <= GROWTH_MB
    print(f"csv: peak RSS {peaks[0]:.1f} MB at {sizes[0]:,} rows, {peaks[-1]:.1f} MB at "
          f"{sizes[-1]:,} ({peaks[-1] - peaks[0]:+.1f}, at most +{GROWTH_MB}) "
          f"{'PASS' if ok else 'FAIL'}")
    return ok


def soak_images(work: Path, sizes: list[int]) -> bool:
    from PIL import Image

    model = fit("digits.yaml", work)
    rng = np.random.default_rng(0)
    peaks = []
    for count in sizes:
        folder = work / f"images{count}"
        for i in range(count):
            sub = folder / f"{i // 1000:04d}"
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(sub / f"{i}.png")
        t0 = time.perf_counter()
        peaks.append(peak_rss_mb("predict", "--model", str(model), "--input", str(folder),
                                 "--output", str(work / f"p{count}.csv"), "--no-progress",
                                 cwd=work))
        print(f"images: {count:,} PNGs: peak RSS {peaks[-1]:.1f} MB, "
              f"{time.perf_counter() - t0:.0f} s")
        shutil.rmtree(folder)
    per = (peaks[-1] - peaks[0]) / max(1, sizes[-1] - sizes[0]) * 2**20
    ok = peaks[-1] - peaks[0] <= GROWTH_MB  # the listing is streamed, nothing per image held
    print(f"images: {per:,.0f} bytes of peak RSS per extra image ({sizes[0]:,} -> "
          f"{sizes[-1]:,}; {peaks[-1] - peaks[0]:+.1f} MB, at most +{GROWTH_MB}) "
          f"{'PASS' if ok else 'FAIL'}")
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 10_000_000])
    p.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--only", choices=["serve", "csv", "images"])
    args = p.parse_args()
    print(describe())
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in (("serve", lambda w: soak_serve(w, args.requests)),
                          ("csv", lambda w: soak_csv(w, args.rows)),
                          ("images", lambda w: soak_images(w, args.images))):
            if args.only in (None, name):
                work = Path(tmp) / name
                work.mkdir()
                ok = run(work) and ok
    print("resource: this process peaked at "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
