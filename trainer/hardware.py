"""Settings that depend on the hardware, picked by what the machine can do and logged with
the reason: a recipe must not be fast on one CPU and pathological on another (bf16 is
native on AMX and AVX-512-BF16 CPUs and emulated, many times slower than fp32, on AVX2 ones).

`AutoTrainer` is Lightning's Trainer with one change: `precision` defaults to "auto".
"""

from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from export.card import HardwareChoice
from export.timing import CHECKS, CLEARLY_FASTER, cpu_model, medians, remembered

# A setting that changes the numbers (bf16) or the layout (channels_last) is taken only when
# a quick check finds it clearly faster (export.timing.CLEARLY_FASTER): emulated bf16 is far
# slower and native bf16 faster on wide convolutions, but a tiny net can run bf16 no faster
# than fp32 even on AVX512-BF16 (its casts cost what its FLOPs save).


def native_bf16_cpu() -> list[str]:
    """The CPU features torch reports that run bf16 natively (empty: it would be emulated)."""
    checks = {"AMX": "_is_amx_tile_supported", "AVX512-BF16": "_is_avx512_bf16_supported"}
    return [name for name, fn in checks.items() if getattr(torch.cpu, fn, lambda: False)()]


def _stand_in_net() -> tuple[torch.nn.Module, torch.Tensor]:
    """A stand-in when the model is not known yet: a small convolution stack."""
    net = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32),
                              torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, 2, padding=1))
    return net, torch.randn(32, 16, 28, 28)


def _time_steps(net: torch.nn.Module, example: torch.Tensor, precisions: list[str],
                layouts: list[bool], device: str = "cpu") -> dict:
    """Seconds of one forward and backward pass for each (precision, channels_last), on
    copies of `net` on `device`; `net` and the global RNG are left untouched."""
    import copy

    cuda = device == "cuda"
    dtypes = {"bf16": torch.bfloat16, "16": torch.float16}
    steps = {}
    for layout in layouts:
        fmt = torch.channels_last if layout else torch.contiguous_format
        model = copy.deepcopy(net).to(device).train().to(memory_format=fmt)
        x = example.to(device)
        x = x.contiguous(memory_format=fmt) if x.ndim == 4 else x
        for precision in precisions:
            dtype = dtypes.get(precision.split("-")[0])

            def run(model=model, x=x, dtype=dtype):
                with torch.autocast(device, dtype=dtype or torch.bfloat16,
                                    enabled=dtype is not None):
                    out = model(x).float().sum()
                out.backward()
                if cuda:  # kernels run asynchronously: time them, not their launch
                    torch.cuda.synchronize()
            steps[precision, layout] = run
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        return medians(steps)


def _remembered_steps(net: torch.nn.Module, example: torch.Tensor, precisions: list[str],
                      layouts: list[bool], device: str, record: dict) -> tuple[dict, bool]:
    """`_time_steps`, remembered per machine and net (export.timing.remembered): the key
    covers the device (CPU model and ISA, or GPU and capability), torch and CUDA versions,
    the net's structure and parameter shapes, the example's shape and the candidates (and
    oneDNN's ISA cap), so another CPU, library or net is checked again. Returns (seconds
    per candidate, whether they were remembered)."""
    key = [record.get("device"), record.get("isa"), record.get("capability"), torch.__version__,
           torch.version.cuda, os.environ.get("ONEDNN_MAX_CPU_ISA"), str(net),
           [list(p.shape) for p in net.parameters()], list(example.shape), str(example.dtype),
           precisions, layouts]

    def check() -> list:
        steps = _time_steps(net, example, precisions, layouts, device)
        return [[p, cl, v] for (p, cl), v in steps.items()]

    def decode(stored: list) -> dict:
        steps = {(str(p), bool(cl)): float(v) for p, cl, v in stored}
        if set(steps) != {(p, cl) for p in precisions for cl in layouts}:
            raise ValueError("other candidates")
        return steps

    return remembered(key, check, decode)


def _precision_candidates(cuda: bool, precision: str) -> tuple[dict, list[str]]:
    """The device's record and the precisions worth timing (one when the answer is known
    without a check)."""
    record = {"reason": "set by the configuration"}
    if cuda:
        major, minor = torch.cuda.get_device_capability()
        record.update(device=f"CUDA {torch.cuda.get_device_name()}", capability=f"{major}.{minor}")
        if precision == "auto":
            precision = "bf16-mixed" if major >= 8 else "16-mixed"
            relation = ">=" if major >= 8 else "<"
            record["reason"] = f"compute capability {major}.{minor} {relation} 8.0"
        return record, [str(precision)]
    isa, native = torch.backends.cpu.get_cpu_capability(), native_bf16_cpu()
    record.update(device=f"CPU {cpu_model()}", isa=isa, bf16_native=native)
    if precision == "auto" and not native:
        record["reason"] = (f"torch reports {isa} without AMX or AVX512-BF16: bf16 would "
                            f"be emulated")
    return record, (["32-true", "bf16-mixed"] if precision == "auto" and native else
                    ["32-true" if precision == "auto" else str(precision)])


