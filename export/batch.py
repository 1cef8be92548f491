"""The batch inference job: inputs -> predictions file + summary + drift report.

numpy + onnxruntime + pillow (+ pyarrow for tables). Inputs stream in chunks of
`chunk_rows`, so memory stays bounded whatever the input size. Each chunk becomes a part
file plus a record of its rows, SHA-256 and counts in `.<output>.partial/`, held under an
exclusive lock (export/jobstate.py); the final file is joined from the verified parts,
its rows counted, and renamed into place. `resume=True` continues after the last part
that matches its record, and refuses an input that changed.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from export.atomic import check_output
from export.card import Card, InputSpec
from export.conformal import (check_coverage, coverage_metrics, coverage_sums, interval_columns,
                              set_columns, threshold)
from export.drift import DriftAccumulator, format_report
from export.errors import InputError, require_file
from export.jobstate import (JobState, input_identity, read_listing, tables_identity,
                             write_listing)
from export.readers import is_image_input, iter_chunks, iter_image_files
from export.runtime import Prediction, Predictor, predictor_for_job
from export.summary import JobSummary, write_reports
from export.tables import check_not_read_back, holds_tables, is_table_glob
from export.tableschema import FolderSchema
from export.writers import check_format, join_parts, write_part

log = logging.getLogger(__name__)


@dataclass
class JobOptions:
    batch_size: int = 256  # rows per onnxruntime call (activation memory grows with it)
    chunk_rows: int = 8192  # rows per part (memory bound, resume granularity)
    top_k: int = 1
    provider: str = "auto"
    on_error: str = "fail"  # unreadable image: fail the job, or skip and list it
    resume: bool = False
    progress: bool = True
    timeout_per_batch: float | None = 600.0  # seconds one onnxruntime call may take
    threads: int = 0  # onnxruntime intra-op threads (0: one per physical core)
    coverage: float | None = None  # conformal prediction sets / intervals at this coverage

    def __post_init__(self):  # messages name the command's flags
        if self.coverage is not None:
            check_coverage(self.coverage)  # the model's scores are checked when it is loaded
        if self.top_k < 1 or self.batch_size < 1 or self.chunk_rows < 1 or self.threads < 0:
            raise InputError("--top-k, --batch-size and --chunk-rows must be >= 1, "
                             "--threads >= 0")
        if self.timeout_per_batch is not None and not self.timeout_per_batch > 0:
            raise InputError("--timeout-per-batch must be > 0 seconds")
        if self.on_error not in ("fail", "skip") or self.provider not in ("auto", "cpu", "cuda"):
            raise InputError(f"--on-error fail|skip and --provider auto|cpu|cuda; got "
                             f"{self.on_error}, {self.provider}")


def output_columns(pred: Prediction, y: np.ndarray | None, class_names: list[str],
                   top_k: int, qhat: float | None = None) -> dict[str, list]:
    """Columns after id and pass-through columns: label, confidence (the most likely
    class), with top_k > 1 the next ones as top2_label, top2_confidence, ..., with a
    conformal threshold `qhat` prediction_set and set_size, and true_label; or value,
    lower and upper, and true_value for regression."""
    if pred.values is not None:
        cols = {"value": [float(v) for v in pred.values]}
        if qhat is not None:
            cols.update(interval_columns(pred.values, qhat))
        if y is not None:
            cols["true_value"] = [float(v) for v in y]
        return cols
    cols = {"label": [class_names[i] for i in pred.labels],
            "confidence": [round(float(c), 6) for c in pred.confidence]}
    if top_k > 1:
        order = np.argsort(-pred.probabilities, axis=1)[:, :top_k]
        for k in range(1, order.shape[1]):  # the first is label/confidence
            cols[f"top{k + 1}_label"] = [class_names[i] for i in order[:, k]]
            cols[f"top{k + 1}_confidence"] = [
                round(float(p), 6) for p in pred.probabilities[np.arange(len(order)), order[:, k]]]
    if qhat is not None:
        cols.update(set_columns(pred.probabilities, qhat, class_names))
    if y is not None:
        cols["true_label"] = [class_names[i] for i in y]
    return cols


def with_passthrough(ids: list[str], extra: dict[str, list], outputs: dict[str, list]) -> dict:
    """id, the input's pass-through columns, then the outputs. A pass-through column whose
    name is taken by an output column (id, label, confidence, ...) is written as
    input_<name>, so neither overwrites the other."""
    taken, cols = {"id", *outputs}, {"id": ids}
    for name, values in extra.items():
        new = name
        while new in taken:
            new = f"input_{new}"
        taken.add(new)
        cols[new] = values
    return {**cols, **outputs}


def label_sums(pred: Prediction, y: np.ndarray | None,
               qhat: float | None = None) -> dict[str, float]:
    """Additive sums for accuracy (classification) or MAE/RMSE (regression), and for the
    empirical coverage of the prediction sets or intervals at threshold `qhat`."""
    if y is None:
        return {}
    more = {} if qhat is None else coverage_sums(pred.probabilities, pred.values, y, qhat)
    if pred.values is not None:
        err = pred.values.astype(np.float64) - y
        return {"n": len(y), "abs_err": float(np.abs(err).sum()),
                "sq_err": float((err ** 2).sum()), **more}
    return {"n": len(y), "correct": int((pred.labels == y).sum()), **more}


def label_metrics(sums: dict[str, float]) -> dict[str, float]:
    if not sums.get("n"):
        return {}
    if "correct" in sums:
        return {"accuracy": sums["correct"] / sums["n"], **coverage_metrics(sums)}
    return {"mae": sums["abs_err"] / sums["n"], "rmse": float(np.sqrt(sums["sq_err"] / sums["n"])),
            **coverage_metrics(sums)}


def _peak_rss_mb() -> float:
    """Peak resident memory of this process. Linux's VmHWM belongs to this program alone;
    ru_maxrss would also carry the high-water mark of whatever exec'd it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled, self.start = enabled, time.perf_counter()
        self.last = self.start  # first line after a second, the last one always

    def update(self, rows: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 1.0 and not final):
            return
        self.last = now
        rate = rows / max(now - self.start, 1e-9)
        end = "\n" if final or not sys.stderr.isatty() else "\r"
        print(f"predict: {rows:,} rows, {rate:,.0f} rows/s since the first batch", end=end,
              file=sys.stderr, flush=True)


