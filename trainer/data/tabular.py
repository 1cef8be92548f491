"""A table: numeric feature columns and one target column, from one CSV or Parquet file,
a folder of them (hive-partitioned or not) or a glob, read as one table with
`pyarrow.dataset` record batch by record batch into the row cache (trainer/data/cache.py),
per file and keyed by content, so memory never holds the table and a later run reads only
files that are new or changed.

Classification when the target holds strings (or a pandas category), booleans or integers,
regression when it holds floats (or as `data.task` says).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np

from export.errors import InputError
from export.names import check_class_names, shown, text_problem
from export.timing import usable_cores
from export.tables import describe_nonfinite, table_files
from export.tableschema import (bytes_column, check_schema, partition_keys, table_dataset,
                                 unreadable)
from trainer.allocator import release_arrow_memory
from trainer.data.ahead import Ahead
from trainer.data.cache import RowCache, cache_root
from trainer.data.dataset import (FixedDataset, SourceOptions, Split, feature_spec,
                                  files_fingerprint, in_file_order, label_dtype, make_dataset,
                                  value_range)
from trainer.data.ingest import update
from trainer.data.lazy import Labels
from trainer.data.lineage import save_snapshot
from trainer.data.records import places

CONVERT_ROWS = 4096  # rows of features converted to float32 together
GATHER_ROWS = 1 << 18  # rows of the cached target read together
F32_MAX = float(np.finfo(np.float32).max)  # a regression target is trained as float32
VOCAB_LOCK = threading.Lock()  # the string labels' codes, assigned as files are decoded
BATCH_ROWS = 1 << 16  # rows of a file decoded together
# Files decoded ahead of their writing (ahead.py, _ahead_width), each holding at most DEPTH
# decoded batches (measured on a 16-core Xeon, a 20-file table of 16 features: 2.7 -> 5.1
# cores busy, +70-77% rows/s; docs/benchmarks.md run W)
AHEAD_BYTES, DEPTH = 256 << 20, 1


def feature_matrix(table, columns: list[str], source: str) -> tuple[np.ndarray, float, float]:
    """(N, F) float32 from `columns` of a pyarrow table, with its min and max; names the
    first bad column/row."""
    import pyarrow.types as pat

    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise InputError(f"{source}: missing feature column {missing[0]!r} "
                         f"(found {table.column_names})")
    values = []
    for name in columns:
        col = table.column(name)
        if not (pat.is_integer(col.type) or pat.is_floating(col.type) or pat.is_boolean(col.type)):
            raise InputError(f"{source}: feature column {name!r} is {col.type}, expected numbers")
        if col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"{source}: row {row}, column {name!r} is empty")
        values.append(col.to_numpy(zero_copy_only=False))  # float64: a view of Arrow's
    # Each column converted straight into its place (no stack of copies), a block of rows
    # at a time: a block stays in the CPU's cache while every column strides through it,
    # where a whole column at a time strides through all of x (1.6x slower, 65,536 x 16).
    x = np.empty((table.num_rows, len(columns)), np.float32)
    with np.errstate(over="ignore"):  # a value past float32 becomes inf, named below
        for a in range(0, len(x), CONVERT_ROWS):
            block = x[a:a + CONVERT_ROWS]
            for j, v in enumerate(values):
                block[:, j] = v[a:a + CONVERT_ROWS]
    if not x.size:
        return x, np.inf, -np.inf
    # The min and max (kept: the table's value range) are finite unless a value is not (NaN
    # propagates through both): the element-wise check only then, to find the row.
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        row, col = (int(v[0]) for v in np.nonzero(~np.isfinite(x)))
        value = table.column(columns[col])[row].as_py()
        raise InputError(f"{source}: row {row}, column {columns[col]!r} "
                         f"{describe_nonfinite(value)}")
    return x, lo, hi


def _plain(column_type):
    """A column's type as its values are: a dictionary's (a pandas category written to
    Parquet) or a string view's as a plain string."""
    import pyarrow as pa
    import pyarrow.types as pat

    if pat.is_dictionary(column_type):
        column_type = column_type.value_type
    return pa.string() if pat.is_string_view(column_type) else column_type


def _target_kind(target_type, task: str, what: str) -> tuple[str, str]:
    """(task, dtype of the cached target) from the target column's type; `what` names the
    column in errors."""
    import pyarrow.types as pat

    target_type = _plain(target_type)
    if not (pat.is_floating(target_type) or pat.is_integer(target_type) or
            pat.is_null(target_type) or pat.is_boolean(target_type) or
            pat.is_string(target_type) or pat.is_large_string(target_type)):
        raise InputError(f"{what} is {target_type}; expected numbers, booleans or strings "
                         "(class names)")
    if task == "auto":
        task = "regression" if pat.is_floating(target_type) else "classification"
    if task not in ("classification", "regression"):
        raise InputError(f"data.task: expected auto, classification or regression, got {task!r}")
    numeric = (pat.is_floating(target_type) or pat.is_integer(target_type)
               or pat.is_null(target_type))  # null: a header without rows
    if task == "regression" and not numeric:
        raise InputError(f"{what} is {target_type}; a regression target (data.task) must "
                         "hold numbers")
    if numeric or pat.is_boolean(target_type):
        return task, "f8"  # integer labels are exact in float64 up to 2**53
    return task, "i8"  # codes into the cache's vocabulary of string labels


