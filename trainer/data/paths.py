"""The files of a dataset as one packed listing: every path relative to the source root,
UTF-8 bytes end to end, and one end offset per path. A list of str costs ~60 bytes per
path more than its characters (the str object and the list's pointer); a folder of
millions of images is listed here for its names' bytes plus 8 bytes each, and with `spill`
those lie in a file on disk, not in memory: a listing of any length costs the process a
buffer."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np

from export.atomic import naming
from export.listing import PackedNames
from trainer.data.records import pread_rows


def encode_path(rel: str) -> bytes:
    """A path's bytes as stored in a listing."""
    return rel.encode("utf-8", "surrogateescape")  # os.fsencode's bytes, for any name


def decode_path(rel: bytes) -> str:
    """A path relative to the root as str, from its bytes in a listing (`encode_path` back)."""
    return rel.decode("utf-8", "surrogateescape")


class _Spill:
    """Names and their end offsets (int64) appended to two unlinked files in a folder:
    gone when closed or when the process dies, read back with pread (so the ingest's
    forked workers read them through the descriptors they inherit)."""

    def __init__(self, folder: str):
        self.folder = folder
        if os.path.exists(folder) and not os.path.isdir(folder):  # makedirs: "File exists"
            raise NotADirectoryError(errno.ENOTDIR, "not a folder; expected the cache folder",
                                     folder)
        with naming(folder):
            os.makedirs(folder, exist_ok=True)
            # held for the listing's life, closed when it is let go
            self.blob, self.ends = (tempfile.TemporaryFile(dir=folder)  # noqa: SIM115
                                    for _ in range(2))
        self.count, self.size = 0, 0  # names and bytes written

    def write(self, names: PackedNames) -> None:
        with naming(self.folder):
            self.blob.write(names.blob)
            self.ends.write((np.frombuffer(names.ends, np.int64) + self.size).tobytes())
            self.blob.flush()
            self.ends.flush()
        self.count, self.size = self.count + len(names), self.size + len(names.blob)

    def span(self, a: int, b: int) -> tuple[bytes, list[int]]:
        """The bytes of names a..b-1 and their ends counted from the first's start."""
        short = f"{self.folder}: the listing's spill file ends early"
        ends = pread_rows(self.ends.fileno(), np.dtype(np.int64), 0, max(a - 1, 0), b, short)
        first = int(ends[0]) if a else 0
        ends = ends[1:] if a else ends
        last = int(ends[-1]) if len(ends) else first
        chunk = pread_rows(self.blob.fileno(), np.dtype(np.uint8), first, 0, last - first, short)
        return chunk.tobytes(), (ends - first).tolist()


class PathList(Sequence[str]):
    """Paths under `root`, in the order added. `paths[i]` is the path to open (root
    joined), `paths.rel(i)` the path relative to the root with "/" separators. With
    `spill` (a folder), the names go to files there every BUFFER bytes (rather than one
    buffer holding them all: 10 million paths of 30 bytes would be 380 MB)."""

    BUFFER = 1 << 20

    def __init__(self, root: str, spill: str | os.PathLike | None = None):
        # Path("wine.csv").parent is ".", and its files are spelled "wine.csv", not "./wine.csv"
        self.prefix = "" if root in ("", ".") else os.path.join(root, "")
        self._prefix_bytes = encode_path(self.prefix)
        self._names = PackedNames()  # those not yet spilled
        self._spill = None if spill is None else _Spill(os.fspath(spill))

    @classmethod
    def of(cls, root: str, paths: Iterable[str]) -> PathList:
        """A listing of full paths, each of which must lie under `root`."""
        out = cls(root)

        def relative(path: str) -> str:
            if not path.startswith(out.prefix):
                raise ValueError(f"every path must lie under {root}: {path}")
            return path[len(out.prefix):]

        out.extend(relative(str(p)) for p in paths)
        return out

    def extend(self, rels: Iterable[str]) -> None:
        """Add paths given relative to the root, "/"-separated (the project is POSIX-only:
        its cache lock is fcntl's)."""
        for rel in rels:
            self._names.append(encode_path(rel))
            if len(self._names.blob) >= self.BUFFER:
                self.flush()

    def extend_packed(self, rels: PackedNames) -> None:
        """Add paths given relative to the root as UTF-8 bytes, in their order, without one
        object per path."""
        self._names.concat(rels)
        if len(self._names.blob) >= self.BUFFER:
            self.flush()

    def flush(self) -> None:
        """The names added so far to the spill files (before forking workers that read
        them: a worker's block() then finds nothing of its own to write)."""
        if self._spill is not None and len(self._names):
            self._spill.write(self._names)
            self._names = PackedNames()

    def __len__(self) -> int:
        return len(self._names) + (self._spill.count if self._spill is not None else 0)

    def rel(self, i: int) -> str:
        return decode_path(self.block(i, i + 1)[0])

    def block(self, a: int, b: int) -> list[bytes]:
        """The relative paths a..b-1 as UTF-8 bytes."""
        if b <= a:
            return []
        self.flush()
        if self._spill is not None:
            chunk, ends = self._spill.span(a, b)
        else:
            names = self._names
            first = names.start(a)
            chunk = bytes(names.blob[first:names.ends[b - 1]])
            ends = [e - first for e in names.ends[a:b]]
        return [chunk[s:e] for s, e in zip([0, *ends[:-1]], ends)]

    def at(self, places: list[int]) -> list[str]:
        """The paths to open of `places` (ascending), read as one span of the listing: one
        pair of preads for them all (`paths[i]` reads a pair for each: in a forked worker,
        twice a file, it was 11% of a first ingest's CPU)."""
        if not places:
            return []
        names = self.block(places[0], places[-1] + 1)
        return [self.prefix + decode_path(names[i - places[0]]) for i in places]

    def full(self, rel: bytes) -> bytes:
        """The path to open, as bytes, of a relative path from `block`."""
        return self._prefix_bytes + rel

    def __getitem__(self, i):  # one path; slices are not needed by the ingest
        if not isinstance(i, int):
            raise TypeError("PathList indices are integers")
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.prefix + self.rel(i)
