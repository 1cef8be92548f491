"""Where a Python program reaches its peak memory: runs a script in this process while a
thread samples the resident set size (VmRSS) every few milliseconds, and prints the main
thread's stack at the highest one seen.

    .venv/bin/python scripts/peak_where.py [--every-ms 5] [--depth 8] SCRIPT [ARGS...]
    e.g. .venv/bin/python scripts/peak_where.py scripts/bench_scale.py --child ingest \
             --root FOLDER --cache CACHE

tracemalloc tells what is allocated but not what is resident (an array reserved and not
yet touched, memory freed and kept by the allocator); this tells where RSS, what a machine
runs out of, peaks. Sampling misses peaks shorter than its period; run it twice. Linux only
(/proc/self/status).
"""

from __future__ import annotations

import argparse
import runpy
import sys
import threading
import time
import traceback


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every-ms", type=float, default=5.0)
    parser.add_argument("--depth", type=int, default=8, help="stack frames printed")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    main_id, best = threading.main_thread().ident, [0, ""]

    def sample() -> None:
        while True:
            rss = _rss_kib()
            if rss > best[0]:
                frame = sys._current_frames().get(main_id)
                # formatted at once and let go: a frame kept alive keeps its locals alive
                # (a buffer exported to numpy could then not be resized)
                best[:] = [rss, "".join(traceback.format_stack(frame)[-opts.depth:])]
                del frame
            time.sleep(opts.every_ms / 1000)

    threading.Thread(target=sample, daemon=True).start()
    sys.argv = [opts.script, *opts.args]
    try:
        runpy.run_path(opts.script, run_name="__main__")
    finally:
        print(f"peak_where: highest VmRSS seen {best[0] / 1024:.1f} MiB, main thread at:\n"
              f"{best[1]}", file=sys.stderr)


if __name__ == "__main__":
    main()