class Totals:
    """What the job has counted so far, summed over part records (resumed or new)."""

    def __init__(self, card: Card):
        self.drift, self.sums, self.skipped = DriftAccumulator(card), {}, []
        self.rows, self.header = 0, None

    def add(self, record: dict) -> None:
        self.drift.merge(record["drift"])
        self.sums = {k: self.sums.get(k, 0) + v for k, v in record["sums"].items()}
        self.skipped += record["skipped"]
        self.rows, self.header = self.rows + record["rows"], record["header"]

    def summary(self, predictor: Predictor, started: float, rows: int,
                **engine) -> tuple[JobSummary, dict]:
        """The job's summary and drift report from the merged totals: the one merge step of
        both engines (the local job's chunks, the Ray job's units); `engine`: its own fields."""
        elapsed, report = time.perf_counter() - started, self.drift.report()
        return JobSummary(
            rows=rows, model=str(predictor.path), model_sha256=predictor.sha256,
            dataset_fingerprint=predictor.card.dataset.fingerprint, seconds=round(elapsed, 3),
            rows_per_second=round(rows / elapsed, 1), skipped=self.skipped,
            drift_status=report["status"], metrics=label_metrics(self.sums),
            drift_table=format_report(report), **engine), report


def _predict_parts(predictor: Predictor, input_path, images: Iterable[Path] | None,
                   state: JobState, done: int, fmt: str, opts: JobOptions,
                   qhat: float | None, labelled: bool | None,
                   folder: FolderSchema | None) -> tuple[Totals, int]:
    """Write a part file and its record per chunk after the `done` complete ones; return
    the totals and the rows that were already done."""
    card, totals = predictor.card, Totals(predictor.card)
    for i in range(done):
        totals.add(state.read_record(i, fmt))
    resumed_after, progress = totals.rows, _Progress(opts.progress)
    chunks = iter_chunks(input_path, predictor.spec, predictor.class_names, opts.chunk_rows,
                         opts.on_error, card.dataset.target, start_chunk=done,
                         files=images, labelled=labelled, folder=folder)
    for i, chunk in enumerate(chunks, start=done):
        pred = predictor.predict(chunk.x, opts.batch_size, source=f"{input_path} (chunk {i})",
                                 timeout=opts.timeout_per_batch)
        columns = with_passthrough(chunk.ids, chunk.extra, output_columns(
            pred, chunk.y, predictor.class_names, opts.top_k, qhat))
        write_part(state.part(i, fmt), columns)
        drift = DriftAccumulator(card)
        if len(chunk.x):
            drift.update(chunk.x, pred)
        record = state.write_record(i, fmt, {
            "rows": len(chunk.ids), "skipped": chunk.skipped, "header": list(columns),
            "sums": label_sums(pred, chunk.y, qhat), "drift": drift.state()})
        totals.add(record)
        log.debug("part %d: %d rows, %d skipped", i, len(chunk.ids), len(chunk.skipped))
        progress.update(totals.rows)
    if totals.rows:
        progress.update(totals.rows, final=True)
    else:
        raise InputError(f"{input_path}: no readable inputs" + (
            f" ({len(totals.skipped)} skipped: {totals.skipped[0]})" if totals.skipped else ""))
    return totals, resumed_after


def _join(state: JobState, output: Path, fmt: str, totals: Totals) -> int:
    """Join the verified parts into `output`; return the rows counted in the joined file."""
    parts = []
    for i in itertools.count():
        if not state.record_path(i).is_file():
            break
        if state.read_record(i, fmt) is None:  # changed since it was recorded
            raise InputError(f"{state.part(i, fmt)}: part does not match its record; nothing "
                             f"written, run the job again with --resume to redo it")
        parts.append(state.part(i, fmt))
    rows = join_parts(parts, output, totals.header, expected_rows=totals.rows)
    return rows


