"""How a folder (or glob) of tables reads as one table: the pyarrow dataset of its files,
their hive partition keys, the schema every file must have, and the one line for a table
pyarrow cannot read. Shared by training and the batch job (export/tables.py); no torch."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from export.errors import InputError
from export.readers import short_reason


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
    except pa.ArrowTypeError as exc:  # a hive key typed otherwise than a column of the file
        try:
            first = pads.dataset(str(files[0]), format=form).schema.names
        except (pa.ArrowException, OSError, UnicodeDecodeError):
            first = []
        raise key_in_file(files[0], first, hive_keys(base, files[0])) or \
            unreadable(files[0], exc) from None
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:  # a header not UTF-8
        raise unreadable(files[0], exc) from None
    if schema is None and any(pa.types.is_null(field.type) for field in dataset.schema):
        return table_dataset(base, files, fmt, partitioning, _typed_schema(dataset))
    if fmt == "csv":
        check_csv_columns(dataset.schema.names, files[0], hive_keys(base, files[0]))
    return dataset


def check_csv_columns(names: list[str], path: Path, keys: dict) -> None:
    """A CSV read as a single column whose name holds ';' or a tab: a file separated by
    them, not by commas (the error would otherwise be a missing column)."""
    own = [name for name in names if name not in keys]
    sep = next((c for c in ";\t|" if len(own) == 1 and c in own[0]), None)
    if sep is not None:
        raise InputError(f"{path}: reads as one column {own[0]!r}, its values separated by "
                         f"{sep!r}; expected a comma-separated file")


def bytes_column(path: Path, name: str, type_) -> InputError | None:
    """A CSV column read as bytes where text is expected (class labels): text that is not
    UTF-8 (a Parquet file's bytes are bytes, named so where they are refused)."""
    import pyarrow.types as pat

    if Path(path).suffix.lower() == ".csv" and (pat.is_binary(type_) or
                                                 pat.is_large_binary(type_)):
        return InputError(f"{path}: column {name!r} holds text that is not UTF-8; save the "
                          "file as UTF-8")
    return None


def hive_keys(base: Path, path: Path) -> dict[str, str]:
    """{key: value} of the key=value folder names of `path` below `base`."""
    try:
        folders = path.relative_to(base).parts[:-1]
    except ValueError:
        return {}
    return dict(name.split("=", 1) for name in folders if "=" in name)


def key_in_file(path, columns: list[str], keys: dict) -> InputError | None:
    """A hive key that is also a column of the file: pyarrow reads the folder's value in every
    row in place of the file's own (or fails, typed otherwise), so it is refused, not guessed."""
    both = next((k for k in keys if k in columns), None)
    if both is None:
        return None
    return InputError(f"{path}: column {both!r} is also a key of its folders' names "
                      f"({both}={keys[both]}), whose value would replace the file's in every "
                      "row; rename the folder or drop the column from the file")


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
    if clash := key_in_file(path, physical.names, keys):
        raise clash
    expected = [n for n in schema.names if n not in keys]
    for field in physical:
        if field.name not in schema.names:
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


def unreadable(path, exc: BaseException, row: int | None = None) -> InputError:
    """The one line for a table file pyarrow could not read (near `row`); a CSV value that is
    not its integer column's says why the column is one (pyarrow types it from its first rows)."""
    hint = ("; a CSV column's type is what its first rows hold (the first file's, in a folder "
            "or glob): whole numbers there make it integers; write them as decimals (1.0) or "
            "use Parquet") if "CSV conversion error to int" in str(exc) else ""
    return InputError(f"{path}: cannot read table{'' if row is None else f' near row {row}'} "
                      f"({short_reason(exc)}){hint}")


def check_column_names(names: list[str], source) -> None:
    """A table's header must name each column once."""
    if twice := next((n for n, k in Counter(names).items() if k > 1), None):
        raise InputError(f"{source}: column name {twice!r} appears more than once in the header")
