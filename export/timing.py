"""Quick checks that pick a setting by timing it on this machine, and their answers
remembered per machine (torch-free: the training side's precision and layout checks and the
batch job's and the server's thread counts share it)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

from export.records import load_json

# A setting is taken only when a quick check finds it at least this much faster than the
# default: near 1.0 the choice would only follow noise.
CLEARLY_FASTER = 0.9
CHECKS = "hardware-checks.json"  # in the cache folder (FROZENFIT_CACHE, ~/.cache/frozenfit)
KEEP_CHECKS = 64


def cache_folder() -> Path:
    """Where frozenfit keeps what it can recompute: FROZENFIT_CACHE, or ~/.cache/frozenfit."""
    return Path(os.environ.get("FROZENFIT_CACHE", Path.home() / ".cache" / "frozenfit"))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def remembered(key: list, check, decode) -> tuple[object, bool]:
    """(`decode` of `check()`'s answer, whether it was remembered). The answer (JSON) is kept
    in CHECKS under the SHA-256 of `key`, which must name everything the answer depends on
    (the machine, the library versions, the model), so that anything else is checked
    again. A damaged entry (`decode` raises ValueError, TypeError or KeyError) or file is
    checked again; a cache that cannot be written costs a check next time, nothing else."""
    from export.atomic import atomic_path

    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()
    path = cache_folder() / CHECKS
    try:
        known = load_json(path.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    if digest in known:
        try:
            return decode(known[digest]), True
        except (ValueError, TypeError, KeyError):
            pass
    answer = check()
    known.pop(digest, None)
    known[digest] = answer  # the newest KEEP_CHECKS are kept
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(dict(list(known.items())[-KEEP_CHECKS:])))
    except OSError:
        pass
    return decode(answer), False


def medians(steps: dict, warmups: int = 2, repeats: int = 7) -> dict:
    """Median seconds of each step. The steps run interleaved after warm-ups (the first
    calls build kernels), so a change in clock speed or a neighbour's load falls on all of
    them alike (a single timed call can read a ratio the wrong way round)."""
    for step in steps.values():
        for _ in range(warmups):
            step()
    times: dict = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under taskset or a
    container's cpuset), not the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes this machine can still give a process without swapping (Linux MemAvailable),
    or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
