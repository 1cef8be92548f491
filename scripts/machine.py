"""One line that says which machine a benchmark ran on: CPU model, the ISA extensions that
matter for its kernels, cores, and the versions of the libraries doing the work."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "neon", "asimd")


def _cpu() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    return model, [f for f in FLAGS if f in flags]


def describe() -> str:
    model, flags = _cpu()
    versions = []
    for name in ("numpy", "onnxruntime", "torch", "lightning", "scipy"):
        # the module's own version where it is imported: onnxruntime-gpu (or a copy ahead on
        # PYTHONPATH) ships the module `onnxruntime` beside another distribution of that name
        version = getattr(sys.modules.get(name), "__version__", None)
        try:
            versions.append(f"{name} {version or md.version(name)}")
        except md.PackageNotFoundError:
            pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = f"{usable} cores" + (f" (of {os.cpu_count()})" if usable != os.cpu_count() else "")
    torch = sys.modules.get("torch")  # named only where the benchmark already uses torch
    if torch is not None:  # the kernels torch dispatches to (ATEN_CPU_CAPABILITY can lower it)
        cores += f"; torch ISA {torch.backends.cpu.get_cpu_capability()}"
    if torch is not None and torch.cuda.is_available():
        cores += f"; GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return (f"machine: {model}; ISA {'+'.join(flags) or 'baseline'}; "
            f"{cores}; {platform.system()} {platform.machine()}; "
            f"Python {platform.python_version()}; {', '.join(versions)}")


def run_trainer(work, *args: str, root=None) -> None:
    """`python -m trainer ARGS` in `work` for a benchmark; its stderr and exit on failure."""
    import subprocess
    from pathlib import Path

    root = root or Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=work,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)})
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])


if __name__ == "__main__":
    print(describe())


def spread(values: list[float], fmt: str = "{:,.1f}") -> str:
    """'median M (min A - max B, n runs)': the median, never the best run."""
    import statistics

    return (f"{fmt.format(statistics.median(values))} (range {fmt.format(min(values))}-"
            f"{fmt.format(max(values))}, {len(values)} runs)")


def ratio_of_medians(ours: list[float], base: list[float]) -> float:
    import statistics

    return statistics.median(ours) / statistics.median(base)
