"""The records of a row cache's index: one per source file, held as numpy columns (never
one Python object per file: a folder of millions of files costs ~100 bytes of memory per
file here), and written to the index as .npy columns block by block."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, fields

import numpy as np


@dataclass
class Records:
    """One record per source file, as columns (numpy "S" columns hold raw bytes; read an
    element back with `.tobytes()` of a one-row slice: indexing drops trailing NULs)."""

    key: np.ndarray  # S16, path_key of the relative path
    size: np.ndarray  # int64
    mtime_ns: np.ndarray  # int64
    ino: np.ndarray  # uint64
    digest: np.ndarray  # S32, SHA-256 of the file's bytes
    start: np.ndarray  # int64, first row in the column files
    count: np.ndarray  # int64, rows decoded from the file
    check: np.ndarray  # S8, of the decoded rows (CRC-32 per column, combined)

    DTYPES = {"key": "S16", "size": np.int64, "mtime_ns": np.int64, "ino": np.uint64,
              "digest": "S32", "start": np.int64, "count": np.int64, "check": "S8"}

    @classmethod
    def empty(cls, n: int = 0) -> Records:
        return cls(**{k: np.zeros(n, d) for k, d in cls.DTYPES.items()})

    def __len__(self) -> int:
        return len(self.key)

    def columns(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def take(self, rows) -> Records:
        return Records(**{k: v[rows] for k, v in self.columns().items()})



WRITE_ROWS = 1 << 14  # records written to the index (or walked) per block


def write_npy(npz: zipfile.ZipFile, name: str,
               parts: list[tuple[np.ndarray, np.ndarray | None]]) -> None:
    """One .npy member of `npz`: the arrays of `parts` (the rows a mask marks, or all)
    one after another, as np.savez would write their concatenation."""
    dtype = parts[0][0].dtype
    n = sum(len(a) if m is None else int(np.count_nonzero(m)) for a, m in parts)
    with npz.open(f"{name}.npy", "w", force_zip64=True) as out:
        np.lib.format.write_array_header_2_0(out, {
            "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
            "shape": (n,)})
        for a, m in parts:
            for b in range(0, len(a), WRITE_ROWS):
                block = a[b:b + WRITE_ROWS]
                if m is not None:
                    block = block[m[b:b + WRITE_ROWS]]
                out.write(memoryview(np.ascontiguousarray(block, dtype)).cast("B"))
