"""Tables as they are kept: one CSV or Parquet file, a folder of them (hive-partitioned or
not) or a glob, read as one table with `pyarrow.dataset`, record batch by record batch.
Shared by training (trainer/data/tabular.py, into the row cache) and the batch job (a table
file or a folder of them given to `trainer predict`, in chunks of exactly `rows`); no torch.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from export.card import InputSpec
from export.errors import InputError
from export.jobstate import name_under
from export.readers import IMAGE_SUFFIXES, Chunk, labels_to_index
from export.tableschema import (
    FolderSchema,
    bytes_column,
    check_column_names,
    check_csv_columns,
    check_schema,
    table_dataset,
    unreadable,
)

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def input_files(root: str, flag: str) -> tuple[Path, list[Path]]:
    """(base folder, files) of `root`: one file, a folder (searched recursively; names
    starting with . or _ are skipped, as Spark and Hive write them) or a glob pattern."""
    path = Path(root)
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        return path, sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith((".", "_")) for part in p.relative_to(path).parts))
    if not is_table_glob(root):
        raise InputError(f"{path}: not found ({flag})")
    files = sorted(Path(p) for p in glob.glob(root, recursive=True) if Path(p).is_file())
    if not files:
        raise InputError(f"{root}: the pattern matches no files ({flag})")
    return Path(os.path.commonpath([str(p.parent) for p in files])), files


def table_files(root: str, flag: str = "data.root") -> tuple[Path, list[Path], str]:
    """(base folder, files, format) of `root` (`input_files`), one table: every file .csv,
    or every one .parquet. `flag`: the option that gave it, for the messages."""
    base, files = input_files(root, flag)
    formats = {FORMATS.get(p.suffix.lower()) for p in files}
    if not files or None in formats:
        odd = next((p for p in files if p.suffix.lower() not in FORMATS), None)
        raise InputError(f"{odd or root}: expected .csv or .parquet files ({flag})")
    if len(formats) > 1:
        raise InputError(f"{root}: mixes CSV and Parquet files; expected one format ({flag})")
    return base, files, formats.pop()


def is_table_glob(path: str | os.PathLike) -> bool:
    """An input that names tables by a glob pattern (`data/*.parquet`), not by a path."""
    return any(c in str(path) for c in "*?[") and not os.path.exists(path)


def glob_base(pattern: str) -> Path:
    """The folder every file a glob pattern can match lies under: its parts before the first
    one holding a wildcard (`t/*/part.csv` -> `t`)."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    return Path(*parts[:fixed]) if fixed else Path(".")


def root_path(root: str | None) -> str | Path | None:
    """What a data root's files lie in, for the checks that an output is not one of them: the
    root itself, or a glob's fixed folder."""
    return glob_base(root) if root and is_table_glob(root) else root


def check_not_read_back(outputs: list[Path], source: str | os.PathLike) -> None:
    """A job's outputs must not lie where its folder or glob of tables would read them as
    tables the next time (one file that is not a table there fails every later job)."""
    tables_glob = is_table_glob(source)
    folder = None if tables_glob else os.path.realpath(source)
    for out in outputs:
        inside = fnmatch.fnmatch(os.path.abspath(out), os.path.abspath(source)) if tables_glob \
            else Path(folder) in Path(os.path.realpath(out)).parents
        if inside:
            raise InputError(f"--output {out}: lies among the tables of --input {source}, "
                             "which would read it as one of them next time; write it elsewhere")


def holds_tables(folder: Path, suffixes=FORMATS) -> bool:
    """Whether a folder given as an input is a table (it holds .csv/.parquet files, or files
    of other `suffixes`, and no image): walked entry by entry only until its first image, so
    an image folder of millions costs a few entries, not a listing of its first class folder."""
    tables, todo = False, [folder]
    while todo:
        with os.scandir(todo.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):  # not a linked one, as table_files'
                    todo.append(entry.path)  # rglob does not follow them (nor loops)
                    continue
                suffix = os.path.splitext(entry.name)[1].lower()
                if suffix in IMAGE_SUFFIXES:
                    return False
                tables = tables or (suffix in suffixes and not entry.name.startswith((".", "_")))
    return tables


