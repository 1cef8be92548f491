"""`trainer serve`: the frozen model over HTTP on uvicorn, with no torch.

This process supervises; `--workers` API server processes, forked from it, each run
uvicorn (uvloop and httptools where installed) on the one listening socket with the `Gate`
app and their own `Predictor` (export/serve/app.py): a request is read, checked, batched
with its concurrent neighbours and predicted in the process that accepted it. LitServe ran
the model in separate worker processes behind multiprocessing queues, whose hops cost a lone
request more than its prediction (docs/benchmarks.md has the comparison).

Supervision: an API server that dies (SIGKILL, out of memory) is replaced at once (its
requests in flight get a closed connection, never a hang); when they keep dying (more than
MAX_DEATHS within DEATH_WINDOW_S) the server stops and exits 1. SIGHUP reads the model file
again, refuses one whose task, classes or input differ from the model served (one line,
the old model kept), starts new API servers on it and only then drains the old ones, so
requests in flight finish on the model they started with. With `--model models:/NAME@ALIAS
--poll-s S` the alias is checked every S seconds and a new holder is swapped in the same
way (its version in every reply); the swaps and failed loads are counted in /metrics.
SIGTERM/SIGINT: new requests get
503, the ones in flight finish (at most --drain-timeout-s), then the API servers stop and
the command exits 0.

The other pieces, one module each: export/serve/__init__.py.
"""

from __future__ import annotations

import collections
import json
import multiprocessing as mp
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path

from export.card import Card, jsonable
from export.errors import InputError
from export.serve.app import Gate
from export.serve.metrics import write_supervisor_counts
from export.serve.options import ServeOptions, auto_workers, key_warning

EXTRA = "pip install '.[serve]' from a checkout, or 'frozenfit[serve]' from a wheel"
MAX_DEATHS, DEATH_WINDOW_S = 5, 60.0
START_TIMEOUT_S = 120.0  # for an API server to load its model
LEAVE_S = 0.5  # between an API server's last accept and its shutdown


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"--host {host} --port {port}: cannot listen there "
                         f"({exc.strerror or exc})") from None
    sock.listen(2048)
    return sock


