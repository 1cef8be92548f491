"""glibc's allocator, tuned for training steps and trimmed after an ingest's blocks (no-ops
without glibc: musl, macOS); Arrow's, trimmed after a table's ingest."""

from __future__ import annotations

import functools
import sys


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc's, or AttributeError)
    except (OSError, AttributeError):  # not glibc: nothing to tune or trim
        return None
    return libc


def tune_cpu_allocator() -> None:
    """Keep freed activation buffers in glibc's heap instead of returning them to the OS.

    By default glibc serves blocks above 128 KiB-32 MiB with fresh mmaps and trims the heap
    eagerly, so every training step page-faults its activations in again. Raising both
    thresholds made MNIST convnet steps on 2 cores ~20% faster and removed the gap between
    Lightning and a hand-written loop (scripts/bench_train.py)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: its maximum, 32 MiB
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap


def release_free_memory() -> None:
    """Give the pages of freed heap blocks back to the OS (malloc_trim(0) releases those
    inside the heap too, not only at its top). An ingest's blocks of records, batches and
    merges leave holes in the heap that stay resident, the more so under `trainer fit`'s
    tuning above: a first ingest of 1,010,000 images peaked ~2.5 MB lower with it (43.4 ->
    40.7 MB, docs/benchmarks.md run P). Called once a block of the listing (65,536 files)
    is done: a few ms."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def release_arrow_memory() -> None:
    """Arrow's allocator (mimalloc or jemalloc) keeps the memory a table's decoding freed, up
    to what the files in flight held (AHEAD_BYTES; 173 MB for two 2M-row files), for the
    life of the process, and a fit after the ingest ran on top of it (a first fit of 8M rows
    peaked at 475 MB, now 267-273: docs/benchmarks.md run AN). Handed back to the OS once
    a table's files are written."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
