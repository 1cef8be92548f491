"""The stat of a dataset's files for an update: a piece of the listing at a time, each file
by its name in its open folder, and the rule that keeps a record made too soon after its
file's mtime from vouching for the content."""

from __future__ import annotations

import os
import stat as stat_module
from dataclasses import replace

import numpy as np

from export.errors import InputError
from trainer.data.cache import FileStat, path_key
from trainer.data.paths import PathList
from trainer.data.records import Records

STAT_COLUMNS = ("key", "size", "mtime_ns", "ino")
Stats = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # a piece's STAT_COLUMNS


def missing_file(path: str) -> InputError:
    """A listed file not found now: a link to nothing (os.stat follows it) or one gone."""
    try:
        target = os.readlink(path)
    except OSError:
        return InputError(f"{path}: disappeared during ingest")
    return InputError(f"{path}: a broken link (its target {target} does not exist)")


def _stat(path: bytes, name: bytes, folder: int | None) -> os.stat_result:
    """The stat of `path`, found by its `name` in the open `folder` when there is one."""
    try:
        st = os.stat(path) if folder is None else os.stat(name, dir_fd=folder)
    except FileNotFoundError:
        raise missing_file(os.fsdecode(path)) from None
    except OSError as exc:
        raise InputError(f"{os.fsdecode(path)}: cannot read ({exc.strerror})") from None
    if not stat_module.S_ISREG(st.st_mode):
        FileStat.of(os.fsdecode(path))  # names the path and what it is
    return st


def _open_folder(path: bytes) -> int | None:
    try:
        return os.open(path or b".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None  # the files' own stat by their whole paths names what is wrong


def stat_piece(paths: PathList, a: int, e: int) -> Stats:
    """The path keys and stats of the listing's files a..e-1."""
    rels = paths.block(a, e)
    # Each file by its name in its open folder: the kernel resolves the folder's path once
    # a folder, not once a file (measured: 0.24 vs 0.34 s for 101,000 files in 10 folders).
    stats, here, fd = [], None, None
    try:
        for rel in rels:
            parent, _, name = rel.rpartition(b"/")
            if parent != here:
                if fd is not None:
                    os.close(fd)
                here, fd = parent, _open_folder(paths.full(parent))
            stats.append(_stat(paths.full(rel), name, fd))
    finally:
        if fd is not None:
            os.close(fd)
    return (np.frombuffer(b"".join(map(path_key, rels)), "S16"),
            np.array([s.st_size for s in stats], Records.DTYPES["size"]),
            np.array([s.st_mtime_ns for s in stats], Records.DTYPES["mtime_ns"]),
            np.array([s.st_ino for s in stats], Records.DTYPES["ino"]))


# A file written again within its filesystem's timestamp granularity keeps its mtime_ns
# (a kernel tick before Linux 6.13; 1-2 s on ext3, HFS+, FAT and some NFS servers), so a
# record made that soon after its file's mtime cannot vouch for the content: it is stored
# "racily clean" (git's term) with its size SMUDGED, which no file has, and the next update
# reads and hashes the file again (content it finds cached is not decoded). RACY_NS covers
# the coarsest of those with room for a file server's clock running ahead of this one.
RACY_NS, SMUDGED = 3_000_000_000, -1


def smudged(records: Records, since_ns: int) -> Records:
    """`records` with each racily clean one's size SMUDGED (its mtime within RACY_NS of
    `since_ns`, when the update began, or later): a copy when any is."""
    racy = records.mtime_ns > since_ns - RACY_NS
    return replace(records, size=np.where(racy, SMUDGED, records.size)) if racy.any() \
        else records
