"""Quick checks that pick a setting by timing it on this machine (torch-free: the training
side's precision and layout checks and the batch job's thread count share it)."""

from __future__ import annotations

import os
import statistics
import time

# A setting is taken only when a quick check finds it at least this much faster than the
# default: near 1.0 the choice would only follow noise.
CLEARLY_FASTER = 0.9


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