def folder_chunks(path: Path, spec: InputSpec, class_names, rows: int, first: int, target: str | None,
                  folder: FolderSchema | None = None, flag: str = "--input") -> Iterator[Chunk]:
    """A folder of tables read as one table, from chunk `first` on, in chunks of exactly
    `rows` (the last may be shorter) that may span files; a row's id is its file's path
    under the folder and its row number in that file ("part-1.parquet:12"). Every file must
    have the first one's columns (check_schema); a resumed job skips whole files by
    their row counts (Parquet's from its footer). With `folder`, `path` is one file of that
    folder (a Ray engine's unit), read as the folder reads it; its rows' ids are their row
    numbers, as any one file's are. `flag`: the option that gave `path`, for the messages."""
    if folder is None:
        base, files, fmt = table_files(str(path), flag)
        dataset = table_dataset(base, files, fmt)
    else:
        base, files, fmt = Path(folder.base), [path], FORMATS[path.suffix.lower()]
        dataset = folder.dataset(path, fmt)
    schema, columns, skip = dataset.schema, list(spec.columns or ()), first * rows
    fragments = {os.path.normpath(f.path): f for f in dataset.get_fragments()}
    pending: list[Chunk] = []
    for f in files:
        fragment, done = fragments[os.path.normpath(str(f))], 0
        try:
            check_schema(fragment, dataset, f, fmt)
            if skip and (n := fragment.count_rows()) <= skip:
                skip -= n
                continue
            for batch in fragment.to_batches(schema=schema, batch_size=rows, batch_readahead=1):
                start, skip = min(skip, batch.num_rows), skip - min(skip, batch.num_rows)
                if start < batch.num_rows:
                    pending.append(table_chunk(f, batch.slice(start), columns, class_names,
                                               target, done + start,
                                               None if folder else name_under(f, base)))
                done += batch.num_rows
                while sum(len(c.ids) for c in pending) >= rows:
                    chunk, pending = _cut(pending, rows)
                    yield chunk
        except InputError:
            raise
        except Exception as exc:  # pyarrow parse errors (bad rows, mixed types, not a table)
            raise unreadable(f, exc, done) from None
    if pending:
        yield _cut(pending, sum(len(c.ids) for c in pending))[0]


def _cut(chunks: list[Chunk], rows: int) -> tuple[Chunk, list[Chunk]]:
    """The first `rows` rows of `chunks` as one chunk, and the chunks of the rest."""
    taken, rest, need = [], [], rows
    for c in chunks:
        n = min(need, len(c.ids))
        if n:
            taken.append(_rows(c, 0, n))
        if n < len(c.ids):
            rest.append(_rows(c, n, len(c.ids)))
        need -= n
    if len(taken) == 1:
        return taken[0], rest
    ys = [c.y for c in taken]
    return Chunk([i for c in taken for i in c.ids], np.concatenate([c.x for c in taken]),
                 None if ys[0] is None else np.concatenate(ys),
                 {k: [v for c in taken for v in c.extra[k]] for k in taken[0].extra}), rest


def _rows(c: Chunk, a: int, b: int) -> Chunk:
    if (a, b) == (0, len(c.ids)):
        return c
    return Chunk(c.ids[a:b], c.x[a:b], None if c.y is None else c.y[a:b],
                 {k: v[a:b] for k, v in c.extra.items()})


# CSV read block sizes: a block must hold the longest row, and pyarrow's streaming reader reads
# ~32 blocks ahead, so the block bounds memory: 4 MiB blocks held ~130 MB more at 3 million rows
# than at 100,000; 1 MiB keeps it flat (scripts/soak.py). Longer rows: read with the next size.
CSV_BLOCKS = (1 << 20, 8 << 20, 64 << 20)


class _RowTooLong(Exception):
    pass


