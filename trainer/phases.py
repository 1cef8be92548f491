"""Where the seconds of a `trainer fit` go: start (interpreter, imports, parsing), data
(reading the dataset, building the model and Trainer, sanity checks), check (the hardware
choice), epochs, export (with its gates), test, and the total from the process's own start
(read from /proc, so the interpreter's start-up counts). One process-wide clock; the CLI
marks the points, `line()` prints them and metrics.json keeps them under `phases`."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

ORDER = ("start", "data", "check", "epochs", "export", "test")
_marks: dict[str, float] = {}
_spent: dict[str, float] = {}


def _process_age() -> float:
    """Seconds since this process started (Linux: /proc), else since this module loaded."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _LOADED


_LOADED = time.perf_counter()
_STARTED = _LOADED - _process_age()  # on the perf_counter clock


def mark(name: str) -> None:
    """A point in time (the first time only: a resumed loop does not move it)."""
    _marks.setdefault(name, time.perf_counter())


@contextmanager
def timed(name: str):
    """Add the block's seconds to phase `name`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        _spent[name] = _spent.get(name, 0.0) + time.perf_counter() - start


def phases() -> dict[str, float]:
    """Seconds per phase so far, and `total` from the process's start."""
    now = time.perf_counter()
    begin, train, trained = (_marks.get(k) for k in ("build", "train_start", "train_end"))
    out = {"start": (begin or now) - _STARTED}
    if begin is not None and train is not None:
        out["data"] = max(0.0, train - begin - _spent.get("check", 0.0))
    out.update({k: v for k, v in _spent.items() if k in ORDER})
    if train is not None:
        out["epochs"] = (trained or now) - train
    out["total"] = now - _STARTED
    return {k: round(out[k], 3) for k in (*ORDER, "total") if k in out}


def line(measured: dict[str, float]) -> str:
    return "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in measured.items())
