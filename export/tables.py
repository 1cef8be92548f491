"""Tables as they are kept: one CSV or Parquet file, a folder of them (hive-partitioned or
not) or a glob, read as one table with `pyarrow.dataset`, record batch by record batch.
Shared by training (trainer/data/tabular.py, into the row cache) and the batch job (a table
file or a folder of them given to `trainer predict`, in chunks of exactly `rows`); no torch.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.card import InputSpec
from export.errors import InputError
from export.jobstate import name_under
from export.readers import IMAGE_SUFFIXES, Chunk, labels_to_index, short_reason

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


def table_dataset(base: Path, files: list[Path], fmt: str, partitioning="hive", schema=None):
    """`files` as one pyarrow dataset (hive partitions under `base` are columns, typed as
    `partitioning` says, by default from their paths), of `schema` (by default the first's)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    if fmt == "parquet":  # column chunks read as decoded, not all of a row group first
        # (pyarrow's pre_buffer, made for object stores): local files, 2M-row files of 5
        # columns, 2 decoded at once: Arrow's pool at most 173 -> 106 MB, no slower (run AN)
        form = pads.ParquetFileFormat(default_fragment_scan_options=pads.
                                      ParquetFragmentScanOptions(pre_buffer=False))
    else:
        form = fmt
    try:
        dataset = pads.dataset([str(f) for f in files], format=form, partitioning=partitioning,
                               partition_base_dir=str(base), schema=schema)
        check_column_names(dataset.schema.names, files[0])  # pyarrow decodes the names here
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:  # a header not UTF-8
        raise unreadable(files[0], exc) from None
    if schema is None and any(pa.types.is_null(field.type) for field in dataset.schema):
        return table_dataset(base, files, fmt, partitioning, _typed_schema(dataset))
    return dataset


def partition_keys(dataset) -> tuple[str, ...]:
    """The hive keys of its paths (pyarrow's partitioning schema is the whole one without any)."""
    found = dataset.partitioning.schema if dataset.partitioning else dataset.schema
    return () if found == dataset.schema else tuple(found.names)


def _typed_schema(dataset):
    """The folder's schema with each column its first file leaves untyped (null: a header-only
    CSV, a Parquet file written from an empty frame) typed by the next files that hold values
    in it (read as null, their values failed to convert or were refused as another type)."""
    import pyarrow as pa

    schema = dataset.schema
    for fragment in dataset.get_fragments():
        try:
            schema = pa.unify_schemas([schema, fragment.physical_schema])
        except (pa.ArrowException, OSError) as exc:  # not a table; a column typed otherwise
            raise unreadable(fragment.path, exc) from None
        if not any(pa.types.is_null(field.type) for field in schema):
            break
    return schema


@dataclass(frozen=True)
class FolderSchema:
    """How a folder (or glob) of tables reads as one table: its `base`, the schema it has
    (the first file's columns, then its hive partition keys typed as the whole folder types
    them: int32 where every value of a key is an integer, else string), as Arrow IPC bytes in
    base64, and which of its columns are `keys`. What one file of it read alone (a Ray
    engine's work unit) needs to be read as the folder is: the same columns and types, and a
    file whose columns differ refused as the folder refuses it."""

    base: str
    schema: str
    keys: tuple[str, ...]

    @classmethod
    def of(cls, base: Path, files: list[Path], fmt: str) -> FolderSchema:
        import base64

        dataset = table_dataset(base, files, fmt)
        return cls(str(base), base64.b64encode(dataset.schema.serialize().to_pybytes()).decode(),
                   partition_keys(dataset))

    @classmethod
    def from_json(cls, value: dict | None) -> FolderSchema | None:
        return None if value is None else cls(value["base"], value["schema"], tuple(value["keys"]))

    def dataset(self, path: Path, fmt: str):
        """File `path` of the folder as a dataset of the folder's schema."""
        import base64

        import pyarrow as pa
        import pyarrow.dataset as pads

        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.schema)))
        keys = pads.partitioning(pa.schema([schema.field(k) for k in self.keys]), flavor="hive")
        return table_dataset(Path(self.base), [path], fmt, keys, schema)


def check_schema(fragment, dataset, path, fmt: str) -> None:
    """A file of `dataset` must have its columns (the first file's, less the partition keys
    its path gives it), by name; a Parquet file their types too (a CSV file's are inferred
    from its own rows: a value that is not the first file's type fails its read)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    schema = dataset.schema

    try:
        physical = fragment.physical_schema
        check_column_names(physical.names, path)  # (pyarrow decodes a header's names here)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:  # cut short, not a table
        raise unreadable(path, exc) from None
    keys = pads.get_partition_keys(fragment.partition_expression)  # columns of its path
    expected = [n for n in schema.names if n not in keys]
    for field in physical:
        if field.name not in schema.names:  # (a key the file holds too is read as before)
            raise InputError(f"{path}: has column {field.name!r}, which the first file lacks; "
                             f"expected the columns {expected}")
        if fmt == "parquet" and schema.field(field.name).type != field.type and \
                not pa.types.is_null(field.type):  # untyped (an empty file's): read as any
            raise InputError(f"{path}: column {field.name!r} is {field.type}, expected "
                             f"{schema.field(field.name).type} as in the first file")
    missing = [n for n in expected if n not in physical.names]
    if missing:
        keyed = missing[0] in partition_keys(dataset)
        raise InputError(f"{path}: missing column {missing[0]!r}" + (
            f" (its path holds no {missing[0]}=<value> folder, as the others do)" if keyed
            else "") + f"; expected the columns {expected}")


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


def unreadable(path, exc: BaseException, row: int | None = None) -> InputError:
    """The one line for a table file pyarrow could not read (near `row`); a CSV value that is
    not its integer column's says why the column is one (pyarrow types it from its first rows)."""
    hint = ("; a CSV column's type is what its first rows hold (the first file's, in a folder "
            "or glob): whole numbers there make it integers; write them as decimals (1.0) or "
            "use Parquet") if "CSV conversion error to int" in str(exc) else ""
    return InputError(f"{path}: cannot read table{'' if row is None else f' near row {row}'} "
                      f"({short_reason(exc)}){hint}")


def describe_nonfinite(value) -> str:
    """Why a feature value cannot be fed to a float32 graph."""
    if value is None:
        return "is empty"
    if isinstance(value, (int, float)) and np.isfinite(float(value)):
        return f"is {value:g}, which overflows float32 (largest {np.finfo(np.float32).max:.4g})"
    return "is NaN or infinite"


def check_column_names(names: list[str], source) -> None:
    """A table's header must name each column once."""
    if twice := next((n for n, k in Counter(names).items() if k > 1), None):
        raise InputError(f"{source}: column name {twice!r} appears more than once in the header")


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
        raw = batch.column(names.index(target)).to_numpy(zero_copy_only=False)
        y = labels_to_index(raw, class_names, f"{path}:{target}", by_name=True)
    ids = [f"{under}:{offset + i}" if under else str(offset + i) for i in range(batch.num_rows)]
    return Chunk(ids, x, y, extra)


def _concat(a, b):
    import pyarrow as pa

    return pa.Table.from_batches([a, b]).combine_chunks().to_batches()[0] if a.num_rows else b


