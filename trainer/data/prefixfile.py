"""A column of hash values searched from disk: the first 4 bytes of each value with its
place, sorted (bucketsort) into an unnamed file, and every PAGE-th of them in memory to
find the page to read. What an update searches the cache's index by content with (one
digest at a time, for the files it decodes): ~0.02 bytes a file held, where the sorted
prefixes and places in memory held 8 (80 MB at ten million files)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from export.atomic import naming
from trainer.data.bucketsort import bucket_sorted
from trainer.data.records import pread_rows, prefix4, prefix_of

PAGE = 256  # entries read together (2 KiB): one pread finds a value's place
SORTED = np.dtype(">u8")  # prefix above place, big-endian while sorted: bytes in value order


class PrefixFile:
    def __init__(self, n: int, values: Callable[[int, int], np.ndarray], folder: Path):
        """`values(a, b)`: values a..b-1 of the column (S16 or S32), n in all (< 2**32)."""
        def entries(a: int, b: int) -> np.ndarray:
            out = prefix4(values(a, b)).astype(np.uint64) << np.uint64(32)
            out |= np.arange(a, b, dtype=np.uint64)
            return out.astype(SORTED)

        self.n, firsts, at = n, [], 0
        with naming(folder):  # a full disk names the cache folder
            self.file = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 (let go with self)
            for part in bucket_sorted(n, entries, entries, lambda e: e, folder):
                part = part.astype(np.uint64)  # stored native: searched without a conversion
                self.file.write(part.tobytes())
                firsts.append(part[(-at) % PAGE::PAGE] >> np.uint64(32))  # at multiples of PAGE
                at += len(part)
            self.file.flush()
        self.firsts = np.concatenate(firsts or [np.zeros(0, np.uint64)]).astype(np.uint32)

    def find(self, value: bytes, whole: Callable[[int], bytes]) -> int:
        """The place of `value` (-1 if none): among the places whose values share its first
        4 bytes, the first whose `whole(place)` is `value`. ~6 us (pages in the page cache)."""
        want = prefix_of(value)
        at = max(0, int(self.firsts.searchsorted(want)) - 1) * PAGE  # its page or the next
        while at < self.n:
            page = pread_rows(self.file.fileno(), np.dtype(np.uint64), 0, at,
                              min(at + PAGE, self.n), "the sorted prefixes' file ends early")
            for i in range(int(page.searchsorted(np.uint64(want << 32))), len(page)):
                entry = int(page[i])
                if entry >> 32 != want:
                    return -1
                if whole(entry & 0xFFFFFFFF) == value:
                    return entry & 0xFFFFFFFF
            at += PAGE
        return -1
