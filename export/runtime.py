"""Predictor: a frozen ONNX model served by onnxruntime. numpy + onnxruntime only.

The model card inside the file says what input the graph takes; every batch is checked
against it before it reaches the session, and the error names the expected spec.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.card import InputSpec, check_graph, parse_card
from export.errors import InputError, require_file

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass
class Prediction:
    """Classification fills labels/probabilities/logits; regression fills values."""

    labels: np.ndarray | None = None         # (N,) int64 class index
    probabilities: np.ndarray | None = None  # (N, classes) float32
    logits: np.ndarray | None = None         # (N, classes) float32
    values: np.ndarray | None = None         # (N,) float32 regression outputs

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(axis=1)


_ORT_TYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32",
              "tensor(float16)": "float16", "tensor(double)": "float64"}


@functools.cache
def _load_cuda_libraries() -> None:
    """onnxruntime-gpu from pip finds the CUDA and cuDNN libraries of the nvidia-* wheels only
    once they are loaded (torch loads them on import; the deploy side imports no torch), so
    load them the way onnxruntime documents. Its notes go to stderr: stdout may be the job's
    output."""
    if hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(sys.stderr):
            ort.preload_dlls()


def _providers(provider: str) -> list[str]:
    """The onnxruntime providers `provider` (auto, cpu or cuda) names, best first."""
    available = ort.get_available_providers()
    if provider == "auto":
        return [p for p in (PROVIDERS["cuda"], PROVIDERS["cpu"]) if p in available]
    if provider not in PROVIDERS:
        raise InputError(f"--provider: expected auto, cpu or cuda, got {provider!r}")
    if PROVIDERS[provider] not in available:
        raise InputError(f"--provider {provider}: onnxruntime offers only {available}")
    return [PROVIDERS[provider]]


def uses_cuda(provider: str) -> bool:
    """Whether a session asked for `provider` runs on CUDA (if its provider starts)."""
    return _providers(provider)[0] == PROVIDERS["cuda"]


# The CUDA provider's default runs float32 convolutions and matrix products in TF32 (10-bit
# mantissa): on an H200 the speedrun model's confidences moved by 5.5e-4 from the CPU's
# (scripts/gpu_check.sh), past what the export's parity gate measured. A float32 graph is
# run in float32; an fp16 export is the fast path on a GPU (`trainer export --precision fp16`).
CUDA_OPTIONS = {"use_tf32": "0"}


def _session_providers(provider: str) -> list:
    chosen = _providers(provider)
    if PROVIDERS["cuda"] in chosen:
        _load_cuda_libraries()
    return [(p, CUDA_OPTIONS) if p == PROVIDERS["cuda"] else p for p in chosen]


def _graph_failure(exc: Exception) -> str:
    """onnxruntime's reason, from the failing node on ('... running Reshape node.
    Name:'/net/Reshape' Status Message: ...'), on one line and cut short."""
    text = " ".join(str(exc).split())
    at = text.find("running ")
    text = text[at + len("running "):] if at >= 0 else text
    return text if len(text) <= 300 else text[:300] + "..."


def describe_input(spec: InputSpec) -> str:
    dims = ", ".join(map(str, spec.shape))
    lo, hi = spec.value_range
    return f"{spec.dtype} array of shape (N, {dims}) with values in [{lo}, {hi}]"


def _shape_mismatch(spec: InputSpec, got: tuple) -> str:
    """What is wrong with an input of shape `got`, saying so when it is the wrong kind of
    data altogether (a table for an image model, images for a table model)."""
    expected = f"expected {describe_input(spec)}, got shape {got}"
    if spec.image and len(got) == 2:
        return (f"the model takes images and this input is a table ({got[0]} rows x "
                f"{got[1]} numeric columns); {expected}")
    if not spec.image and len(got) >= 3:
        return (f"the model takes a table of {spec.shape[0]} feature columns and this "
                f"input is images or a multi-dimensional array; {expected}")
    return expected


