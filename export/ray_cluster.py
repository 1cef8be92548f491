"""`trainer predict --engine ray`'s cluster: import Ray (or say in one line which extra to
install), join a cluster or start a local instance, and size the job's workers."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from export.errors import InputError

if TYPE_CHECKING:
    from export.ray_engine import RayOptions

EXTRA = "pip install '.[ray]' from a checkout, or 'frozenfit[ray]' from a wheel"


def import_ray():
    try:
        import ray
        import ray.data  # the data extra of ray
    except ModuleNotFoundError as exc:
        raise InputError(f"--engine ray needs the ray extra (missing module {exc.name}): "
                         f"{EXTRA}") from None
    return ray


def start_ray(ray, options: RayOptions) -> float | None:
    """Join the cluster or start a local instance; return the seconds it took (None: this
    process was connected already)."""
    import logging

    started = time.perf_counter()
    kwargs = {"include_dashboard": False, "logging_level": logging.ERROR,
              "configure_logging": True, "log_to_driver": False}
    if ray.is_initialized():  # a caller (a benchmark, a notebook) already connected
        return None
    if options.address:
        check_reachable(options.address)
    try:
        if options.address:
            ray.init(address=options.address, **kwargs)
        else:
            ray.init(num_cpus=os.cpu_count(), **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"--address {options.address}: cannot join the Ray cluster ({first})") \
            from None
    # A unit's InputError is reported by run_ray in one line; Ray Data would log it first,
    # with its per-dataset INFO lines. Any other error still ends the job with its traceback.
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    return time.perf_counter() - started


def check_reachable(address: str, seconds: float = 5.0) -> None:
    """Refuse a host:port (or ray://host:port) that nothing answers at, in one line: Ray
    itself retries such an address for minutes before it gives up."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return  # "auto" and the like: Ray's own lookup answers quickly
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(f"--address {address}: nothing answers at {host}:{port} ({reason}); "
                         "start the cluster's head with `ray start --head` or check the "
                         "address") from None


def join_cluster(ray, options: RayOptions) -> tuple[float | None, int]:
    """Start or join Ray; (seconds it took or None, workers the job runs)."""
    startup = start_ray(ray, options)
    resources = ray.cluster_resources()
    gpus = options.gpus_per_worker
    if gpus and resources.get("GPU", 0) < gpus:
        raise InputError(f"--gpus-per-worker {gpus:g}: the Ray cluster has "
                         f"{resources.get('GPU', 0):g} GPUs; join one with GPUs "
                         "(--address) or leave the flag out to run on CPUs")
    workers = options.workers or max(1, int(resources.get("GPU", 0) // gpus) if gpus
                                     else int(resources.get("CPU", 1)))
    return startup, workers
