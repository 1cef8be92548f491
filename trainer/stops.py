"""How a command stops when asked to: SIGTERM during a batch job behaves like Ctrl-C, and a
fit stopped by Ctrl-C says which checkpoint it kept and the command that resumes it."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator


class Preempted(BaseException):
    """SIGTERM arrived outside a Lightning loop (setup, after fit, the final test or the
    report): stop now; `--ckpt_path last` completes the run from its last checkpoint."""


CTRL_C = {"pressed": False}  # set by the first Ctrl-C of a fit


def _in_main_thread() -> bool:
    """Only the main thread may install signal handlers (Lightning's own skip them too)."""
    return threading.current_thread() is threading.main_thread()


def stop_fit_on_sigterm() -> None:
    """From here on SIGTERM never kills the process mid-write. While a Lightning loop runs,
    Lightning's own handler is installed and calls this one too: Lightning stops at the next
    batch (CheckpointOnSigterm saves). Anywhere else (setup, the export at fit's end, the
    report) this is the handler, and it raises Preempted, which the CLI reports in one line.
    The first Ctrl-C takes the same path (a KeyboardInterrupt mid-step would leave nothing
    to resume from); a second one aborts at once. A process started with SIGINT ignored (a
    script's background job) keeps ignoring it, as Python itself does."""
    if not _in_main_thread():
        return

    def handler(signum, frame):
        if signal.getsignal(signal.SIGTERM) is handler:
            raise Preempted()

    def ctrl_c(signum, frame):
        CTRL_C["pressed"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\ntrainer fit: Ctrl-C: stopping after this batch and saving last.ckpt "
              "(Ctrl-C again to abort without saving)", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job's stays so
        signal.signal(signal.SIGINT, ctrl_c)


@contextlib.contextmanager
def fit_signals() -> Iterator[None]:
    """One fit inside a caller's process (`api.fit`): the handlers `stop_fit_on_sigterm`
    installs last for that fit only; the caller's own come back after it, and an earlier
    fit's Ctrl-C is forgotten."""
    saved = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) \
        if _in_main_thread() else ()
    CTRL_C["pressed"] = False
    try:
        yield
    finally:
        if saved:
            signal.signal(signal.SIGTERM, saved[0])
            signal.signal(signal.SIGINT, saved[1])


def kept_checkpoint() -> str | None:
    """The checkpoint a fit stopped by Ctrl-C or SIGTERM saved, if any."""
    from trainer.callbacks import CheckpointOnSigterm

    return CheckpointOnSigterm.saved


class Stopped(BaseException):
    """SIGTERM during a batch job: stop like Ctrl-C (complete parts stay for --resume)."""


def stop_on_sigterm(*_) -> None:
    raise Stopped()


def ctrl_c_pressed() -> bool:
    return CTRL_C["pressed"]


def after_ctrl_c(argv: list[str]) -> int:
    """After a Ctrl-C stopped a fit: the checkpoint kept and the command that resumes it."""
    args = [a for i, a in enumerate(argv) if a != "--ckpt_path" and
            (i == 0 or argv[i - 1] != "--ckpt_path") and not a.startswith("--ckpt_path=")]
    kept = kept_checkpoint()
    print(f"trainer {argv[0]}: interrupted; "
          + (f"kept {kept}; resume with: trainer {shlex.join(args)} --ckpt_path last"
             if kept else "no checkpoint was saved"), file=sys.stderr)
    return 130


def report_stop(command: str, exc: BaseException) -> int:
    """One line for a command stopped by Ctrl-C or SIGTERM, and its exit status."""
    name = "SIGTERM" if isinstance(exc, Stopped) else "SIGINT"
    if command == "predict":
        print(f"trainer predict: stopped by {name}; the complete parts are kept: run the "
              f"same command with --resume to finish", file=sys.stderr)
    else:
        print(f"trainer {command}: interrupted", file=sys.stderr)
    return 143 if name == "SIGTERM" else 130
