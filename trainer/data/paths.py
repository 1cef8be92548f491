"""The files of a dataset as one packed listing: every path relative to the source root,
UTF-8 bytes end to end in one buffer, and one end offset per path. A list of str costs ~60
bytes per path more than its characters (the str object and the list's pointer); a
folder of millions of images is listed here for its names' bytes plus 8 bytes each."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from export.listing import PackedNames


def encode_path(rel: str) -> bytes:
    """A path's bytes as stored in a listing."""
    return rel.encode("utf-8", "surrogateescape")  # os.fsencode's bytes, for any name


class PathList(Sequence[str]):
    """Paths under `root`, in the order added. `paths[i]` is the path to open (root
    joined), `paths.rel(i)` the path relative to the root with "/" separators."""

    def __init__(self, root: str):
        # Path("wine.csv").parent is ".", and its files are spelled "wine.csv", not "./wine.csv"
        self.prefix = "" if root in ("", ".") else os.path.join(root, "")
        self._prefix_bytes = encode_path(self.prefix)
        self._names = PackedNames()

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

    def extend_sorted(self, rels: PackedNames) -> None:
        """Add paths given relative to the root as UTF-8 bytes, in byte order (the order of
        their str for UTF-8 names), without one object per path."""
        self._names.extend(rels, rels.order())

    def __len__(self) -> int:
        return len(self._names)

    def rel(self, i: int) -> str:
        return self._names[i].decode("utf-8", "surrogateescape")

    def block(self, a: int, b: int) -> list[bytes]:
        """The relative paths a..b-1 as UTF-8 bytes."""
        names = self._names
        first = names.start(a)
        chunk = bytes(names.blob[first:names.ends[b - 1]]) if b > a else b""
        ends = [e - first for e in names.ends[a:b]]
        return [chunk[s:e] for s, e in zip([0, *ends[:-1]], ends)]

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
