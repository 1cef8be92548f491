"""`trainer serve`'s metrics: prometheus_client counters and histograms in multiprocess
mode (one file per process), and the running drift report merged from the workers' counts."""

from __future__ import annotations

import json
from pathlib import Path

from export.card import Card

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_METRICS = None


def process_metrics() -> dict:
    """This process's metrics, created once (prometheus_client writes them to its own file
    in PROMETHEUS_MULTIPROC_DIR, so every API server and worker adds to the same totals)."""
    global _METRICS
    if _METRICS is None:
        from prometheus_client import Counter, Histogram

        _METRICS = {
            "requests": Counter("frozenfit_requests", "POST /predict requests by HTTP status",
                                ["status"], registry=None),
            "errors": Counter("frozenfit_request_errors", "refused or failed requests by "
                              "HTTP status", ["status"], registry=None),
            "instances": Counter("frozenfit_instances", "instances predicted", registry=None),
            "latency": Histogram("frozenfit_request_seconds", "POST /predict latency, queue "
                                 "included", buckets=LATENCY_BUCKETS, registry=None),
            "batch_requests": Histogram("frozenfit_batch_requests", "requests stacked into one "
                                        "onnxruntime call", buckets=BATCH_BUCKETS, registry=None),
            "batch_rows": Histogram("frozenfit_batch_rows", "rows in one onnxruntime call",
                                    buckets=BATCH_BUCKETS, registry=None),
            "inference": Histogram("frozenfit_inference_seconds", "one onnxruntime call",
                                   buckets=LATENCY_BUCKETS, registry=None),
        }
    return _METRICS



def metrics_text(card: Card, folder: Path) -> str:
    """Prometheus text: the counters of all processes, then the running drift report."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    from export.drift import DriftAccumulator

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    lines = [generate_latest(registry).decode()]
    drift = DriftAccumulator(card)
    for state_file in sorted(folder.glob("drift-*.json")):
        try:
            drift.merge(json.loads(state_file.read_text()))
        except (OSError, ValueError):  # a worker replacing its file right now: next scrape
            continue
    report = drift.report() if drift.counts["rows"] else {"status": "inconclusive", "rows": 0,
                                                          "checks": []}
    code = {"ok": 0, "warn": 1, "drift": 2, "inconclusive": 3}.get(report["status"], -1)
    lines += ["# HELP frozenfit_drift_rows rows seen by the drift tests since start",
              "# TYPE frozenfit_drift_rows gauge", f"frozenfit_drift_rows {report['rows']}",
              ("# HELP frozenfit_drift_status 0 ok, 1 warn, 2 drift, 3 inconclusive (too few rows "
               "so far), -1 no reference in the card"),
              "# TYPE frozenfit_drift_status gauge", f"frozenfit_drift_status {code}"]
    for name, key in (("psi", "psi"), ("p_adjusted", "p_adjusted")):
        lines += [(f"# HELP frozenfit_drift_{name} per check, inputs and predictions seen "
                   "so far vs the card's validation reference"),
                  f"# TYPE frozenfit_drift_{name} gauge"]
        lines += [f'frozenfit_drift_{name}{{check="{c["name"]}"}} {c[key]:.6g}'
                  for c in report["checks"]]
    return "\n".join(lines) + "\n"
