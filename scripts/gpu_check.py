"""One prepared GPU check: what only a CUDA machine can tell, in one run of a few minutes.

    scripts/gpu_check.sh OUT_DIR [--mnist DIR] [--budget-s 480] [--rehearse-on-cpu]

Checks, in order, each bounded in time (whatever is left of --budget-s):
  machine   GPU, compute capability, torch / onnxruntime versions and providers
  cuda      the `cuda` tests (tests/test_cuda.py)
  speedrun  `trainer fit` of configs/mnist_speedrun.yaml (real MNIST from --mnist; without
            it, digits) for 3 seeds on the GPU: test accuracy and the `time:` phases
  predict   `trainer predict` of that model with --provider cuda vs --provider cpu: the
            same labels, probabilities within 1e-4
  serve     `trainer serve --provider cuda` answers /predict like the CPU Predictor
  fp16      `trainer export --precision fp16` through its gate, predicted on the GPU
  streaming a fit with the data read from disk (a budget of 1e-6 GB) on the GPU
Writes OUT_DIR/gpu_check.md (the report: machine, versions, each figure, PASS/FAIL) and
OUT_DIR/gpu_check.json; exits 1 if a check failed. Without a CUDA GPU it says so in one line
and exits 0 (CI calls it). --rehearse-on-cpu runs every check on the CPU instead (short
fits, one seed), so the script itself is tested where no GPU is (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def _env(**extra: str) -> dict:
    """This checkout first on PYTHONPATH, keeping what was there (a GPU box's own packages,
    or wheels unpacked into a folder, reach the checks' subprocesses through it)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


class Run:
    """The checks' shared state: the output folder, the budget, the results."""

    def __init__(self, out: Path, budget: float, cpu: bool, mnist: Path | None):
        self.out, self.deadline, self.cpu, self.mnist = out, time.monotonic() + budget, cpu, mnist
        self.results: list[dict] = []
        self.accelerator, self.provider = ("cpu", "cpu") if cpu else ("gpu", "cuda")
        self.model: Path | None = None
        self.test_input: Path | None = None

    def left(self, cap: float) -> float:
        return max(1.0, min(cap, self.deadline - time.monotonic()))

    def trainer(self, *args: str, cap: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=self.out,
                              env=_env(PYTHONUNBUFFERED="1"), capture_output=True, text=True,
                              timeout=self.left(cap))

    def record(self, name: str, ok: bool | None, **figures) -> None:
        status = "PASS" if ok else "SKIP" if ok is None else "FAIL"
        self.results.append({"check": name, "status": status, **figures})
        print(f"gpu_check: {name}: {status} {json.dumps(figures)[:300]}", flush=True)


def _tail(proc: subprocess.CompletedProcess) -> str:
    """The last line a failed command printed (its one-line error), else its status."""
    text = (proc.stderr or proc.stdout or "").strip()
    return text.splitlines()[-1][:300] if text else f"exit {proc.returncode}"


def check_machine(run: Run) -> None:
    import onnxruntime as ort
    import torch

    from machine import describe

    gpu = {}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        gpu = {"gpu": torch.cuda.get_device_name(), "capability": f"{major}.{minor}",
               "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    providers = ort.get_available_providers()
    run.record("machine", run.cpu or "CUDAExecutionProvider" in providers,
               machine=describe(), torch=torch.__version__, cuda=torch.version.cuda,
               onnxruntime=ort.__version__, ort_providers=providers, **gpu)


def check_cuda_tests(run: Run) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_cuda.py")], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=run.left(240))
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    skipped_all = "passed" not in summary and "skipped" in summary
    run.record("cuda", None if run.cpu and skipped_all else proc.returncode == 0,
               summary=summary[:200])


def _phases(stderr: str) -> str | None:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("time: ")]
    return lines[-1][len("time: "):] if lines else None


def check_speedrun(run: Run) -> None:
    config = "mnist_speedrun.yaml" if run.mnist else "digits.yaml"
    data = ["--data.root", str(run.mnist)] if run.mnist else []
    epochs = ["--trainer.max_epochs", "1"] if run.cpu else []
    figures, ok = {"config": config, "seeds": []}, True
    for seed in (0,) if run.cpu else (0, 1, 2):  # a rehearsal checks the path, not spread
        proc = run.trainer("fit", "--config", str(ROOT / "configs" / config), *data, *epochs,
                           "--seed_everything", str(seed), "--trainer.accelerator",
                           run.accelerator, "--trainer.enable_progress_bar", "false",
                           "--trainer.logger.init_args.save_dir", "runs",
                           "--trainer.logger.init_args.name", f"seed{seed}")
        if proc.returncode:
            run.record("speedrun", False, seed=seed, error=_tail(proc))
            return
        folder = run.out / "runs" / f"seed{seed}" / "version_0"
        metrics = json.loads((folder / "metrics.json").read_text())
        test = metrics["test"] or {}
        figures["seeds"].append({"seed": seed, "test_acc": test.get("test/acc"),
                                 "precision": (metrics.get("hardware") or {}).get("precision"),
                                 "time": _phases(proc.stderr)})
        ok = ok and test.get("test/acc", 0) >= (0.98 if run.mnist and not run.cpu else 0.8)
        run.model = run.model or folder / "model.onnx"
    run.record("speedrun", ok, **figures)


def _test_input(run: Run) -> Path:
    if run.mnist:
        return run.mnist / "t10k-images-idx3-ubyte.gz" if \
            (run.mnist / "t10k-images-idx3-ubyte.gz").exists() else run.mnist / "t10k-images-idx3-ubyte"
    out = run.out / "digits_test.npz"
    proc = run.trainer("data", "--config", str(ROOT / "configs" / "digits.yaml"), "--split",
                       "test", "--out", str(out))
    if proc.returncode:
        raise RuntimeError(_tail(proc))
    return out


def _predictions(path: Path) -> tuple[list[str], np.ndarray]:
    """Labels and top-1 confidences of a `trainer predict` CSV."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["label"] for r in rows], np.array([float(r["confidence"]) for r in rows])


def check_predict(run: Run, model: Path, name: str, tolerance: float) -> None:
    outs = {}
    for provider in (run.provider, "cpu"):
        out = run.out / f"{name}-{provider}.csv"
        out.unlink(missing_ok=True)
        t0 = time.perf_counter()
        proc = run.trainer("predict", "--model", str(model), "--input", str(run.test_input),
                           "--output", str(out), "--provider", provider, "--top-k", "1",
                           "--no-progress", cap=120)
        if proc.returncode:
            run.record(name, False, provider=provider, error=_tail(proc))
            return
        outs[provider] = (*_predictions(out), time.perf_counter() - t0)
    (la, pa, ta), (lb, pb, tb) = outs[run.provider], outs["cpu"]
    agree = float(np.mean([a == b for a, b in zip(la, lb)])) if len(la) == len(lb) else 0.0
    diff = float(np.abs(pa - pb).max()) if pa.shape == pb.shape and pa.size else float("inf")
    run.record(name, agree >= 0.999 and diff <= tolerance, rows=len(la), label_agreement=agree,
               max_confidence_diff=diff,
               seconds={run.provider: round(ta, 2), "cpu": round(tb, 2)})


def check_fp32_predict(run: Run) -> None:
    check_predict(run, run.model, "predict", 1e-4)


def check_serve(run: Run) -> None:
    from bench_serve import start_serve, stop

    from export.readers import iter_chunks
    from export.runtime import Predictor

    cpu = Predictor(run.model, provider="cpu")
    x = next(iter_chunks(run.test_input, cpu.spec, cpu.class_names, rows=32)).x
    proc, port = start_serve(run.model, "--provider", run.provider, "--workers", "1")
    try:
        body = json.dumps({"instances": x.tolist()}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        stop(proc)
    want = cpu.predict(x)
    got = answer["predictions"]
    same = [p["label"] for p in got] == [cpu.class_names[i] for i in want.labels]
    diff = float(np.abs(np.array([p["confidence"] for p in got]) - want.confidence).max()) \
        if len(got) == len(x) else float("inf")
    run.record("serve", same and diff <= 1e-4, rows=len(x), max_confidence_diff=diff)


def check_fp16(run: Run) -> None:
    ckpt = next((run.model.parent / "checkpoints").glob("best-*.ckpt"))
    out = run.out / "model-fp16.onnx"
    out.unlink(missing_ok=True)
    proc = run.trainer("export", "--ckpt", str(ckpt), "--out", str(out), "--precision", "fp16")
    if proc.returncode:
        run.record("fp16", False, error=_tail(proc))
        return
    from export.card import read_card

    card = read_card(out)
    run.record("fp16 export", True, parity_max_abs_diff=card.parity.max_abs_diff,
               top1_agreement=card.parity.top1_agreement)
    check_predict(run, out, "fp16 predict", 5e-3)


def check_streaming(run: Run) -> None:
    proc = run.trainer("fit", "--config", str(ROOT / "configs" / "digits.yaml"),
                       "--trainer.max_epochs", "2", "--trainer.accelerator", run.accelerator,
                       "--data.memory_budget_gb", "1e-6", "--trainer.enable_progress_bar", "false",
                       "--trainer.logger.init_args.save_dir", "runs",
                       "--trainer.logger.init_args.name", "streaming")
    if proc.returncode:
        run.record("streaming", False, error=_tail(proc))
        return
    metrics = json.loads((run.out / "runs" / "streaming" / "version_0" / "metrics.json").read_text())
    acc = (metrics["test"] or {}).get("test/acc", 0)
    run.record("streaming", acc >= 0.8, test_acc=acc, time=_phases(proc.stderr))


def report(run: Run) -> Path:
    (run.out / "gpu_check.json").write_text(json.dumps(run.results, indent=2))
    lines = ["# GPU check", "", f"Command: `scripts/gpu_check.sh {run.out}`"
             + (" --rehearse-on-cpu" if run.cpu else ""), "", "| check | status | figures |",
             "| --- | --- | --- |"]
    for r in run.results:
        figures = {k: v for k, v in r.items() if k not in ("check", "status")}
        lines.append(f"| {r['check']} | {r['status']} | `{json.dumps(figures)}` |")
    path = run.out / "gpu_check.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--mnist", type=Path, default=None, help="real MNIST (IDX) for the speedrun")
    p.add_argument("--budget-s", type=float, default=480)
    p.add_argument("--rehearse-on-cpu", action="store_true")
    args = p.parse_args()
    if args.out.exists() and not args.out.is_dir():
        print(f"gpu_check: error: {args.out}: expected a folder for the report, this is a file",
              file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available() and not args.rehearse_on_cpu:
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to "
              "check", flush=True)
        return 0
    found = (d for d in (ROOT / "shared" / "data" / "mnist", ROOT.parent / "shared" / "data" / "mnist")
             if d.is_dir())
    mnist = args.mnist.resolve() if args.mnist else next(found, None)  # the checks run elsewhere
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out.resolve(), args.budget_s, args.rehearse_on_cpu,
              None if args.rehearse_on_cpu else mnist)
    checks = [check_machine, check_cuda_tests, check_speedrun]
    after_fit = [check_fp32_predict, check_serve, check_fp16, check_streaming]
    for check in checks + after_fit:
        if check in after_fit and run.model is None:
            run.record(check.__name__.removeprefix("check_"), None,
                       reason="no model: the speedrun failed")
            continue
        try:
            if check is after_fit[0]:
                run.test_input = _test_input(run)
            check(run)
        except subprocess.TimeoutExpired as exc:
            run.record(check.__name__.removeprefix("check_"), False,
                       error=f"over its time ({exc.timeout:.0f} s of the budget)")
        except Exception as exc:  # a check that breaks is a FAIL in the report, not the end
            run.record(check.__name__.removeprefix("check_"), False,
                       error=f"{type(exc).__name__}: {str(exc)[:300]}")
    path = report(run)
    failed = [r["check"] for r in run.results if r["status"] == "FAIL"]
    print(f"gpu_check: report in {path}; " + (f"FAILED: {', '.join(failed)}" if failed
                                              else "every check passed"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