def check_input(spec: InputSpec, x: np.ndarray, source: str = "input") -> np.ndarray:
    """Return `x` as the graph of the card's input `spec` wants it, or raise InputError
    naming the expected spec. The one input check of batch jobs, the server and Ray."""
    shape = spec.shape
    if x.ndim == len(shape) and shape[0] == 1 and spec.image:
        x = x[:, None]  # (N, H, W) grayscale -> (N, 1, H, W)
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise InputError(f"{source}: {_shape_mismatch(spec, tuple(x.shape))}")
    want = np.dtype(spec.dtype)
    if want == np.uint8:
        if x.dtype != np.uint8:
            raise InputError(f"{source}: expected {describe_input(spec)}, got dtype {x.dtype}")
    else:
        if x.dtype.kind not in "fiu":
            raise InputError(f"{source}: expected {describe_input(spec)}, got dtype {x.dtype}")
        x = x.astype(want, copy=False)
        bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
        if bad.any():
            raise InputError(f"{source}: row {int(np.flatnonzero(bad)[0])} has NaN or "
                             "infinite values")
    return np.ascontiguousarray(x)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class Predictor:
    def __init__(self, path: str | Path, provider: str = "auto", threads: int = 0,
                 spin: bool = True):
        """Load `path`; `threads=0` lets onnxruntime use one thread per physical core.
        `spin=False` stops idle pool threads spinning between calls: for a server, whose
        worker waits on its request queue between small calls and must leave the cores to
        the processes that feed it."""
        from export.jobstate import sha256_file

        self.path = Path(path)
        require_file(self.path, "an ONNX model file")
        before = _stamp(self.path)
        self.sha256 = sha256_file(self.path)  # of the bytes loaded: checked unchanged below
        self._load(str(self.path), provider, threads, spin)
        if _stamp(self.path) != before:
            raise InputError(f"{self.path}: the model file changed while it was loaded; "
                             "load it again once it is written")

    @classmethod
    def from_bytes(cls, model: bytes, name: str, provider: str = "cpu",
                   threads: int = 0) -> Predictor:
        """A graph held in memory (the export gates it before any file exists); `name`
        stands for its path in messages."""
        self = cls.__new__(cls)
        self.path, self.sha256 = Path(name), hashlib.sha256(model).hexdigest()
        self._load(model, provider, threads, True)
        return self

    def _load(self, model: str | bytes, provider: str, threads: int, spin: bool) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(model, options,
                                                providers=_session_providers(provider))
        except InputError:
            raise
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise InputError(f"{self.path}: not a loadable ONNX model ({type(exc).__name__}"
                             f"{': ' + first[:200] if first else ''})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.card = parse_card(meta, str(self.path))
        check_graph(self.card, [(i.name, _ORT_TYPES.get(i.type, i.type), i.shape)
                                for i in self.session.get_inputs()],
                    {o.name: o.shape for o in self.session.get_outputs()}, str(self.path))
        self.spec = self.card.input
        self.class_names: tuple[str, ...] = self.card.class_names
        self.provider = self.session.get_providers()[0]
        if provider == "cuda" and self.provider != PROVIDERS["cuda"]:
            # onnxruntime falls back to the CPU when its CUDA provider cannot start (a missing
            # CUDA or cuDNN library, no GPU): asked for cuda, that is an error, not a slow job
            raise InputError(f"{self.path}: --provider cuda: onnxruntime could not start its "
                             "CUDA provider (its log above says why: the CUDA and cuDNN "
                             "libraries it was built for, a visible GPU); use --provider cpu or auto")

    def require(self, sha256: str) -> None:
        """Refuse to serve a job that started with another model at this path: a worker
        process loads the model after the driver hashed it, and the file may have been
        replaced in between."""
        if self.sha256 != sha256:
            raise InputError(f"{self.path}: the model file changed since the job started "
                             f"(SHA-256 {self.sha256[:12]}, the job's {sha256[:12]}); run "
                             f"the job again")

    def describe_input(self) -> str:
        return describe_input(self.spec)

    def check(self, x: np.ndarray, source: str = "input") -> np.ndarray:
        return check_input(self.spec, x, source)

    def _run(self, x: np.ndarray, timeout: float | None = None) -> list[np.ndarray]:
        """One onnxruntime call; with `timeout`, a timer terminates it after that many
        seconds (onnxruntime checks RunOptions.terminate between kernels)."""
        name, outputs = self.session.get_inputs()[0].name, list(self.card.outputs)
        options = ort.RunOptions()
        options.log_severity_level = 4  # failures become one InputError line, not a log
        timer = None
        try:
            # past TIMEOUT_MAX (~292 years; inf) the OS cannot wait: no timer, not an
            # OverflowError in the timer's thread. A daemon: a Ctrl-C landing while it
            # starts must not leave it to hold the process open until it fires (seen as a
            # 60 s hang on SIGTERM).
            if timeout and timeout < threading.TIMEOUT_MAX:
                timer = threading.Timer(timeout, setattr, (options, "terminate", True))
                timer.daemon = True
                timer.start()
            if self.provider != PROVIDERS["cuda"]:
                return self.session.run(outputs, {name: x}, options)
            # On CUDA, IOBinding copies the input to the device once and the outputs back
            # once, instead of onnxruntime staging them per run.
            binding = self.session.io_binding()
            binding.bind_cpu_input(name, x)
            for out in outputs:
                binding.bind_output(out)
            self.session.run_with_iobinding(binding, options)
            return binding.copy_outputs_to_cpu()
        except Exception:
            if options.terminate:
                raise TimeoutError from None
            raise
        finally:
            if timer is not None:
                timer.cancel()

    @property
    def regression(self) -> bool:
        return self.card.regression

    def predict(self, x: np.ndarray, batch_size: int = 256, source: str = "input",
                timeout: float | None = None) -> Prediction:
        """Run `x` through the graph in chunks of `batch_size` rows; a chunk taking longer
        than `timeout` seconds fails with one line naming its rows."""
        x = self.check(x, source)
        chunks = []
        for start in range(0, max(len(x), 1), batch_size):
            try:
                chunks.append(self._run(x[start:start + batch_size], timeout))
            except TimeoutError:
                raise InputError(f"{source}: rows {start}-{min(len(x), start + batch_size) - 1} "
                                 f"took longer than --timeout-per-batch {timeout:g} s; stopped") from None
            except Exception as exc:  # onnxruntime's own failure inside the graph
                raise InputError(f"{self.path}: the graph failed on {source} rows {start}-"
                                 f"{min(len(x), start + batch_size) - 1}: "
                                 f"{_graph_failure(exc)}") from None
        outputs = self.card.outputs
        out = {k: np.concatenate([c[i] for c in chunks]) for i, k in enumerate(outputs)}
        if self.regression:
            return Prediction(values=out["values"])
        return Prediction(out["probabilities"].argmax(axis=1), out["probabilities"],
                          out["logits"])


# A model whose batch takes longer than this on all threads is big enough to gain from them:
# the thread check is skipped (it would cost many such calls).
THREAD_CHECK_MAX_S = 0.05


def predictor_for_job(path: str | Path, provider: str = "auto", threads: int = 0,
                      batch_size: int = 256, server_threads: int = 0) -> tuple[Predictor, dict]:
    """The Predictor a batch job or an API server runs with, and how its thread count was
    chosen. `threads` 0 (auto), for a batch job: onnxruntime's default, one thread per
    physical core, unless a quick check on a batch of this model's input shape finds one
    thread clearly faster, as it can for a tiny model, whose calls are too short to repay
    waking the pool (scripts/bench_ray.py). `server_threads` N, for an API server: one
    thread unless the check finds N clearly faster, since the server's other cores are busy
    reading requests (and its pool threads do not spin between requests). The answer is
    remembered per machine, onnxruntime, model and batch: the check cost more than a small job."""
    from export.timing import CHECKS, CLEARLY_FASTER, cpu_model, medians, remembered, usable_cores

    serving, cores = server_threads > 0, usable_cores()
    if threads > 4 * cores:  # onnxruntime starts them all: 100,000 took 16 GB and hung
        raise InputError(f"--threads {threads}: at most {4 * cores} (4 per core of the {cores} "
                         f"this process may use)")
    pool = Predictor(path, provider, threads or server_threads, spin=not serving)
    if threads:
        return pool, {"threads": threads, "reason": "set by --threads"}
    many = server_threads or "auto"
    if pool.provider != PROVIDERS["cpu"] or cores < 2 or server_threads == 1:
        return pool, {"threads": many, "reason": f"{pool.provider} on {cores} core(s)"}
    spec, n = pool.spec, min(batch_size, 4096)  # enough rows to time a batch
    @functools.cache  # made once, by the check or for a remembered "single"
    def one_thread() -> Predictor:
        return Predictor(path, provider, 1, spin=not serving)

    def check() -> list:
        """["single" or "pool", why]"""
        rng = np.random.default_rng(0)
        x = (rng.integers(0, 256, (n, *spec.shape)) if spec.dtype == "uint8"
             else rng.normal(size=(n, *spec.shape))).astype(spec.dtype)
        try:  # stopped by onnxruntime if it runs over: a hung graph must not hang the check
            pool._run(x, timeout=THREAD_CHECK_MAX_S)
        except TimeoutError:
            return ["pool", "a batch takes long enough to use every core"]
        except Exception:  # noqa: BLE001 (the job's first batch says what is wrong with it)
            raise _Unchecked from None
        t = medians({"pool": lambda: pool._run(x), "single": lambda: one_thread()._run(x)})
        ratio = t["single"] / t["pool"]
        faster = ratio < CLEARLY_FASTER or (serving and 1 / ratio >= CLEARLY_FASTER)
        return ["single" if faster else "pool", f"a quick check on {n} rows ran 1 thread at "
                f"{ratio:.2f}x the time of {server_threads or 'one per core'}"]

    def decode(stored: list) -> tuple[str, str]:
        choice, reason = stored
        if choice not in ("single", "pool") or not isinstance(reason, str):
            raise ValueError("not a thread check")
        return choice, reason

    key = ["threads", cpu_model(), cores, ort.__version__, pool.sha256, pool.provider, n,
           spec.dtype, server_threads]
    try:
        (choice, reason), known = remembered(key, check, decode)
    except _Unchecked:
        return pool, {"threads": many, "reason": "the quick check could not run the model"}
    reason += f" (remembered from an earlier run: {CHECKS})" if known else ""
    if choice == "single":
        return one_thread(), {"threads": 1, "reason": reason}
    return pool, {"threads": many, "reason": reason}


class _Unchecked(Exception):
    """The thread check could not run the model: nothing to remember."""
