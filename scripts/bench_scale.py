"""Datasets of any size: ingest, update and streaming, each against a same-run baseline.

    .venv/bin/python scripts/bench_scale.py [--images 20000] [--size 32] [--repeats 3]
                                            [--table-rows 2000000] [--work /tmp/bench_scale]
                                            [--only ingest|update|epochs|tabular]

In one invocation, on generated data (random RGB PNGs in 10 class folders; a 20-file
Parquet table of 16 float features and a class column), median (range) of --repeats:
- ingest of the image folder into a fresh cache (whole process: `load_source` in a
  subprocess) in images/s, against a plain thread-pool pillow decode of the same files
  (open, convert, resize, np.asarray; one thread per core) in the same run;
- re-ingest after adding 1% new images, as a share of the first ingest (in-process, the
  imports excluded; the new files older than the racy window, as files a user added
  before a run are), with the listing and stat of every file alone beside it (`--only
  update`: these two groups alone, without the 4x folder the memory runs need);
- peak RSS above the process's own base (VmHWM minus RSS after imports) at 1x and 4x the
  images of: an ingest, a start with nothing changed, and a one-epoch fit from the
  streaming path (MLP, batch 256): flat means bounded;
- an epoch of the streaming path (pread of whole blocks, block shuffle) against the
  in-memory path over the same rows: the training loader alone (batches/s; streaming
  with 0 and 2 DataLoader workers) and a whole training epoch of a small convnet;
- tabular ingest of the Parquet folder against `pyarrow.dataset(...).to_table()` alone,
  with the ceiling of any content-keyed cache beside it: the files' SHA-256 + to_table,
  and + writing the decoded rows (fsync'ed).

One measurement of a folder of your own, in this process (JSON: seconds, rows, peak RSS
above base): `--child ingest|fit|listing|job-listing --root FOLDER [--cache CACHE]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from machine import describe, ratio_of_medians, spread  # noqa: E402

from export.timing import usable_cores


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def make_images(root: Path, n: int, size: int, first: int = 0) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def one(i: int) -> None:
        rng = np.random.default_rng(i)
        path = root / f"c{i % 10}" / f"{i:07d}.png"
        base = rng.integers(0, 256, (1, 1, 3))
        noise = rng.integers(0, 48, (size, size, 3))
        Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(path, compress_level=1)

    for c in range(10):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor() as pool:
        list(pool.map(one, range(first, first + n)))


def child(args) -> None:
    """One measurement in a fresh process; prints JSON."""
    from trainer.data.dataset import SourceOptions
    from trainer.data.sources import load_source

    import export.imaging  # noqa: F401  (imports are process start, not ingest)
    import pyarrow.dataset
    import pyarrow.ipc

    if args.child == "fit":
        import lightning as L

        from trainer.data.datamodule import FixedDataModule
        from trainer.module import ClassifierModule
    base, extra = _rss("VmRSS"), {}
    t0, c0 = time.perf_counter(), os.times()
    if args.child in ("listing", "job-listing"):  # an image folder's listing alone
        from export.readers import iter_image_files
        from trainer.data.image_folder import _layout

        root = Path(args.root)
        rows = len(_layout(root)[0]) if args.child == "listing" else \
            sum(1 for _ in iter_image_files(root))
        print(json.dumps({"seconds": time.perf_counter() - t0, "rows": rows,
                          "peak": _rss("VmHWM") - base}))
        return
    if args.child == "to_table":  # the baselines of the tabular ingest, in a fresh process too
        rows = pyarrow.dataset.dataset(args.root, format="parquet").to_table().num_rows
        extra = {"warm": _timed(lambda: pyarrow.dataset.dataset(
            args.root, format="parquet").to_table())}  # a second scan, its memory warm
    elif args.child == "sha256":  # on a thread per core, as the ingest hashes them
        import hashlib
        from concurrent.futures import ThreadPoolExecutor

        from export.errors import InputError

        def digest(path: Path) -> bytes:
            with open(path, "rb") as file:
                return hashlib.file_digest(file, "sha256").digest()

        files = sorted(Path(args.root).glob("*.parquet"))
        if not files:
            raise InputError("no .parquet files to hash")
        with ThreadPoolExecutor(usable_cores()) as pool:
            list(pool.map(digest, files))
        rows = 0
    elif args.child == "ingest":
        ds = load_source("image_folder", args.root, SourceOptions(cache_dir=args.cache))
    elif args.child == "fit":  # one epoch from the streaming path, as tests/test_data_streaming.py
        dm = FixedDataModule(source="image_folder", root=args.root, cache_dir=args.cache,
                             batch_size=256, memory_budget_gb=1e-9, num_workers=0)
        model = ClassifierModule(arch="mlp", width=16, data_info=dm.info, schedule="constant")
        L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(model, dm)
        ds = dm.dataset
    else:
        ds = load_source("tabular", args.root, SourceOptions(cache_dir=args.cache, target="label"))
    seconds, c1 = time.perf_counter() - t0, os.times()
    cpu = c1.user - c0.user + c1.system - c0.system  # this process's threads (no children)
    peak = _rss("VmHWM") - base
    rows = len(ds.train) if args.child in ("ingest", "fit", "tabular") else rows
    if args.child == "tabular":  # a second first ingest (another cache), the process warm
        extra = {"warm": _timed(lambda: load_source("tabular", args.root, SourceOptions(
            cache_dir=args.cache + "-warm", target="label")))}
    print(json.dumps({"seconds": seconds, "rows": rows, "peak": peak, "cpu": cpu,
                      **extra}))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_child(kind: str, root: Path, cache: Path, fresh: bool = True) -> dict:
    if fresh:
        shutil.rmtree(cache, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--root", str(root),
                           "--cache", str(cache)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        sys.exit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plain_decode(root: Path, size: int) -> float:
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    files = sorted(root.rglob("*.png"))

    def one(p: Path) -> np.ndarray:
        with Image.open(p) as img:
            return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for _ in pool.map(one, files, chunksize=64):
            pass
    return len(files) / (time.perf_counter() - t0)


def _datamodule(root: Path, cache: Path, streaming: bool, workers: int):
    from trainer.data.datamodule import FixedDataModule

    return FixedDataModule(source="image_folder", root=str(root), cache_dir=str(cache),
                           batch_size=256, memory_budget_gb=1e-9 if streaming else 64,
                           num_workers=workers)


def loader_rate(root: Path, cache: Path, streaming: bool, workers: int) -> float:
    """Batches/s of the training loader alone (no model)."""
    dm = _datamodule(root, cache, streaming, workers)
    dm.setup("fit")
    loader = dm.train_dataloader()
    t0, n = time.perf_counter(), 0
    for _ in loader:
        n += 1
    return n / (time.perf_counter() - t0)


def fit_rate(root: Path, cache: Path, streaming: bool, workers: int) -> float:
    """Training samples/s of one epoch of a small convnet (the model's own work included,
    as in a real fit), validation off."""
    import lightning as L

    from trainer.module import ClassifierModule

    dm = _datamodule(root, cache, streaming, workers)
    model = ClassifierModule(arch="stridenet", width=16, data_info=dm.info, schedule="constant")
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    return len(dm.splits["train"]) / (time.perf_counter() - t0)


def quiet():
    import contextlib
    import io

    return contextlib.redirect_stderr(io.StringIO())


def bench_ingest(args, work: Path, small: Path) -> None:
    from trainer.data.dataset import SourceOptions
    from trainer.data.filestat import RACY_NS
    from trainer.data.sources import load_source

    ours, plain, first = [], [], []
    for _ in range(args.repeats):
        r = run_child("ingest", small, work / "cache")
        ours.append(r["rows"] / r["seconds"])
        first.append(r["seconds"])
        plain.append(plain_decode(small, args.size))
    print(f"ingest {args.images:,} RGB {args.size}x{args.size} PNGs: {spread(ours)} images/s; "
          f"plain thread-pool pillow decode {spread(plain)} images/s; "
          f"ratio {ratio_of_medians(ours, plain):.2f}x (goal >= 0.8x)")

    opts = SourceOptions(cache_dir=str(work / "cache"))
    with quiet():  # imports and first touch: not timed
        load_source("image_folder", str(small), opts)
    again = []
    for r in range(args.repeats):
        make_images(small, args.images // 100, args.size, first=10_000_000 + r * args.images)
        # An update records a file whose mtime lies within RACY_NS of its start as racily
        # clean, and the next update reads and hashes it again (filestat.py): files made
        # just before each update would make every repeat after the first also re-read the
        # 1% of the one before. A user's files are added before a run, not within seconds.
        time.sleep(RACY_NS / 1e9 + 0.2)
        t0 = time.perf_counter()
        with quiet():
            load_source("image_folder", str(small), opts)
        again.append(time.perf_counter() - t0)
    share = [100 * a / float(np.median(first)) for a in again]
    floor, spread_floor, whole = [], [], float(np.median(first))
    for _ in range(args.repeats):  # what any update must do: list and stat every file,
        t0 = time.perf_counter()   # each by its name in its open folder (the cheapest stat)
        listed = list(os.walk(small))
        t1 = time.perf_counter()
        for parent, _, names in listed:
            fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
            for n in names:
                os.stat(n, dir_fd=fd)
            os.close(fd)
        t2 = time.perf_counter()
        floor.append(100 * (t2 - t0) / whole)
        # the same with the stat spread over the cores, and the new 1% decoded at the first
        # ingest's rate: the least any update that stats every file can take here
        spread_floor.append(100 * (t1 - t0 + (t2 - t1) / usable_cores()) / whole + 1)
    print(f"re-ingest after adding 1%: {spread(again, '{:.2f}')} s = {spread(share)}% of the "
          f"first ingest (goal <= 3%); listing and stat of every file alone: {spread(floor)}%; "
          f"with the stat over {usable_cores()} cores and the new 1% decoded: "
          f"{spread(spread_floor)}%")


def bench_memory(args, work: Path, small: Path, big: Path) -> None:
    peaks = {}
    for name, root in (("1x", small), ("4x", big)):
        cache = work / f"cache-{name}"
        for what, fresh in (("ingest", True), ("start, nothing changed", False)):
            peaks[what, name] = [run_child("ingest", root, cache, fresh)["peak"] / 2**20
                                 for _ in range(args.repeats)]
        peaks["fit", name] = [run_child("fit", root, cache, False)["peak"] / 2**20
                              for _ in range(args.repeats)]
    for what in ("ingest", "start, nothing changed", "fit"):
        print(f"{what} peak RSS above base: 1x {spread(peaks[what, '1x'])} MiB, 4x "
              f"{spread(peaks[what, '4x'])} MiB (goal: flat)")


def bench_epochs(args, cache: Path, big: Path) -> None:
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows = f"{4 * args.images:,} images"
    with quiet():
        mem = [loader_rate(big, cache, False, 0) for _ in range(args.repeats)]
        streams = {w: [loader_rate(big, cache, True, w) for _ in range(args.repeats)]
                   for w in (0, 2)}
    print(f"training loader alone over {rows}, batch 256 (batches/s): in memory {spread(mem)}; "
          f"streaming, no workers {spread(streams[0])} ({ratio_of_medians(streams[0], mem):.2f}x); "
          f"streaming, 2 workers {spread(streams[2])} ({ratio_of_medians(streams[2], mem):.2f}x)")
    with quiet():
        mem = [fit_rate(big, cache, False, 0) for _ in range(args.repeats)]
        stream = [fit_rate(big, cache, True, 0) for _ in range(args.repeats)]
    print(f"fit epoch over {rows} (stridenet width 16, batch 256), samples/s: streaming "
          f"{spread(stream)}, in memory {spread(mem)}, ratio {ratio_of_medians(stream, mem):.2f}x "
          f"(goal >= 0.9x)")


def bench_tabular(args, work: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = work / "table"
    table.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per = args.table_rows // 20
    for i in range(20):
        cols = {f"f{j}": rng.normal(size=per) for j in range(16)}
        pq.write_table(pa.table({**cols, "label": rng.integers(0, 10, per)}),
                       table / f"part-{i:02d}.parquet")
    # Each in a fresh process, as a user's run is: the first scan in a process pays for
    # warming its memory (to_table: 0.15 s warm, 0.17-2.8 s as a process's first on this VM).
    # The same pair with each process warm (its second run: another cache, a second scan).
    ours, arrow, floor, cpu, ours_warm, arrow_warm, floor_warm, written = ([] for _ in range(8))
    for _ in range(args.repeats):
        r = run_child("tabular", table, work / "cache-table")
        shutil.rmtree(f"{work / 'cache-table'}-warm", ignore_errors=True)
        ours.append(r["rows"] / r["seconds"])
        ours_warm.append(r["rows"] / r["warm"])
        cpu.append(r["cpu"] / r["seconds"])
        a = run_child("to_table", table, work / "unused")
        arrow.append(a["rows"] / a["seconds"])
        arrow_warm.append(a["rows"] / a["warm"])
        h = run_child("sha256", table, work / "unused")  # what a content-keyed cache cannot skip
        w = _timed(lambda: write_synced(work / "written.bin", args.table_rows * (16 * 4 + 8)))
        floor.append(args.table_rows / (a["seconds"] + h["seconds"]))
        floor_warm.append(args.table_rows / (a["warm"] + h["seconds"]))
        written.append(args.table_rows / (a["warm"] + h["seconds"] + w))
    print(f"tabular ingest, 20 Parquet files x {per:,} rows x 16 features, each its process's "
          f"first: {spread(ours)} rows/s ({spread(cpu, '{:.2f}')} of {usable_cores()} cores "
          f"busy); pyarrow.dataset().to_table() {spread(arrow)} rows/s; ratio "
          f"{ratio_of_medians(ours, arrow):.2f}x (goal >= 0.8x); ceiling of a content-keyed "
          f"ingest (SHA-256 of the files + to_table) {ratio_of_medians(floor, arrow):.2f}x")
    print(f"the same, each its process's second (memory warm): {spread(ours_warm)} vs "
          f"{spread(arrow_warm)} rows/s, ratio {ratio_of_medians(ours_warm, arrow_warm):.2f}x; "
          f"ceiling {ratio_of_medians(floor_warm, arrow_warm):.2f}x, "
          f"{ratio_of_medians(written, arrow_warm):.2f}x with the cache's rows written too "
          f"(16 float32 features + an 8-byte target a row, fsync'ed)")


def write_synced(path: Path, size: int) -> None:
    """Write `size` bytes to `path` and fsync them, 64 MiB at a time: what any cache of the
    decoded rows pays to keep them (the file is removed after)."""
    block = np.ones(64 << 20, np.uint8)  # not zeros: no filesystem skips them
    try:
        with open(path, "wb") as out:
            out.writelines(block[:min(len(block), size - a)].data
                           for a in range(0, size, len(block)))
            out.flush()
            os.fsync(out.fileno())
    finally:
        path.unlink(missing_ok=True)


MARK = ".bench_scale"  # in a --work folder this script made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--table-rows", type=int, default=2_000_000)
    ap.add_argument("--work", default="/tmp/bench_scale")
    ap.add_argument("--only", choices=["ingest", "update", "epochs", "tabular"],
                    help="run one group of measurements (update: the ingest and the 1%% "
                         "update without the memory runs and their 4x folder)")
    ap.add_argument("--child", choices=["ingest", "fit", "tabular", "listing", "job-listing",
                                        "to_table", "sha256"],
                    help="one measurement in this process (JSON: seconds, rows, peak RSS "
                         "above base); listing: an image folder's listing for training, "
                         "job-listing: for a batch job")
    ap.add_argument("--root")
    ap.add_argument("--cache")
    args = ap.parse_args()
    if args.child:
        from export.errors import InputError

        try:
            return child(args)
        # a folder of one's own: one line, not a traceback (pyarrow's ArrowInvalid is a
        # ValueError: a damaged Parquet file given to the to_table child)
        except (InputError, OSError, ValueError) as exc:
            reason = ("not found" if isinstance(exc, FileNotFoundError) else
                      str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            print(f"bench_scale: --child {args.child} --root {args.root}: {reason}",
                  file=sys.stderr)
            sys.exit(2)
    if args.images < 100 or args.repeats < 1:  # 1% of the images is the update
        ap.error("--images must be at least 100 and --repeats at least 1")
    work = Path(args.work)
    # the folder is emptied first: only one this script made (its mark inside), never a
    # folder of the user's given by mistake
    if work.exists() and any(work.iterdir()) and not (work / MARK).is_file():
        ap.error(f"--work {work}: not empty and not made by bench_scale; give a new folder")
    print(describe())
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / MARK).touch()
    small, big = work / "x1", work / "x4"
    if args.only != "tabular":
        make_images(small, args.images, args.size)
    if args.only not in ("tabular", "update"):
        make_images(big, 4 * args.images, args.size)
    if args.only in (None, "ingest", "update"):
        bench_ingest(args, work, small)
    if args.only in (None, "ingest"):
        bench_memory(args, work, small, big)
    if args.only in (None, "epochs"):
        bench_epochs(args, work / "cache-4x", big)
    if args.only in (None, "tabular"):
        bench_tabular(args, work)


if __name__ == "__main__":
    main()