def choose(accelerator: str = "auto", net: torch.nn.Module | None = None,
           example: torch.Tensor | None = None, precision: str = "auto",
           channels_last: bool | str = "auto") -> HardwareChoice:
    """The precision and memory layout for this machine (each "auto" or fixed), and why,
    for the log, metrics.json and the model card. With the model (`net` and an
    example batch) a training step of each candidate is timed; without it a small
    convolution stack stands in for the precision check, and the layout is left to be
    chosen later (None).

    Precision: on CUDA bf16-mixed from compute capability 8.0, else 16-mixed; on a CPU
    bf16-mixed only where torch reports native bf16 (AMX or AVX512-BF16) and the check finds
    it clearly faster than fp32, else 32-true. channels_last, on either: where the check
    finds it clearly faster (NHWC feeds tensor cores and oneDNN's NHWC kernels, yet a tiny
    net can run slower in it on a GPU; docs/benchmarks.md)."""
    known = net is not None
    conv = known and any(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    record, precisions = _precision_candidates(cuda, precision)
    if not cuda and not known and len(precisions) > 1:  # the check needs some convolution
        net, example = _stand_in_net()
    if channels_last == "auto" and known and conv:
        layouts = [False, True]
    else:
        layouts = [channels_last is True]
        if channels_last == "auto" and known:
            record["layout_reason"] = "no 2-D convolutions"
    if net is not None and len(precisions) * len(layouts) > 1:
        try:
            t, from_cache = _remembered_steps(net, example, precisions, layouts,
                                              "cuda" if cuda else "cpu", record)
        except RuntimeError as exc:  # out of memory on a shared GPU, say: the defaults
            t = None
            record["layout_reason"] = f"the quick check failed ({str(exc)[:80]})"
            precisions, layouts = precisions[:1], [False]
        if t is not None:
            timed = f" (remembered from an earlier run: {CHECKS})" if from_cache else ""
            record["step_ms"] = {f"{p}{' channels_last' if cl else ''}": round(v * 1e3, 2)
                                 for (p, cl), v in t.items()}

            def layout(p: str) -> bool:
                return len(layouts) > 1 and t[p, True] < CLEARLY_FASTER * t[p, False]

            if len(precisions) > 1:
                ratio = t["bf16-mixed", layout("bf16-mixed")] / t["32-true", layout("32-true")]
                record["reason"] = (f"{'+'.join(record['bf16_native'])}; a quick check ran "
                                    f"bf16 at {ratio:.2f}x the fp32 time{timed}")
                precisions = ["bf16-mixed" if ratio < CLEARLY_FASTER else "32-true"]
            if len(layouts) > 1:
                ratio = t[precisions[0], True] / t[precisions[0], False]
                record["layout_reason"] = (f"a quick check ran NHWC at {ratio:.2f}x the NCHW "
                                           f"time{timed}")
                layouts = [layout(precisions[0])]
    chosen = None if channels_last == "auto" and not known else layouts[0]
    return HardwareChoice.from_json({**record, "precision": precisions[0],
                                     "channels_last": chosen}, "hardware.choose")


class AutoTrainer(L.Trainer):
    def __init__(self, *args, precision: str | int | None = "auto", **kwargs):
        """Lightning's Trainer; see its documentation for every argument.

        Args:
            precision: "auto" (the default) picks by capability: on CUDA bf16-mixed from
                compute capability 8.0, else 16-mixed; on a CPU bf16-mixed only where torch
                reports native bf16 (AMX or AVX512-BF16) and a quick check finds it clearly
                faster, else 32-true (see `choose`). Or any value Lightning accepts (32,
                bf16-mixed, 16-mixed, ...).
        """
        accelerator = str(kwargs.get("accelerator", "auto"))
        if precision == "auto":
            self.hardware = choose(accelerator)
            precision = self.hardware.precision
            rank_zero_info(f"precision: {precision} ({self.hardware.device}: "
                           f"{self.hardware.reason})")
        else:
            self.hardware = HardwareChoice(device="set by the configuration",
                                           precision=str(precision))
        if kwargs.get("enable_progress_bar", True) is not False:
            from lightning.pytorch.callbacks import ProgressBar

            from trainer.callbacks import EpochProgressBar

            callbacks = kwargs.get("callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            if not any(isinstance(c, ProgressBar) for c in callbacks):
                kwargs["callbacks"] = [*callbacks, EpochProgressBar()]  # epochs from 1
        super().__init__(*args, precision=precision, **kwargs)


def pinned_choice(hardware: dict | None, precision, source: str) -> HardwareChoice | None:
    """A resumed fit keeps the precision and layout its checkpoint chose by quick checks
    (re-timing could choose otherwise, and the run would not continue as it began); values
    set in the configuration still win. `hardware`: the checkpoint's record, as saved."""
    if not hardware or str(precision) != "auto" or "reason" not in hardware:
        return None
    return HardwareChoice.from_json(hardware, source, "hardware.").kept_on_resume()
