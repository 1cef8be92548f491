"""Output formats of the batch job. A job writes numbered parts (one per chunk) and joins
them into the final file at the end, so an interrupted job can resume at the first missing
part. Formats by extension: .csv, .jsonl, .parquet (pyarrow)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from export.atomic import atomic_path
from export.errors import InputError

FORMATS = (".csv", ".jsonl", ".parquet")


def check_format(output: Path) -> str:
    if output.suffix not in FORMATS:
        raise InputError(f"{output}: output must end in {', '.join(FORMATS)}")
    if output.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise InputError(f"{output}: writing Parquet needs pyarrow (pip install pyarrow)") from None
    return output.suffix


def write_part(path: Path, columns: dict[str, list]) -> None:
    """One chunk's rows, written atomically (a part either exists whole or not at all)."""
    fmt = path.suffix
    names = list(columns)
    with atomic_path(path) as tmp:
        if fmt == ".csv":
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(zip(*columns.values()))
        elif fmt == ".jsonl":
            with open(tmp, "w") as f:
                for row in zip(*columns.values()):
                    f.write(json.dumps(dict(zip(names, row))) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table(columns), tmp)


def join_parts(parts: list[Path], output: Path, header: list[str], expected_rows: int) -> int:
    """Concatenate the parts into `output` atomically, streaming part by part; count the
    rows of the joined file and refuse to put it in place unless they are `expected_rows`."""
    with atomic_path(output) as tmp:
        if output.suffix == ".parquet":
            _join_parquet(parts, tmp, header)
        else:
            with open(tmp, "wb") as out:
                if output.suffix == ".csv":
                    out.write((",".join(header) + "\r\n").encode())
                for part in parts:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out)
        rows = count_rows(tmp, output.suffix)
        if rows != expected_rows:
            raise InputError(f"{output}: the joined file has {rows} rows but its parts recorded "
                             f"{expected_rows}; nothing written")
    return rows


def _join_parquet(parts: list[Path], tmp: Path, header: list[str]) -> None:
    import pyarrow.parquet as pq

    writer = None
    for part in parts:
        table = pq.read_table(part)
        writer = writer or pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table)
    if writer is None:  # no rows: an empty file with the header's columns
        import pyarrow as pa

        pq.write_table(pa.table({name: [] for name in header}), tmp)
    else:
        writer.close()


def count_rows(path: Path, fmt: str) -> int:
    """Data rows in an output file, read back from the file itself."""
    if fmt == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, newline="") as f:
        if fmt == ".jsonl":  # json.dumps escapes newlines: one line per row
            return sum(1 for _ in f)
        return sum(1 for _ in csv.reader(f)) - 1  # quoted newlines stay inside their row
