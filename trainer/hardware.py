"""Settings that depend on the hardware, picked by what the machine can do and logged with
the reason: a recipe must not be fast on one CPU and pathological on another (bf16 is
native on AMX and AVX-512-BF16 CPUs and emulated, about 10x slower than fp32, on AVX2 ones).

`AutoTrainer` is Lightning's Trainer with one change: `precision` defaults to "auto".
"""

from __future__ import annotations

import platform
import statistics
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info


# bf16 is refused when a quick check finds it this much slower than fp32. Native bf16
# measures about 0.5x and emulated bf16 about 10x, so the choice does not flip between
# runs on one machine.
MUCH_SLOWER = 1.5


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16_cpu() -> list[str]:
    """The CPU features torch reports that run bf16 natively (empty: it would be emulated)."""
    checks = {"AMX": "_is_amx_tile_supported", "AVX512-BF16": "_is_avx512_bf16_supported"}
    return [name for name, fn in checks.items() if getattr(torch.cpu, fn, lambda: False)()]


def _step_seconds(bf16: bool) -> float:
    """Median time of a small convolution's forward and backward pass."""
    conv = torch.nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(32, 16, 28, 28)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = conv(x).float().sum()
        out.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def choose_precision(accelerator: str) -> tuple[str, dict]:
    """The precision for this machine and a record of why (for the log, metrics.json and the
    model card)."""
    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    if cuda:
        major, minor = torch.cuda.get_device_capability()
        name = torch.cuda.get_device_name()
        precision = "bf16-mixed" if (major, minor) >= (8, 0) else "16-mixed"
        return precision, {"device": f"CUDA {name}", "capability": f"{major}.{minor}",
                           "reason": f"compute capability {major}.{minor} "
                                     f"{'>=' if major >= 8 else '<'} 8.0"}
    isa = torch.backends.cpu.get_cpu_capability()
    native = native_bf16_cpu()
    record = {"device": f"CPU {cpu_model()}", "isa": isa, "bf16_native": native}
    if not native:
        return "32-true", {**record, "reason": f"torch reports {isa} without AMX or "
                                               f"AVX512-BF16: bf16 would be emulated"}
    ratio = _step_seconds(True) / _step_seconds(False)
    record["bf16_vs_fp32_time"] = round(ratio, 2)
    if ratio > MUCH_SLOWER:  # native on paper, much slower here: the measurement wins
        return "32-true", {**record, "reason": f"{'+'.join(native)} reported, but a quick check "
                                               f"ran bf16 at {ratio:.2f}x the fp32 time"}
    return "bf16-mixed", {**record, "reason": f"{'+'.join(native)}; a quick check ran bf16 at "
                                              f"{ratio:.2f}x the fp32 time"}


class AutoTrainer(L.Trainer):
    def __init__(self, *args, precision: str | int | None = "auto", **kwargs):
        """Lightning's Trainer; see its documentation for every argument.

        Args:
            precision: "auto" (the default) picks by capability: on CUDA bf16-mixed from
                compute capability 8.0, else 16-mixed; on a CPU bf16-mixed only where torch
                reports native bf16 (AMX or AVX512-BF16) and a quick check does not find it
                much slower, else 32-true. Or any value Lightning accepts (32, bf16-mixed, 16-mixed, ...).
        """
        accelerator = str(kwargs.get("accelerator", "auto"))
        if precision == "auto":
            precision, self.hardware = choose_precision(accelerator)
            rank_zero_info(f"precision: {precision} ({self.hardware['device']}: "
                           f"{self.hardware['reason']})")
        else:
            self.hardware = {"device": "set by the configuration"}
        self.hardware["precision"] = str(precision)
        super().__init__(*args, precision=precision, **kwargs)