def _batches(fragment, schema, columns, target, path, vocab: list[str], ranges: dict):
    """Decode one file batch by batch: float32 features, the target (numbers, or codes into
    `vocab`, which grows); names the file and row of the first bad value. When the file is
    read to its end, `ranges[path]` is the (min, max) of its features."""
    import pyarrow as pa
    import pyarrow.types as pat

    row, lo, hi = 0, np.inf, -np.inf
    try:
        for batch in fragment.to_batches(schema=schema, batch_size=BATCH_ROWS, batch_readahead=1):
            if batch.num_rows == 0:
                continue
            table = pa.Table.from_batches([batch])
            source = f"{path}: rows from {row}" if row else str(path)
            x, batch_lo, batch_hi = feature_matrix(table, columns, source)
            t = table.column(target)
            t = t.cast(_plain(t.type))  # (no copy where it is plain already)
            empty = t.is_null().to_numpy(zero_copy_only=False)
            if pat.is_string(t.type) or pat.is_large_string(t.type):
                values = t.to_numpy(zero_copy_only=False).astype(str)
                empty |= np.char.strip(values) == ""  # CSV reads an empty cell as ""
            if empty.any():
                bad = row + int(np.flatnonzero(empty)[0])
                raise InputError(f"{path}: row {bad}, target column {target!r} is empty; "
                                 "fill or remove such rows")
            if pat.is_string(t.type) or pat.is_large_string(t.type):
                with VOCAB_LOCK:  # files are decoded on threads of their own (ahead.py)
                    known = {v: i for i, v in enumerate(vocab)}
                    for v in np.unique(values):
                        if v not in known:  # a class first seen: named by file and row
                            check_class_names([str(v)], f"{path}: row "
                                              f"{row + int(np.flatnonzero(values == v)[0])}")
                            known[v] = len(vocab)
                            vocab.append(str(v))
                y = np.array([known[v] for v in values], np.int64)
            else:
                y = t.to_numpy(zero_copy_only=False).astype(np.float64)
                odd = np.flatnonzero(~(np.abs(y) <= F32_MAX))  # NaN, infinite, past float32
                if len(odd):
                    raise InputError(f"{path}: row {row + int(odd[0])}, target column {target!r} "
                                     f"{describe_nonfinite(float(y[odd[0]]))}")
            row, lo, hi = row + len(y), min(lo, batch_lo), max(hi, batch_hi)
            batch = table = t = values = None  # not held while the batch waits to be written
            yield {"x": x, "y": y}
    except (pa.ArrowInvalid, OSError) as exc:
        raise unreadable(path, exc, row) from None
    if row:
        ranges[path] = (lo, hi)


