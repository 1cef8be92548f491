"""The settings of `trainer serve`, checked when they are made: each refusal is one line
naming the flag and what this machine allows."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from export.card import InputSpec
from export.errors import InputError
from export.model_uri import registered_name, registry_alias


@dataclass
class Limits:
    max_body_bytes: int = 16 << 20
    max_instances: int = 1024
    max_queue: int = 512  # requests in flight across API servers; more get 503

    def __post_init__(self):  # messages name the command's flags
        from export.timing import available_memory

        for flag, value in (("--max-instances", self.max_instances),
                            ("--max-queue", self.max_queue)):
            if value < 1:
                raise InputError(f"{flag} must be >= 1")
        if not 0 < self.max_body_bytes < float("inf"):  # NaN too
            raise InputError("--max-body-mb must be a finite number > 0")
        self.max_body_bytes = int(self.max_body_bytes)  # from --max-body-mb, a float
        held, avail = self.max_queue * self.max_body_bytes, available_memory()
        if avail is not None and held > avail // 2:
            raise InputError(f"--max-queue {self.max_queue} x --max-body-mb "
                             f"{self.max_body_bytes / 2**20:g}: up to {held / 2**30:.1f} GiB of "
                             f"request bodies could be held; at most "
                             f"{avail / 2 / 2**30:.1f} GiB (half of the memory available)")

    def check_model(self, spec: InputSpec) -> None:
        """Every request in flight decoded at once must fit in half the available memory."""
        from export.timing import available_memory

        decoded, avail = self.max_queue * self.max_instances * spec.row_bytes, available_memory()
        if avail is not None and decoded > avail // 2:
            raise InputError(f"--max-queue {self.max_queue} x --max-instances "
                             f"{self.max_instances}: up to {decoded / 2**30:.1f} GiB of this "
                             f"model's decoded inputs could be held; at most "
                             f"{avail / 2 / 2**30:.1f} GiB (half of the memory available)")


NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"  # a model's name on the routes: one URL path segment


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int | None = None  # None: auto_workers()
    max_batch_size: int = 64
    batch_timeout_ms: float = 5.0
    provider: str = "auto"
    limits: Limits = None
    drain_timeout_s: float = 30.0
    log_level: str = "warning"
    name: str | None = None  # the model's name on the inference protocol (default: see below)
    api_key: str | None = field(default=None, repr=False)  # never printed
    uri: str | None = None  # --model as given (a path, or an MLflow URI)
    poll_s: float = 0.0  # how often a models:/NAME@ALIAS is checked for a new holder; 0: never

    def __post_init__(self):  # messages name the command's flags
        from export.timing import usable_cores

        self.limits = self.limits or Limits()
        if self.name is not None and not re.fullmatch(NAME, self.name):
            raise InputError(f"--name {self.name!r}: expected letters, digits, '.', '_' and "
                             f"'-' (a URL path segment)")
        registered = registered_name(self.uri or "")
        if self.name is None and registered and re.fullmatch(NAME, registered):
            self.name = registered  # as the registry names it, not its artifact's file stem
        workers = 1 if self.workers is None else self.workers  # None: chosen by serve()
        for flag, value in (("--workers", workers),
                            ("--max-batch-size", self.max_batch_size)):
            if value < 1:
                raise InputError(f"{flag} must be >= 1")
        if not 1024 <= self.port <= 65535:
            raise InputError(f"--port {self.port}: expected 1024 to 65535")
        if not 0 <= self.batch_timeout_ms < float("inf"):  # NaN too: a batch never closed
            raise InputError("--batch-timeout-ms must be a finite number >= 0")
        if not 0 <= self.poll_s < float("inf") or (
                self.poll_s and registry_alias(self.uri or "") is None):
            raise InputError(f"--poll-s {self.poll_s:g}: expected a finite number of seconds "
                             f">= 0, with --model models:/NAME@ALIAS (a model file reloads on "
                             f"SIGHUP)")
        # A batch gathers requests in flight, of which there are at most max_queue.
        self.max_batch_size = min(self.max_batch_size, self.limits.max_queue)
        cores = usable_cores()
        if workers > 4 * cores:
            raise InputError(f"--workers {self.workers}: at most {4 * cores} (4 per core of the "
                             f"{cores} this process may use); each holds a session")


CORES_PER_SERVER = 8  # the default: one API server per 8 cores (auto_workers)


def auto_workers(on_cuda: bool, asked: int | None = None) -> tuple[int, str]:
    """How many API servers (`asked`, or the default), and why. One server's event loop
    is one core's work: a small model's requests are bound by it (on a 16-core Xeon, one
    server answered 5,814 req/s at concurrency 64, two 11,435; docs/benchmarks.md), and
    onnxruntime's threads get the rest of each server's share. One per CUDA device: each
    server opens its own CUDA context and copy of the model."""
    from export.timing import usable_cores

    if asked is not None:
        return asked, "--workers"
    if on_cuda:
        return 1, "one API server on CUDA"
    cores = usable_cores()
    return (max(1, cores // CORES_PER_SERVER),
            f"one API server per {CORES_PER_SERVER} of the {cores} usable cores")


API_KEY_ENV = "FROZENFIT_API_KEY"
MAX_KEY_BYTES = 4096


def read_api_key(path: str | None) -> str | None:
    """The key from `--api-key-file` (its first line), else from FROZENFIT_API_KEY; None
    when neither is given. A key file that is empty, huge or not a file is one line."""
    import os

    from export.errors import require_file

    if path is None:
        key = os.environ.get(API_KEY_ENV, "").strip()
        return key or None
    require_file(path, "an API key file", "--api-key-file")
    file = Path(path)
    if file.stat().st_size > MAX_KEY_BYTES:
        raise InputError(f"{path}: {file.stat().st_size:,} bytes; an API key file holds one "
                         f"key (at most {MAX_KEY_BYTES} bytes)")
    lines = file.read_bytes().decode("utf-8", "replace").splitlines()
    key = lines[0].strip() if lines else ""
    if len(key) < 16:
        raise InputError(f"{path}: expected a key of at least 16 characters on its first line")
    return key


def key_warning(host: str, key: str | None) -> str | None:
    """One line when the server listens beyond this machine without a key."""
    if key is None and host not in ("127.0.0.1", "::1", "localhost"):
        return (f"serve: WARNING: listening on {host} without an API key: anyone who can "
                f"reach this port can use the model (--api-key-file FILE or {API_KEY_ENV})")
    return None
