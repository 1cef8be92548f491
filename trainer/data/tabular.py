"""A CSV or Parquet table: numeric feature columns and one target column.

Classification when the target holds strings, booleans or integers, regression when it
holds floats (or as `data.task` says). Read with pyarrow, which types columns in C.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.errors import InputError
from export.readers import check_column_names, short_reason
from trainer.data.dataset import (FixedDataset, SourceOptions, Split, feature_spec, make_dataset,
                                  require_root)


def read_table(path: Path):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            table = pq.read_table(path)
        elif path.suffix.lower() == ".csv":
            table = pacsv.read_csv(path)
        else:
            table = None
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path}: cannot read table ({short_reason(exc)})") from None
    if table is not None:
        check_column_names(table.column_names, path)
        return table
    raise InputError(f"{path}: expected a .csv or .parquet file")


def feature_matrix(table, columns: list[str], source: str) -> np.ndarray:
    """(N, F) float32 from `columns` of a pyarrow table; names the first bad column/row."""
    import pyarrow.types as pat

    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise InputError(f"{source}: missing feature column {missing[0]!r} "
                         f"(found {table.column_names})")
    cols = []
    for name in columns:
        col = table.column(name)
        if not (pat.is_integer(col.type) or pat.is_floating(col.type) or pat.is_boolean(col.type)):
            raise InputError(f"{source}: feature column {name!r} is {col.type}, expected numbers")
        if col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"{source}: row {row}, column {name!r} is empty")
        cols.append(col.to_numpy(zero_copy_only=False).astype(np.float32))
    x = np.stack(cols, axis=1) if cols else np.zeros((table.num_rows, 0), np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        row, col = (int(v[0]) for v in np.nonzero(~finite))
        raise InputError(f"{source}: row {row}, column {columns[col]!r} is NaN or infinite")
    return x


def load_tabular(root: str | None, opts: SourceOptions) -> FixedDataset:
    import pyarrow.types as pat

    path = require_root(root, "tabular", "the path of a .csv or .parquet file", file=True)
    table = read_table(path)
    if opts.target not in table.column_names:
        raise InputError(f"{path}: missing target column {opts.target!r} (data.target); "
                         f"found {table.column_names}")
    if table.num_rows == 0:
        raise InputError(f"{path}: the table has no rows")
    target = table.column(opts.target)
    empty = target.is_null().to_numpy(zero_copy_only=False)
    if pat.is_string(target.type) or pat.is_large_string(target.type):
        # CSV reads an empty string cell as "", not null: a class named "" is never meant.
        empty |= np.char.strip(target.to_numpy(zero_copy_only=False).astype(str)) == ""
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise InputError(f"{path}: row {row}, target column {opts.target!r} is empty "
                         f"({int(empty.sum())} rows); fill or remove them")
    task = opts.task
    if task == "auto":
        task = "regression" if pat.is_floating(target.type) else "classification"
    if task not in ("classification", "regression"):
        raise InputError(f"data.task: expected auto, classification or regression, got {task!r}")
    columns = [c for c in table.column_names if c != opts.target]
    x = feature_matrix(table, columns, str(path))
    values = target.to_numpy(zero_copy_only=False)
    if task == "regression":
        if not (pat.is_floating(target.type) or pat.is_integer(target.type)):
            raise InputError(f"{path}: regression target {opts.target!r} is {target.type}, "
                             "expected numbers")
        names, y = [], values.astype(np.float32)
    else:
        # Integers sort numerically, strings alphabetically; y indexes the sorted classes.
        uniq, y = np.unique(values if values.dtype.kind in "iub" else values.astype(str),
                            return_inverse=True)
        names, y = [str(u) for u in uniq], y.astype(np.int64)
    return make_dataset(path.stem, Split(x, y), None, names, feature_spec(columns, x), task=task,
                        origin=path)