def table_chunks(path: Path, spec: InputSpec, class_names, rows: int, first: int,
                  target: str | None) -> Iterator[Chunk]:
    """The table's chunks from chunk `first` on. A CSV row longer than the read block (a
    document or a base64 blob in a pass-through column) is read again with the next block
    size, from the first chunk not yet given out; past the last, one line."""
    for block in CSV_BLOCKS:
        try:
            for chunk in _table_chunks_in(path, spec, class_names, rows, first, target, block):
                yield chunk
                first += 1
            return
        except _RowTooLong:
            continue
    raise InputError(f"{path}: a row near chunk {first} is longer than {CSV_BLOCKS[-1] >> 20} "
                     f"MiB; expected CSV rows of at most that size (a larger cell belongs in a "
                     f"Parquet file)")


def _table_chunks_in(path: Path, spec: InputSpec, class_names, rows: int, first: int,
                     target: str | None, block: int) -> Iterator[Chunk]:
    import pyarrow.csv as pacsv  # a base dependency
    import pyarrow.parquet as pq

    columns = list(spec.columns or ())
    done, pending = 0, None
    try:
        if path.suffix.lower() == ".csv":
            batches = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=block))
        else:
            batches = pq.ParquetFile(path).iter_batches(batch_size=rows)
        for batch in batches:  # re-cut the reader's batches into chunks of exactly `rows`
            if done == 0 and pending is None:
                check_column_names(batch.schema.names, path)
                if path.suffix.lower() == ".csv":
                    check_csv_columns(batch.schema.names, path, {})
            pending = batch if pending is None else _concat(pending, batch)
            while pending.num_rows >= rows:
                part, pending = pending.slice(0, rows), pending.slice(rows)
                if done >= first * rows:
                    yield table_chunk(path, part, columns, class_names, target, done)
                done += rows
        if pending is not None and pending.num_rows and done >= first * rows:
            yield table_chunk(path, pending, columns, class_names, target, done)
    except InputError:
        raise
    except Exception as exc:  # pyarrow parse errors (bad rows, mixed types, not a table)
        if "straddl" in str(exc):  # a row longer than the block
            raise _RowTooLong() from None
        raise unreadable(path, exc, done) from None


def describe_nonfinite(value) -> str:
    """Why a feature value cannot be fed to a float32 graph."""
    if value is None:
        return "is empty"
    if isinstance(value, (int, float)) and np.isfinite(float(value)):
        return f"is {value:g}, which overflows float32 (largest {np.finfo(np.float32).max:.4g})"
    return "is NaN or infinite"


def table_chunk(path: Path, batch, columns, class_names, target, offset: int,
                under: str | None = None) -> Chunk:
    """A batch of rows as a chunk (ids: their row numbers, after `under:`, the file's name
    in its folder, for a file of a folder); a bad value is named by file, row and column."""
    import pyarrow.types as pat

    names = batch.schema.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(f"{path}: missing feature column {missing[0]!r}; the model expects "
                         f"{columns}, found {names}")
    cols = []
    for name in columns:
        col = batch.column(names.index(name))
        if not (pat.is_integer(col.type) or pat.is_floating(col.type) or pat.is_boolean(col.type)):
            raise InputError(f"{path}: feature column {name!r} is {col.type}, expected numbers")
        cols.append(col.to_numpy(zero_copy_only=False).astype(np.float32))
    x = np.stack(cols, axis=1) if cols else np.zeros((batch.num_rows, 0), np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = (int(v[0]) for v in np.nonzero(bad))
        value = batch.column(names.index(columns[col]))[row].as_py()
        raise InputError(f"{path}: row {offset + row}, column {columns[col]!r} "
                         f"{describe_nonfinite(value)}")
    extra = {n: batch.column(i).to_pylist() for i, n in enumerate(names)
             if n not in columns and n != target}
    y = None
    if target and target in names:
        if error := bytes_column(path, target, batch.schema.field(target).type):
            raise error
        raw = batch.column(names.index(target)).to_numpy(zero_copy_only=False)
        y = labels_to_index(raw, class_names, f"{path}:{target}", by_name=True)
    ids = [f"{under}:{offset + i}" if under else str(offset + i) for i in range(batch.num_rows)]
    return Chunk(ids, x, y, extra)


def _concat(a, b):
    import pyarrow as pa

    return pa.Table.from_batches([a, b]).combine_chunks().to_batches()[0] if a.num_rows else b


