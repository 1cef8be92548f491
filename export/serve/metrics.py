"""`trainer serve`'s metrics: each process counts in memory (`Tally`) and writes its counts,
with its drift counts, to one JSON file in the server's metrics folder every few hundred
milliseconds; a scrape of /metrics merges the files of every process, the dead ones' too, and
renders them with prometheus_client's metric families (`metrics_text`).

prometheus_client's own multiprocess mode writes a memory-mapped file on every update: ten
writes per request cost a small model's server more CPU than its inference, so the counts
are batched here and /metrics may be one flush old."""

from __future__ import annotations

import bisect
import itertools
import json
import threading
from pathlib import Path

from export.card import Card
from export.records import load_json

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# name: (help, buckets)
HISTOGRAMS = {
    "request_seconds": ("POST /predict latency, queue included", LATENCY_BUCKETS),
    "batch_requests": ("requests stacked into one onnxruntime call", BATCH_BUCKETS),
    "batch_rows": ("rows in one onnxruntime call", BATCH_BUCKETS),
    "inference_seconds": ("one onnxruntime call", LATENCY_BUCKETS),
}
# the supervisor's counters: name: help
SUPERVISOR = {"model_swaps": "models swapped in without a restart (SIGHUP, --poll-s)",
              "model_load_failures": "models not swapped in: refused, unreadable or failed "
                                     "to start"}


class Tally:
    """One API server's request and batch counts since it started."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}  # HTTP status: requests
        self.instances = 0
        self.histograms = {name: ([0] * (len(buckets) + 1), [0.0])
                           for name, (_, buckets) in HISTOGRAMS.items()}
        self.changed = False

    def _observe(self, name: str, value: float) -> None:
        counts, total = self.histograms[name]
        counts[bisect.bisect_left(HISTOGRAMS[name][1], value)] += 1  # le: upper bound included
        total[0] += value

    def request(self, status: int, seconds: float, instances: int) -> None:
        with self.lock:
            key = str(status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.instances += instances
            self._observe("request_seconds", seconds)
            self.changed = True

    def batch(self, requests: int, rows: int, seconds: float) -> None:
        with self.lock:
            self._observe("batch_requests", requests)
            self._observe("batch_rows", rows)
            self._observe("inference_seconds", seconds)
            self.changed = True

    def state(self) -> dict:
        """The counts as JSON (`changed` says whether they moved since the last call)."""
        with self.lock:
            self.changed = False
            return {"requests": dict(self.requests), "instances": self.instances,
                    "histograms": {k: [list(c), t[0]] for k, (c, t) in self.histograms.items()}}


def write_supervisor_counts(folder: Path, counts: dict) -> None:
    from export.atomic import atomic_path

    with atomic_path(folder / "supervisor.json") as tmp:
        tmp.write_text(json.dumps(counts))


def _read(path: Path) -> dict | None:
    try:
        doc = load_json(path.read_text())
    except (OSError, ValueError):  # a process replacing its file right now: next scrape
        return None
    return doc if isinstance(doc, dict) else None


def _families(docs: list[dict], supervisor: dict) -> list:
    """The counters and histograms of every API server (`docs`) and the supervisor, summed."""
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    requests: dict[str, int] = {}
    instances = 0
    histograms = {name: ([0] * (len(buckets) + 1), 0.0) for name, (_, buckets) in HISTOGRAMS.items()}
    for doc in docs:
        tally = doc.get("tally") or {}
        for status, n in tally.get("requests", {}).items():
            requests[status] = requests.get(status, 0) + n
        instances += tally.get("instances", 0)
        for name, (counts, total) in tally.get("histograms", {}).items():
            mine = histograms[name]
            histograms[name] = ([a + b for a, b in zip(mine[0], counts)], mine[1] + total)
    made = CounterMetricFamily("frozenfit_requests", "POST /predict requests by HTTP status",
                               labels=["status"])
    errors = CounterMetricFamily("frozenfit_request_errors", "refused or failed requests by "
                                 "HTTP status", labels=["status"])
    for status, n in sorted(requests.items()):
        made.add_metric([status], n)
        if int(status) >= 400:
            errors.add_metric([status], n)
    families = [made, errors, CounterMetricFamily("frozenfit_instances", "instances predicted",
                                                  value=instances)]
    for name, (doc, buckets) in HISTOGRAMS.items():
        counts, total = histograms[name]
        cumulative = list(itertools.accumulate(counts))
        bounds = [repr(float(b)) for b in buckets] + ["+Inf"]
        families.append(HistogramMetricFamily(f"frozenfit_{name}", doc, sum_value=total,
                                              buckets=list(zip(bounds, cumulative))))
    families += [CounterMetricFamily(f"frozenfit_{name}", doc, value=supervisor.get(name, 0))
                 for name, doc in SUPERVISOR.items()]
    return families


def metrics_text(card: Card, folder: Path) -> str:
    """Prometheus text: the counters of all processes, then the running drift report."""
    from prometheus_client import CollectorRegistry, generate_latest

    from export.drift import DriftAccumulator

    docs = list(filter(None, map(_read, sorted(folder.glob("api-*.json")))))
    families = _families(docs, _read(folder / "supervisor.json") or {})

    class Collector:
        def collect(self):
            return families

    registry = CollectorRegistry()
    registry.register(Collector())
    lines = [generate_latest(registry).decode()]
    drift = DriftAccumulator(card)
    for doc in docs:
        if doc.get("drift"):
            drift.merge(doc["drift"])
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