def _threads_per_worker(workers: int) -> int:
    from export.timing import usable_cores

    return max(1, usable_cores() // workers)


def _api_server(gate: Gate, sock: socket.socket, log_level: str, drain_s: float,
                events: tuple) -> None:
    """One API server process (forked): load the model, say `ready`, wait for `go`, then
    serve until SIGTERM; `closed` says it no longer accepts connections."""
    import contextlib

    import uvicorn

    from export.children import die_with_parent

    die_with_parent()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor's to handle
    gate.start()

    class Server(uvicorn.Server):
        """SIGTERM from the supervisor: stop accepting, give the connections this process
        has accepted LEAVE_S to have their requests read (uvicorn's own shutdown closes a
        connection whose request it has not read yet), then finish them and exit 0."""

        leaving = None

        @contextlib.contextmanager
        def capture_signals(self):
            signal.signal(signal.SIGTERM, lambda *_: setattr(
                self, "leaving", self.leaving or time.monotonic() + LEAVE_S))
            yield

        async def on_tick(self, counter: int) -> bool:
            if self.leaving is None:
                return await super().on_tick(counter)
            for listener in self.servers:  # the other API servers take new connections
                listener.close()
            closed.set()
            return time.monotonic() >= self.leaving

    server = Server(uvicorn.Config(gate, log_level=log_level, lifespan="off",
                                   access_log=False, timeout_graceful_shutdown=drain_s))
    # uvicorn's set of the requests it has begun (each a task, made as its headers are read,
    # the same set its --limit-concurrency counts): one alone in it cannot be batched with
    # another, so it runs without gathering
    gate.begun = getattr(getattr(server, "server_state", None), "tasks", None)
    ready, go, closed = events
    ready.set()
    go.wait()  # after a reload: once the old model's API servers no longer accept
    server.run(sockets=[sock])


def incompatible(served: Card, new: Card) -> str | None:
    """Why `new` cannot replace `served` under the same clients (None: it can)."""
    for field in ("task", "class_names", "input", "outputs"):
        if getattr(served, field) != getattr(new, field):
            return (f"its {field} differs from the model served "
                    f"({json.dumps(jsonable(getattr(new, field)))[:80]})")
    return None


class Supervisor:
    """Starts, watches, replaces and stops the API servers; see the module docstring."""

    def __init__(self, options: ServeOptions, gate: Gate, sock: socket.socket, shared: dict):
        self.options, self.gate, self.sock = options, gate, sock
        self.shared, self.ctx = shared, mp.get_context("fork")
        self.procs: list = []
        self.deaths: collections.deque = collections.deque()
        self.stop, self.reload = False, False
        self.next_poll = time.monotonic() + options.poll_s
        self.counts: dict[str, int] = {}  # model swaps and failed loads

    def _spawn(self, go: bool = True):
        proc_events = tuple(self.ctx.Event() for _ in range(3))  # ready, go, closed
        if go:
            proc_events[1].set()
        proc = self.ctx.Process(target=_api_server, daemon=True, args=(
            self.gate, self.sock, self.options.log_level, self.options.drain_timeout_s,
            proc_events))
        proc.start()
        proc.ready, proc.go, proc.closed = proc_events
        return proc

    def _started(self, procs: list) -> bool:
        """Wait until each of `procs` has its model loaded (False: one died first)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for proc in procs:
            while not proc.ready.wait(0.05):
                if proc.exitcode is not None or time.monotonic() > deadline:
                    return False
        return True

    def _signals(self) -> None:
        def stop(signum, frame):
            if not self.stop:
                self.stop, self.shared["draining"].value = True, 1
                print(f"serve: {signal.Signals(signum).name}: finishing "
                      f"{self.shared['inflight'].value} requests in flight, refusing new ones",
                      file=sys.stderr, flush=True)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "reload", True))

    def run(self) -> int:
        self._signals()
        self.procs = [self._spawn() for _ in range(self.options.workers)]
        if not self._started(self.procs):
            self._stop_all(self.procs, 5.0)
            print("serve: an API server failed to start (see above)", file=sys.stderr)
            return 1
        while not self.stop:
            wait([p.sentinel for p in self.procs], timeout=0.2)
            if self.reload:
                self.reload = False
                self._reload(self.gate.runner_args["model"], self.gate.model[1])
            if self.options.poll_s and time.monotonic() >= self.next_poll:
                self._poll()
            if not self.stop and not self._replace_dead():
                self._stop_all(self.procs, 5.0)
                return 1
        deadline = time.monotonic() + self.options.drain_timeout_s
        while self.shared["inflight"].value and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop_all(self.procs, self.options.drain_timeout_s)
        return 0

    def _replace_dead(self) -> bool:
        for i, proc in enumerate(self.procs):
            if proc.exitcode is None:
                continue
            now = time.monotonic()
            self.deaths.append(now)
            while self.deaths and self.deaths[0] < now - DEATH_WINDOW_S:
                self.deaths.popleft()
            how = (f"signal {signal.Signals(-proc.exitcode).name}" if proc.exitcode < 0
                   else f"exit code {proc.exitcode}")
            if len(self.deaths) > MAX_DEATHS:
                print(f"serve: API server {proc.pid} died ({how}); {len(self.deaths)} deaths "
                      f"in {DEATH_WINDOW_S:g} s: stopping", file=sys.stderr, flush=True)
                return False
            print(f"serve: API server {proc.pid} died ({how}); starting another",
                  file=sys.stderr, flush=True)
            self.procs[i] = self._spawn()
        return True

    def _poll(self) -> None:
        """--poll-s: has the alias moved? Then its new version, downloaded, is reloaded."""
        from export.model_uri import resolve_model_uri, served_version

        self.next_poll = time.monotonic() + self.options.poll_s
        uri, was = self.options.uri, self.gate.model[1]
        try:
            version = served_version(uri)
            if version == was:
                return
            path = resolve_model_uri(f"{uri.partition('@')[0]}/{version}")
        except InputError as exc:  # the store is unreachable, the version was deleted, ...
            self._count("model_load_failures")
            print(f"serve: --poll-s: {uri}: {exc}; still serving version {was}",
                  file=sys.stderr, flush=True)
            return
        self._reload(path, version, f"{uri} moved to version {version}")

    def _count(self, what: str) -> None:
        """The supervisor's own counters (export/serve/metrics.SUPERVISOR) for /metrics."""
        self.counts[what] = self.counts.get(what, 0) + 1
        write_supervisor_counts(Path(self.gate.metrics_dir), self.counts)

    def _reload(self, path: str, version: str, why: str = "SIGHUP") -> None:
        """`path` as `version` on new API servers; see the module docstring."""
        from export.runtime import Predictor, uses_cuda

        gate, served = self.gate, self.gate.model[2]
        try:
            new = Predictor(path, "cpu" if uses_cuda(self.options.provider) else  # as serve()
                            self.options.provider, gate.runner_args["threads"])
            problem = incompatible(gate.card, new.card)
        except InputError as exc:
            problem = str(exc)
        if problem or new.sha256 == served:
            if problem:
                self._count("model_load_failures")
            print(f"serve: {why}: {path}: " + (f"not loaded: {problem}" if problem else
                  "unchanged") + f"; still serving sha256 {served[:12]}", file=sys.stderr,
                  flush=True)
            return
        old_state = (gate.card, gate.card_json, gate.model, gate.runner_args)
        gate.card, gate.card_json = new.card, json.dumps(jsonable(new.card)).encode()
        gate.model = (gate.model[0], version, new.sha256)
        gate.runner_args = {**gate.runner_args, "model": path, "sha256": new.sha256,
                            "version": version}
        del new
        fresh = [self._spawn(go=False) for _ in self.procs]
        if not self._started(fresh):
            self._stop_all(fresh, 5.0)
            gate.card, gate.card_json, gate.model, gate.runner_args = old_state
            self._count("model_load_failures")
            print(f"serve: {why}: the new model's API servers failed to start; still serving "
                  f"sha256 {served[:12]}", file=sys.stderr, flush=True)
            return
        old, self.procs = self.procs, fresh
        self._hand_over(old, fresh)
        self._count("model_swaps")
        print(f"serve: {why}: now serving sha256 {gate.model[2][:12]} (was {served[:12]})",
              file=sys.stderr, flush=True)

    def _hand_over(self, old: list, fresh: list) -> None:
        """The new API servers accept only once the old ones no longer do (the connections
        meanwhile wait in the socket's backlog), so no client is answered by the new model
        and then by the old one; the old ones finish what they hold."""
        for proc in old:
            if proc.exitcode is None:
                proc.terminate()
        deadline = time.monotonic() + 2.0
        for proc in old:
            while (not proc.closed.wait(0.02) and proc.exitcode is None
                   and time.monotonic() < deadline):
                pass
        for proc in fresh:
            proc.go.set()
        self._stop_all(old, self.options.drain_timeout_s)

    @staticmethod
    def _stop_all(procs: list, timeout_s: float) -> None:
        for proc in procs:
            if proc.exitcode is None:
                proc.terminate()  # SIGTERM: uvicorn's graceful shutdown
        deadline = time.monotonic() + timeout_s + 5
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                proc.kill()
                proc.join()


def serve(model: str, options: ServeOptions, version: str = "1") -> int:
    """Serve `model` (a local file; `version`: its registry version) until SIGTERM/SIGINT;
    then refuse new requests, finish those in flight, exit 0."""
    from export.runtime import PROVIDERS, Predictor, predictor_for_job, uses_cuda

    # one-line errors before any process; the API servers' thread count. With CUDA this process
    # checks the model on the CPU: a CUDA context made here does not survive the fork, and the
    # servers could not start theirs (seen on an H200, scripts/gpu_check.sh)
    on_cuda = uses_cuda(options.provider)
    options.workers, how_many = auto_workers(on_cuda, options.workers)
    server_threads = _threads_per_worker(options.workers)
    if on_cuda:
        loaded = Predictor(model, "cpu", 1, spin=False)
        chosen = {"threads": server_threads, "reason": "CUDA in each API server"}
    else:
        loaded, chosen = predictor_for_job(model, options.provider, server_threads=server_threads,
                                           batch_size=options.max_batch_size)
    card, sha256 = loaded.card, loaded.sha256
    provider = PROVIDERS["cuda"] if on_cuda else loaded.provider
    threads = chosen["threads"]
    del loaded
    options.limits.check_model(card.input)
    metrics_dir = tempfile.mkdtemp(prefix="frozenfit-serve-")  # each process's counts
    try:
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as exc:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        raise InputError(f"serving needs the serve extra (missing module {exc.name}): "
                         f"{EXTRA}") from None
    try:
        sock = _listen(options.host, options.port)
    except InputError:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        raise
    if warning := key_warning(options.host, options.api_key):
        print(warning, file=sys.stderr, flush=True)
    shared = {"inflight": mp.Value("i", 0), "draining": mp.Value("i", 0)}
    name = options.name or Path(model).stem
    gate = Gate(card=card, card_json=json.dumps(jsonable(card)).encode(), limits=options.limits,
                shared=shared, metrics_dir=metrics_dir, max_batch_size=options.max_batch_size,
                batch_timeout=options.batch_timeout_ms / 1000, model=(name, version, sha256),
                runner_args={"model": str(model), "provider": options.provider,
                             "threads": threads, "sha256": sha256, "metrics_dir": metrics_dir,
                             "version": version}, key=options.api_key)
    batching = (f"batches of up to {options.max_batch_size} requests within "
                f"{options.batch_timeout_ms:g} ms" if options.max_batch_size > 1
                else "no batching")
    print(f"serving {model} (sha256 {sha256[:12]}) at http://{options.host}:{options.port}: "
          f"POST /predict and /v2/models/{name}/infer, GET /card /health /metrics /v2; "
          f"{options.workers} API server(s) ({how_many}) x {threads} thread(s) on {provider} "
          f"({chosen['reason']}), {batching}",
          flush=True)
    try:
        code = Supervisor(options, gate, sock, shared).run()
    finally:
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    print("serve: stopped", file=sys.stderr, flush=True)
    return code