def _ahead_width(fragment, features: int) -> int:
    """How many files are decoded at once (ahead.py), from the first file to decode (the
    files of one table are alike; a warm start reads no footer for this): one a core, and
    the files in flight fit in AHEAD_BYTES. Not one core fewer for the writer: it waits on
    the decoders most of the time (2 cores, 20 files x 100,000 rows x 16 features: 1 file
    at a time 0.57 s, 2 at a time 0.50 s, median of 10). A file being read holds about
    twice its largest row group in Arrow's buffers (measured: 57 MiB of Arrow's pool for a
    27 MB row group) besides its decoded batches; a CSV file, Arrow's blocks of a few MiB."""
    import pyarrow as pa

    try:
        meta = getattr(fragment, "metadata", None)  # Parquet only
    except (pa.ArrowInvalid, OSError):  # a damaged file: its reading names it
        meta = None
    group = 0 if meta is None else max((meta.row_group(i).total_byte_size
                                        for i in range(meta.num_row_groups)), default=0)
    per_file = 2 * group + BATCH_ROWS * (8 * features + (DEPTH + 1) * (4 * features + 8))
    return max(1, min(usable_cores(), AHEAD_BYTES // per_file))


def _value_range(ranges: dict, fresh: dict, files: list[Path], base: Path, records,
                 x) -> tuple[tuple[float, float], dict]:
    """(min, max) of the table's features, composed from each file's, and the entries for
    the next run. `ranges` (kept in the cache) holds per file its size, mtime_ns, inode, min and
    max; `fresh` the files decoded just now. A file whose entry does not match its record
    (its content came from the cache under another name, or the cache predates the entry)
    is measured from its cached rows. So a warm start reads no row for this, and an update
    only the files it decoded."""
    keep, lo, hi = {}, np.inf, -np.inf
    for i, path in enumerate(files):
        if not records.count[i]:
            continue
        key, stat = path.relative_to(base).as_posix(), [int(records.size[i]),
                                                         int(records.mtime_ns[i]), int(records.ino[i])]
        entry = ranges.get(key) if isinstance(ranges, dict) else None
        if path in fresh:
            entry = [*stat, *fresh[path]]
        elif not (isinstance(entry, list) and len(entry) == 5 and entry[:3] == stat and all(
                isinstance(v, (int, float)) for v in entry)):  # none, stale or edited by hand
            rows = np.arange(int(records.start[i]), int(records.start[i] + records.count[i]))
            entry = [*stat, *value_range(Split(x, np.zeros(len(rows)), rows))]
        keep[key] = entry
        lo, hi = min(lo, entry[3]), max(hi, entry[4])
    return (lo, hi), keep


def _row_order(records, stored: int) -> np.ndarray | None:
    """Each row of the table in file order: its place in the cache (4 bytes a row below
    2**31 rows, 8 above; the positions added in blocks rather than as a second whole
    array), or None when the cache's `stored` rows are the table's in that order (after a
    first ingest): none to hold, and every read of a range of rows is one read."""
    if in_file_order(records, stored):
        return None
    offsets = records.start - (np.cumsum(records.count) - records.count)
    rows = np.repeat(offsets.astype(places(stored)), records.count)
    for a in range(0, len(rows), GATHER_ROWS):
        rows[a:a + GATHER_ROWS] += np.arange(a, min(a + GATHER_ROWS, len(rows)))
    return rows


def _blocks(column, rows: np.ndarray | None, n: int):
    """(first, values) of the cached `column` at `rows` (None: its first `n`), GATHER_ROWS
    at a time."""
    for a in range(0, n, GATHER_ROWS):
        b = min(a + GATHER_ROWS, n)
        yield a, np.asarray(column[a:b] if rows is None else column[rows[a:b]])


def _targets(column, rows: np.ndarray | None, n: int, vocab: list[str], task: str,
             y_dtype: str) -> tuple[list[str], np.ndarray]:
    """Class names and each row's class index (integers sorted numerically, strings
    alphabetically), or the regression values, read from the cached target column when
    used (lazy.Labels: no array of them, a byte a row, 4 for regression targets). Codes
    into the vocabulary and small non-negative integer labels are counted in blocks
    (np.bincount, linear; np.unique would sort every row); other labels (negative or
    fractional) are ranked by np.unique of the whole column and held."""
    if task == "regression":
        return [], Labels(column, rows, n, np.dtype(np.float32))
    counts = np.zeros(0, np.int64)  # of each code, while every block is countable
    for _, v in _blocks(column, rows, n):
        codes = v.astype(np.int64)
        if y_dtype != "i8" and not ((codes == v).all() and 0 <= codes.min()
                                    and codes.max() < 1 << 20):
            whole = column[:n] if rows is None else column[rows]  # negative or
            uniq, y = np.unique(np.asarray(whole), return_inverse=True)  # fractional labels
            return [str(int(u)) for u in uniq], y.astype(label_dtype(len(uniq)))
        found = np.bincount(codes)
        if len(found) > len(counts):
            counts = np.pad(counts, (0, len(found) - len(counts)))
        counts[:len(found)] += found
    present = np.flatnonzero(counts)
    keys = np.array(vocab, dtype=str)[present] if y_dtype == "i8" else present
    present = present[np.argsort(keys, kind="stable")]
    rank = np.zeros(int(present.max()) + 1, label_dtype(len(present)))
    rank[present] = np.arange(len(present))
    names = [vocab[c] if y_dtype == "i8" else str(int(c)) for c in present]
    return names, Labels(column, rows, n, rank.dtype, rank)


def _feature_columns(schema, first: Path, target: str, exclude: tuple[str, ...]) -> list[str]:
    """The table's feature columns (all but the target and `exclude`), each of numbers."""
    import pyarrow.types as pat

    if target not in schema.names:  # (its names were checked by tableschema.table_dataset)
        raise InputError(f"{first}: missing target column {target!r} (data.target); "
                         f"found {schema.names}")
    for name in exclude:
        if name not in schema.names or name == target:
            what = "is the target" if name == target else f"is not a column of {first}"
            raise InputError(f"data.exclude_columns: {name!r} {what}; expected some of "
                             f"{[c for c in schema.names if c != target]}")
    columns = [c for c in schema.names if c != target and c not in exclude]
    for name in columns:
        if name == "":  # pandas' to_csv writes its index so: the row number as a feature
            raise InputError(f"{first}: column {schema.names.index(name)} has no name (an "
                             "index written by pandas' to_csv?); name it, or leave it out: "
                             "--data.exclude_columns '[\"\"]'")
        if problem := text_problem(name):
            raise InputError(f"{first}: feature column {shown(name)} {problem}; rename it")
        t = schema.field(name).type
        if not (pat.is_integer(t) or pat.is_floating(t) or pat.is_boolean(t) or pat.is_null(t)):
            leave = ", ".join([*exclude, name])
            raise InputError(f"{first}: feature column {shown(name)} is {t}, expected numbers (a "
                             f"column that is not a feature: --data.exclude_columns '[{leave}]')")
    if not columns:
        raise InputError(f"{first}: no feature column left; the table has {schema.names}")
    return columns


def _path_values(dataset, fragments: dict, columns: list[str], target: str):
    """What a file's path puts in its rows (ingest.update's `path_values`): the values of the
    hive partition keys that are features or the target, hashed with the file's bytes, so the
    same bytes under another partition are other rows; None when no key is in the rows (a
    file's digest is then of its bytes alone, as reader "1" made every one)."""
    import pyarrow.dataset as pads

    keys = [k for k in partition_keys(dataset) if k in columns or k == target]

    def values(path: str) -> bytes:
        found = pads.get_partition_keys(fragments[path].partition_expression)
        return json.dumps([[k, found.get(k)] for k in keys]).encode()

    return values if keys else None


def load_tabular(root: str | None, opts: SourceOptions) -> FixedDataset:
    if not root:
        raise InputError("data.root: the tabular source needs a .csv or .parquet file, a "
                         "folder of them or a glob")
    base, files, fmt = table_files(root)
    dataset = table_dataset(base, files, fmt)
    schema, origin = dataset.schema, Path(root)
    columns = _feature_columns(schema, files[0], opts.target, opts.exclude_columns)
    if error := bytes_column(files[0], opts.target, schema.field(opts.target).type):
        raise error
    task, y_dtype = _target_kind(schema.field(opts.target).type, opts.task,
                                 f"{files[0]}: target column {opts.target!r} (data.target)")
    fragments = {str(Path(f.path)): f for f in dataset.get_fragments()}
    path_values = _path_values(dataset, fragments, columns, opts.target)
    settings = {"reader": "1" if path_values is None else "2", "format": fmt,
                "schema": str(schema), "target": opts.target, "task": task,
                **({"features": columns} if opts.exclude_columns else {})}
    key = hashlib.sha256(f"{os.path.realpath(base)}|{json.dumps(settings)}".encode())
    where = cache_root(opts.cache_dir) / f"tabular-{key.hexdigest()[:20]}"
    order = {str(path): i for i, path in enumerate(files)}  # the order they are written in
    with RowCache.open(where, {"x": ((len(columns),), "f4"), "y": ((), y_dtype)},
                       settings) as cache:
        vocab, fresh = cache.extra.setdefault("vocab", []), {}
        ahead = Ahead(None, DEPTH)

        def decode(_, path: str):
            check_schema(fragments[path], dataset, path, fmt)
            if ahead.width is None:  # the first file to decode
                ahead.width = _ahead_width(fragments[path], len(columns))
            return ahead(order[path], _batches(fragments[path], schema, columns, opts.target,
                                               Path(path), vocab, fresh))

        try:
            records, report = update(cache, base, files, decode, opts.verify_cache,
                                     whole_files=False, path_values=path_values)
        finally:
            ahead.close()
            release_arrow_memory()
        arrays = cache.arrays()
        span, ranges = _value_range(cache.extra.get("ranges", {}), fresh, files, base,
                                    records, arrays["x"])
        if ranges != cache.extra.get("ranges"):  # kept for the next run
            cache.extra["ranges"] = ranges
            cache.commit([(records, None)], final=True)
            arrays = cache.arrays()
    print(f"tabular: {root}: {report.line('files')} ({cache.rows:,} rows cached in {where})",
          file=sys.stderr)
    rows, n = _row_order(records, cache.rows), int(records.count.sum())
    if not n:
        raise InputError(f"{root}: the table has no rows")
    names, y = _targets(arrays["y"], rows, n, vocab, task, y_dtype)
    train = Split(arrays["x"], y, rows)
    split = np.zeros(len(records), np.int8)  # every file in "train"; no label per file: -1
    fp = files_fingerprint(json.dumps(settings), names, ["train"], split, split - 1, records,
                           where)
    return make_dataset(origin.stem or origin.name, train, None, names,
                        feature_spec(columns, span), task=task, origin=origin, fp=fp,
                        history=save_snapshot(where, fp, records), checked=True)
