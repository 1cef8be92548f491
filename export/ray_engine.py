"""`trainer predict --engine ray`: the batch job spread over a Ray cluster with Ray Data.

The driver lists the job's work units: one per input file (Parquet, CSV, .npy, .npz) or one
per block of an image folder (streamed into a listing per block in the output folder, so the
driver holds nothing per image). Ray Data maps them through `PredictUnits`, which holds one
onnxruntime session: on CPU workers Ray Data runs it in tasks and each worker process keeps
its PredictUnits for the job (`predict_units`); GPU workers are an actor pool of it. Each
unit is exactly the local engine's job (`export/batch.run_batch`: same readers, card
checks, decoder, Predictor and output columns) writing `<out>/<unit>.parquet` atomically,
then a manifest naming the input (and its identity), rows, model SHA-256, the output's
SHA-256 and the unit's drift counts and label sums. The driver merges the manifests into
`summary.json` and `drift.json`, the same report as the local engine's on the same rows.

Exactly once: a unit's output appears whole or not at all; a worker killed mid-unit is
replaced by Ray and its task retried, continuing after the parts it had verified;
`--resume` skips the units whose manifest matches its output, model and input.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from export.atomic import atomic_path
from export.errors import InputError
from export.jobstate import no_images
from export.ray_cluster import import_ray, join_cluster
from export.records import load_json

ARRAY_SUFFIXES = (".npy", ".npz")  # a folder or glob of them: one unit a shard (Ray only)
FILE_SUFFIXES = (".parquet", ".pq", ".csv", *ARRAY_SUFFIXES)
LOCK_NAME = ".ray-job"  # the output folder's job state: holds the job's lock while it runs
LISTINGS = ".ray-listings"  # an image folder's block listings, while the job runs


@dataclass
class RayOptions:
    address: str | None = None  # None: start a local Ray instance with this machine's cores
    workers: int | None = None  # actors; default: the cluster's CPUs (or GPUs / gpus_per_worker)
    gpus_per_worker: float = 0.0
    block_images: int = 4096  # images per work unit of an image folder

    def __post_init__(self):  # messages name the command's flags
        gpus = self.gpus_per_worker
        if (self.workers is not None and self.workers < 1) or not 0 <= gpus < float("inf") \
                or (gpus > 1 and gpus != int(gpus)) or self.block_images < 1:
            raise InputError("--workers and --block-images must be >= 1, --gpus-per-worker a "
                             "share of one GPU (0 to 1) or a whole number of GPUs")


def _image_units(path: Path, block: int, folder: Path) -> list[dict]:
    """An image folder's units, streamed: each block of `block` images (in path order) is
    listed into `folder` as the local engine lists its input (name, size, mtime per line);
    a unit names its listing, with the count and SHA-256 as its identity, never the images,
    so the driver holds nothing per image (the workers read their block's listing)."""
    from export.jobstate import write_listing
    from export.readers import iter_image_files

    folder.mkdir(exist_ok=True)
    files, units = iter_image_files(path), []
    while chunk := list(itertools.islice(files, block)):
        name = f"images-{len(units):05d}"
        with atomic_path(folder / f"{name}.listing") as tmp:
            listed = write_listing(path, chunk, tmp, [])
        units.append({"input": str(path), "listing": str(folder / f"{name}.listing"),
                      "output": f"{name}.parquet", "identity": {
                          "path": str(path.resolve()),
                          "images": {k: listed[k] for k in ("count", "sha256")}}})
    if not units:
        raise no_images(path)
    return units


def list_units(source: str, block: int, folder: Path) -> list[dict]:
    """The work units of `source`: a folder, a glob or one file; `block` images per unit
    of an image folder, whose block listings go to `folder`. A folder or glob of tables is
    listed and checked as the local engine lists it (tables.table_files: names starting
    with . or _ skipped, one format, a stray file refused)."""
    from export.jobstate import input_identity
    from export.readers import IMAGE_SUFFIXES
    from export.tables import FORMATS, holds_tables, input_files, table_files

    path = Path(source)
    if path.is_dir() and not any(holds_tables(path, s) for s in (FORMATS, ARRAY_SUFFIXES)):
        return _image_units(path, block, folder)  # a folder of images, labelled by class folder
    root, files = input_files(source, "--input")
    bad = [f for f in files if f.suffix.lower() not in FILE_SUFFIXES]
    if bad:
        kind = "an image" if bad[0].suffix.lower() in IMAGE_SUFFIXES else "not an input"
        raise InputError(f"{bad[0]}: {kind} file; --engine ray takes a folder or glob of "
                         f"{', '.join(FILE_SUFFIXES)} files, or a folder of images")
    if not path.is_file() and any(f.suffix.lower() in FORMATS for f in files):
        root, files, _ = table_files(source, "--input")  # one table, of one format
    units, taken = [], set()
    schema = None if path.is_file() else _folder_schema(root, files)  # one file: read alone
    for f in files:
        name = str(f.relative_to(root).with_suffix("")).replace(os.sep, "__")
        while name in taken:  # a.npy and a.npz side by side
            name += "_"
        taken.add(name)
        units.append({"input": str(f), "listing": None, "output": f"{name}.parquet",
                      "identity": input_identity(f, None),
                      "folder": schema})
    return units


def _folder_schema(root: Path, files: list[Path]) -> dict | None:
    """How the tables under `root` read as one table (as JSON; None for array shards): a
    unit reads one file as the folder read as one table (the local engine) reads it: its
    columns and partition keys, typed alike, and a file whose columns differ refused."""
    from export.tables import FORMATS
    from export.tableschema import FolderSchema

    fmt = FORMATS.get(files[0].suffix.lower())
    return None if fmt is None else asdict(FolderSchema.of(root, files, fmt))


def manifest_path(out: Path, unit: dict) -> Path:
    return out / (unit["output"][: -len(".parquet")] + ".manifest.json")


def run_unit(predictor, unit: dict, out: Path, job_options: dict) -> dict:
    """One unit, as the local engine's job; then its manifest, written atomically."""
    from export.batch import JobOptions, run_batch
    from export.jobstate import read_listing, sha256_file
    from export.tableschema import FolderSchema

    started = time.perf_counter()
    opts = JobOptions(**{**job_options, "resume": True, "progress": False})
    output = out / unit["output"]
    images = (list(read_listing(Path(unit["input"]), Path(unit["listing"])))
              if unit["listing"] is not None else None)  # one block's images
    summary = run_batch(predictor.path, unit["input"], output, opts, predictor=predictor,
                        images=images, reports=False,
                        folder=FolderSchema.from_json(unit.get("folder")))
    manifest = {"input": unit["input"], "identity": unit["identity"],
                "folder": unit.get("folder"), "output": unit["output"],
                "output_sha256": sha256_file(output), "model_sha256": summary.model_sha256,
                "top_k": opts.top_k, "on_error": opts.on_error, "coverage": opts.coverage,
                "worker_pid": os.getpid(),
                "seconds": round(time.perf_counter() - started, 3), **summary.totals}
    with atomic_path(manifest_path(out, unit)) as tmp:
        tmp.write_text(json.dumps(manifest))
    return manifest


class PredictUnits:
    """One Predictor (one onnxruntime session) and the job's options; one unit per call."""

    def __init__(self, model: str, model_sha256: str, out: str, job_options: dict,
                 provider: str, threads: int):
        from export.runtime import Predictor

        self.predictor = Predictor(model, provider, threads)
        self.predictor.require(model_sha256)
        self.out, self.job_options = Path(out), job_options

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        outputs, rows = [], []
        for text in batch["unit"]:
            unit = json.loads(str(text))
            try:
                rows.append(run_unit(self.predictor, unit, self.out, self.job_options)["rows"])
            except InputError as exc:  # reaches the driver as the cause of Ray's error
                raise InputError(str(exc)) from None
            outputs.append(unit["output"])
        return {"output": np.asarray(outputs), "rows": np.asarray(rows, np.int64)}


_KEPT: dict[str, PredictUnits] = {}


def predict_units(batch: dict, **job) -> dict:
    """Ray Data's function for CPU workers: the worker process's PredictUnits for this job,
    made on its first unit and kept for the next ones (one session per process, as an
    actor would keep it). Tasks, not an actor pool, on CPUs: each actor is a new worker
    process that imports everything again, every job; tasks reuse the job's processes
    (docs/benchmarks.md, bench_ray). Ray ends a GPU task's process after each call, so GPU
    workers stay actors."""
    key = json.dumps(job, sort_keys=True)  # the model's SHA-256 included
    if key not in _KEPT:
        _KEPT.clear()  # one job's session at a time per process
        try:
            _KEPT[key] = PredictUnits(**job)
        except InputError as exc:  # reaches the driver as the cause of Ray's error
            raise InputError(str(exc)) from None
    return _KEPT[key](batch)


def _complete(out: Path, unit: dict, model_sha: str, job_options: dict) -> bool:
    """A unit whose manifest matches its output, the model and the options is done; one
    whose input changed since, or whose folder now reads as another table, is refused, as
    the local engine refuses it; one whose manifest is damaged is done again."""
    from export.jobstate import describe_change, sha256_file

    path = manifest_path(out, unit)
    try:
        manifest = load_json(path.read_text())  # one written before it kept "folder": as now
        change = _folder_change(manifest.get("folder", unit["folder"]), unit["folder"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # damaged: redone
        return False
    output = out / unit["output"]
    if manifest.get("identity") != unit["identity"]:
        raise InputError(f"{unit['input']}: cannot --resume: the input changed since its "
                         f"output was written: {describe_change(manifest.get('identity', {}), unit['identity'])}"
                         f"; run the job again without --resume into an empty --output")
    if change:
        raise InputError(f"{unit['input']}: cannot --resume: its folder reads as another table "
                         f"since its output was written ({change}); run the job again without "
                         f"--resume into an empty --output")
    for key, want in (("model_sha256", model_sha), ("top_k", job_options["top_k"]),
                      ("on_error", job_options["on_error"]),
                      ("coverage", job_options.get("coverage"))):
        if manifest.get(key) != want:
            raise InputError(f"{out}: cannot --resume: the interrupted job used another "
                             f"{'model' if key == 'model_sha256' else 'option ' + key}; run it "
                             f"again without --resume into an empty --output")
    return output.is_file() and sha256_file(output) == manifest.get("output_sha256")


def _folder_change(was: dict | None, now: dict | None) -> str | None:
    """How the folder a unit was read as differs from how it reads now (a file added,
    removed or replaced elsewhere in it can retype a partition key or change the columns the
    units are read with), or None: the units done before would not match those still to do."""
    import base64

    import pyarrow as pa

    from export.tableschema import FolderSchema

    if FolderSchema.from_json(was) == FolderSchema.from_json(now):  # keys: a list in JSON
        return None
    if was is None or now is None:
        return "it was read " + ("as one file alone" if was is None else "as a folder")
    a, b = ({f.name: str(f.type) for f in pa.ipc.read_schema(pa.py_buffer(
        base64.b64decode(s["schema"])))} for s in (was, now))
    for name in [*a, *(n for n in b if n not in a)]:
        if a.get(name) != b.get(name):
            return f"column {name!r} was {a.get(name, 'absent')}, is now {b.get(name, 'absent')}"
    if was["keys"] != now["keys"]:
        return f"its partition keys were {list(was['keys'])}, are now {list(now['keys'])}"
    return f"its folder was {was['base']}, is now {now['base']}"


def _quiet(ctx) -> None:
    """No progress bars or start-up lines from the job's dataset (its own context: a caller's
    other datasets keep theirs)."""
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _output_folder(source: str, output: str, model: str, resume: bool) -> Path:
    """The job's output folder, refused in one line when it overlaps an input, is a file,
    or holds something other than this job's own files without --resume."""
    out = Path(output).resolve()
    base = Path(os.path.abspath(re.split(r"[*?\[]", source)[0]))  # a glob's fixed part
    if out == base or out.is_relative_to(base) or base.is_relative_to(out) \
            or out == Path(os.path.realpath(model)):
        raise InputError(f"--output {output}: overlaps --input {source} or --model; the "
                         "output folder must be apart from the inputs")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --output for --engine ray is a folder; this is a file")
    from export.jobstate import JobState

    lock = JobState(out / LOCK_NAME).folder
    existing = [p for p in out.iterdir() if p != lock] if out.is_dir() else []
    if existing and not resume:
        raise InputError(f"{out}: output folder is not empty; use --resume to continue the job "
                         "written there, or choose an empty folder")
    return out


def _map_units(ray, todo: list[dict], workers: int, gpus: float, unit_args: dict,
               progress: bool) -> None:
    """Run `todo` on Ray Data: a task pool on CPUs, an actor pool on GPUs."""
    # Units travel as JSON text: Ray Data's columns would turn None into NaN.
    ds = ray.data.from_items([{"unit": json.dumps(u)} for u in todo],
                             override_num_blocks=len(todo))
    _quiet(ds.context)
    # One operator: Ray Data's default reservation (half the cluster held back for other
    # operators) ran one unit at a time on 2 CPUs; there are no others.
    ds.context.op_resource_reservation_enabled = False
    size = min(workers, len(todo))
    if gpus:
        ds = ds.map_batches(PredictUnits, batch_size=1, num_cpus=1, num_gpus=gpus,
                            compute=ray.data.ActorPoolStrategy(size=size),
                            fn_constructor_kwargs=unit_args)
    else:
        ds = ds.map_batches(predict_units, batch_size=1, num_cpus=1,
                            compute=ray.data.TaskPoolStrategy(size=size), fn_kwargs=unit_args)
    done = 0
    try:
        for batch in ds.iter_batches(batch_size=None):
            done += len(batch["output"])
            if progress:
                print(f"predict: {done}/{len(todo)} units", file=sys.stderr, flush=True)
    except Exception as exc:  # Ray wraps the unit's InputError in its own errors
        cause = _input_error(exc)
        if cause is None:
            raise
        raise InputError(cause) from None


def run_ray(model: str, source: str, output: str, job_options, options: RayOptions):
    """The whole job; returns its summary (also written to `<output>/summary.json`)."""
    from export.batch import Totals, coverage_threshold
    from export.summary import write_reports
    from export.jobstate import JobState
    from export.runtime import Predictor

    start, ray = time.perf_counter(), import_ray()
    predictor = Predictor(model, provider=job_options.provider)  # one-line errors up front
    coverage_threshold(predictor, job_options.coverage)  # before any worker starts
    out = _output_folder(source, output, model, job_options.resume)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock, failed = JobState(out / LOCK_NAME), False  # its folder in `out` holds the lock
    lock.lock()
    try:
        # Absolute paths: the workers of a cluster do not share this process's directory.
        units = list_units(os.path.abspath(source), options.block_images, out / LISTINGS)
        job = {k: v for k, v in asdict(job_options).items()
               if k not in ("resume", "progress", "provider")}  # what a unit's output depends on
        todo = [u for u in units if not (job_options.resume and
                                         _complete(out, u, predictor.sha256, job))]
        startup, workers = join_cluster(ray, options)
        provider = "cuda" if options.gpus_per_worker else "cpu"
        if job_options.progress:
            how = ("already connected" if startup is None else
                   f"{'joined' if options.address else 'started'} in {startup:.1f} s")
            print(f"predict: {len(units)} units, {len(units) - len(todo)} done before; Ray "
                  f"{how} with {int(ray.cluster_resources().get('CPU', 0))} CPUs, {workers} "
                  f"workers", file=sys.stderr)
        if todo:
            _map_units(ray, todo, workers, options.gpus_per_worker, {
                "model": str(predictor.path.resolve()), "model_sha256": predictor.sha256,
                "out": str(out), "job_options": job, "provider": provider, "threads": 1},
                job_options.progress)
        totals = Totals(predictor.card)
        for unit in units:
            totals.add(load_json(manifest_path(out, unit).read_text()))
        summary, report = totals.summary(
            predictor, start, totals.rows, output=str(out), format="parquet", engine="ray",
            workers=workers, units=len(units), units_resumed=len(units) - len(todo),
            provider=provider, options={**asdict(job_options), **asdict(options)},
            ray_startup_seconds=None if startup is None else round(startup, 3))
        write_reports(out / "summary.json", out / "drift.json", summary, report)
        shutil.rmtree(out / LISTINGS, ignore_errors=True)  # the manifests keep the identities
    except InputError:
        failed = True  # bad input, no cluster: a folder this run created is removed whole
        raise
    finally:
        lock.close(remove=True)
        if failed and created:
            shutil.rmtree(out, ignore_errors=True)
    return summary


def _input_error(exc: BaseException) -> str | None:
    """The one-line message of an InputError raised in a unit, however Ray wrapped it."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, InputError):
            return str(e)
        text = str(e)
        marker = "InputError: "
        if marker in text:
            return text.split(marker, 1)[1].strip().splitlines()[0]
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None
