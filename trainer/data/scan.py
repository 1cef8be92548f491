"""A dataset's files worked on in forked processes, one per usable core: listing class
folders and stat'ing every file are the floor of an update that finds little changed
(measured at 1,010,000 images on 2 cores: the stat of every file 3.0 s in one process, 1.6 s
over two; listing the class folders 1.2 s), and decoding is most of a first ingest.
Forked, not spawned: the workers inherit the job (the listing's spill files, the cache's
digests, the decoder) instead of having it pickled."""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from export.children import die_with_parent
from export.errors import InputError
from export.timing import usable_cores

# files each forked worker gets at least: fewer, and starting it costs more than it saves
# (a fork of a process that imported torch takes ~10-30 ms; a stat ~3 us, a listed name ~1
# us), so 64 cores do not fork 64 processes for 20,000 files
FORK_FILES = 1 << 14


def fork_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=die_with_parent)


def worth_forking(files: int, tasks: int) -> int:
    """How many processes to fork for `tasks` pieces of work over `files` files: one per
    usable core, at most one per piece and per FORK_FILES files; 0 where one process does as
    well (one core, one piece, few files)."""
    workers = min(usable_cores(), tasks, files // FORK_FILES)
    return workers if workers > 1 else 0


def died(where: object) -> InputError:
    """The one line for a worker process that died under an ingest of `where` (killed, or
    out of memory): concurrent.futures says only that the pool is broken."""
    return InputError(f"{where}: a worker process of the ingest died (killed, or out of "
                      "memory); what was complete is kept: run the command again")


def in_order(pool: ProcessPoolExecutor, fn: Callable, items: Iterable[tuple],
             ahead: int, where: object) -> Iterator:
    """fn(*item) for each item, done by `pool`, yielded in order, with at most `ahead`
    submitted and not yet taken: a consumer slower than the workers does not make their
    results pile up in memory. A worker that dies is `died(where)`."""
    pending: deque = deque()
    try:
        for item in items:
            if len(pending) >= ahead:
                yield pending.popleft().result()
            pending.append(pool.submit(fn, *item))
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise died(where) from None