def coverage_threshold(predictor: Predictor, coverage: float | None) -> float | None:
    """The conformal threshold of `coverage` for this model (None: no sets asked for); a
    model without conformal scores is refused in one line."""
    if coverage is None:
        return None
    return threshold(predictor.card.calibration, coverage, str(predictor.path))


def check_chunk_memory(spec: InputSpec, chunk_rows: int) -> None:
    """A chunk of `chunk_rows` inputs (held with its outputs while it is predicted) must fit
    in a quarter of the memory this machine has available; otherwise one line naming the
    flag, not numpy's allocation error."""
    from export.timing import available_memory

    row = spec.row_bytes
    avail = available_memory()
    if avail is not None and chunk_rows * row > avail // 4:
        raise InputError(f"--chunk-rows {chunk_rows:,}: a chunk of this model's input is "
                         f"{chunk_rows * row / 2**30:.1f} GiB; at most {avail // 4 // row:,} rows "
                         f"fit in a quarter of the {avail / 2**30:.1f} GiB available")


def _identity(source: Path, images: list[Path] | None, state: JobState,
              class_names: list[str], tables: bool) -> tuple[dict, dict | None]:
    """The input's identity, and for an image input the listing's summary: its images are
    listed into the state folder as a stream (write_listing), nothing held per image. A bad
    listing leaves no state behind for a job that never began. `tables`: a folder or glob
    of tables, identified by each table's identity."""
    try:
        if tables:
            return tables_identity(source), None
        if images is None and is_image_input(source):
            listed = write_listing(source, iter_image_files(source), state.new_listing,
                                   class_names)
            return {**input_identity(source, None), "images": listed}, listed
        return input_identity(source, images), None
    except BaseException:
        state.new_listing.unlink(missing_ok=True)
        state.close(remove=not (state.folder / "job.json").exists())
        raise


def _report_paths(output: Path) -> tuple[Path, Path]:
    return (output.with_name(output.stem + ".summary.json"),
            output.with_name(output.stem + ".drift.json"))


def run_batch(model: str | Path, input_path: str | Path, output: str | Path,
              options: JobOptions | None = None, *, predictor: Predictor | None = None,
              images: list[Path] | None = None, reports: bool = True,
              folder: FolderSchema | None = None) -> JobSummary:
    """Predict every input, write `output` + `<stem>.summary.json` + `<stem>.drift.json`.
    The Ray engine runs one per work unit, with its worker's `predictor`, an image folder's
    block of `images` or a table of a `folder` of them, and `reports=False` (one report a job)."""
    opts, output, start = options or JobOptions(), Path(output), time.perf_counter()
    fmt = check_format(output)
    if reports:  # the whole job's files; a Ray unit's folder was checked by its driver
        for path in (output, *_report_paths(output)):
            check_output(path, "--output", {"--model": model, "--input": input_path})
    threads = {"threads": opts.threads, "reason": "the engine's"}
    if predictor is None:
        predictor, threads = predictor_for_job(model, opts.provider, opts.threads,
                                               min(opts.batch_size, opts.chunk_rows))
    log.info("%s on %s, threads %s", predictor.path, predictor.provider, threads)
    check_chunk_memory(predictor.spec, opts.chunk_rows)
    qhat = coverage_threshold(predictor, opts.coverage)
    tables = is_table_glob(input_path) or Path(input_path).is_dir() and \
        holds_tables(Path(input_path))
    if tables and reports:
        check_not_read_back([output, *_report_paths(output)], input_path)
    if not (source := Path(input_path)).is_dir() and not tables:
        require_file(source, "an input file or folder")
    state, finished = JobState(output), False
    state.lock()
    identity, listed = _identity(source, images, state, predictor.class_names, tables)
    job = {"model": predictor.sha256, "input": identity, "format": fmt, "top_k": opts.top_k,
           "chunk_rows": opts.chunk_rows, "on_error": opts.on_error, "coverage": opts.coverage}
    try:
        done = state.start(job, opts.resume, fmt)
        if listed:  # the images the identity names, read from its listing
            images = read_listing(source, state.listing)
        try:
            totals, resumed_after = _predict_parts(predictor, input_path, images, state, done,
                                                   fmt, opts, qhat, listed and listed["labelled"],
                                                   folder)
        except InputError:
            finished = True  # bad input: leave nothing behind
            raise
        except OSError as exc:  # full disk, lost permissions: what is complete stays
            if exc.errno is None:
                raise
            raise InputError(f"{exc.filename or state.folder}: {exc.strerror}; the complete "
                             f"parts are kept in {state.folder}: free space and rerun with "
                             f"--resume") from None
        rows = _join(state, output, fmt, totals)
        summary, report = totals.summary(
            predictor, start, rows, output=str(output), format=fmt[1:],
            provider=predictor.provider, threads=threads, resumed_after_rows=resumed_after,
            peak_memory_mb=round(_peak_rss_mb(), 1), options=asdict(opts),
            totals={"rows": rows, "header": totals.header, "sums": totals.sums,
                    "skipped": totals.skipped, "drift": totals.drift.state()})
        if reports:
            write_reports(*_report_paths(output), summary, report)
        finished = True
    finally:
        state.close(remove=finished)
    return summary
