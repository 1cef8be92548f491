"""Shared fixtures: one real digits run (fit -> model.onnx) for the whole session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"


# precision and channels_last `auto` are chosen by timing, which two processes can read
# differently; tests that compare independent runs bit for bit fix both (a resumed run keeps
# its checkpoint's choice by itself).
REPRODUCIBLE = ("--trainer.precision", "32-true", "--model.channels_last", "false")


@pytest.fixture(scope="session", autouse=True)
def _ctrl_c_reaches_the_commands():
    """A suite started as a background job of a script (`.ci/run &`) inherits SIGINT
    ignored, and so would every command it starts, which keep it so, as a background job
    should: the Ctrl-C tests send SIGINT to their commands as a terminal does to its
    foreground job, so the commands start with it as a terminal's would."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # SIG_DFL in a child
    yield


@pytest.fixture(scope="session", autouse=True)
def _private_data_cache(tmp_path_factory):
    """Decoded-row caches of the whole session (in-process and CLI runs) go to a temporary
    folder, never the user's ~/.cache."""
    old = os.environ.get("FROZENFIT_CACHE")
    os.environ["FROZENFIT_CACHE"] = str(tmp_path_factory.mktemp("frozenfit-cache"))
    yield
    if old is None:
        os.environ.pop("FROZENFIT_CACHE", None)
    else:
        os.environ["FROZENFIT_CACHE"] = old


def cli_in_process(argv: list[str], cwd: Path, capfd) -> tuple[int, str]:
    """`trainer ARGV` in this process (no interpreter start-up: for errors that come before
    any training), with the working directory and signal handlers restored after."""
    import signal

    from trainer.cli import main

    old, handlers = os.getcwd(), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    os.chdir(cwd)
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    finally:
        os.chdir(old)
        for s, h in handlers.items():
            signal.signal(s, h)
    return rc, capfd.readouterr().err


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m trainer ARGS` in a fresh interpreter, as a user would."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd or ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def poisoned_env(tmp_path: Path, names=("torch", "lightning")) -> dict:
    """An environment in which importing any of `names` fails loudly (proves the deploy
    side never imports them), as a missing package would."""
    for name in names:
        pkg = tmp_path / "poison" / name
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text(
            f"raise ModuleNotFoundError('{name} imported on the deploy path', name='{name}')\n")
    return {"PYTHONPATH": f"{tmp_path / 'poison'}:{ROOT}"}


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str,
                          after_run_log: bool = False) -> str:
    """Non-zero exit, a single line on stderr naming the problem, no traceback.
    `after_run_log`: the error ends a run that had started logging (Lightning's banner),
    so it must be the last line rather than the only one."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 or after_run_log, err
    assert ": error: " in lines[-1], err
    for needle in needles:
        assert needle in lines[-1], err
    return lines[-1]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """`trainer fit` on digits for a few epochs; returns the run folder."""
    work = tmp_path_factory.mktemp("digits_run")
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "digits.yaml"),
                   "--trainer.max_epochs", "6", "--trainer.enable_progress_bar", "false",
                   "--trainer.logger.init_args.save_dir", str(work / "runs"), cwd=work)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # 22 batches an epoch: the logging interval follows the epoch, without Lightning's warning
    assert "smaller than the logging interval" not in proc.stderr
    (work / "fit.stderr").write_text(proc.stderr)
    runs = sorted((work / "runs" / "digits").glob("version_*"))
    assert len(runs) == 1
    return runs[0]


@pytest.fixture(scope="session")
def digits_test_npz(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits_data") / "test.npz"
    proc = run_cli("data", "--config", str(ROOT / "configs" / "digits.yaml"),
                   "--split", "test", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def pytest_collection_modifyitems(config, items):
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on a GPU machine: ./scripts/test.sh -m cuda)")
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip)


requires_mnist = pytest.mark.skipif(
    not (MNIST / "train-images-idx3-ubyte.gz").exists(),
    reason=f"real MNIST not found at {MNIST} (it ships beside the project checkout only)")
