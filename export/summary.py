"""What a finished `trainer predict` job did, one typed record for both engines.

`JobSummary.to_json()` is `summary.json` (flat: the label metrics sit beside the other
fields, as the file has always had them); the drift table and the unit's totals are for the
command's report and the Ray engine's manifests, and are not written. Pure Python (no torch).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from export.atomic import atomic_path


@dataclass(frozen=True, kw_only=True)
class JobSummary:
    rows: int
    output: str
    format: str
    provider: str
    model: str
    model_sha256: str
    dataset_fingerprint: str
    seconds: float
    rows_per_second: float
    skipped: list[str]
    drift_status: str
    options: dict
    metrics: dict = field(default_factory=dict)  # accuracy or mae/rmse, coverage, set size
    engine: str = "local"
    # the local engine's
    threads: dict | None = None
    resumed_after_rows: int | None = None
    peak_memory_mb: float | None = None
    # the Ray engine's
    workers: int | None = None
    units: int | None = None
    units_resumed: int | None = None
    ray_startup_seconds: float | None = None
    # for the caller, not written: the drift report as a table, the totals a unit merges
    drift_table: str = field(default="", compare=False, repr=False)
    totals: dict | None = field(default=None, compare=False, repr=False)

    LOCAL = ("threads", "resumed_after_rows", "peak_memory_mb")
    RAY = ("workers", "units", "units_resumed", "ray_startup_seconds")

    def to_json(self) -> dict:
        """summary.json: every field of this engine (None written as null), the metrics."""
        skip = {"metrics", "drift_table", "totals",
                *(self.RAY if self.engine == "local" else self.LOCAL)}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in skip}
        return {**out, **self.metrics}


def write_reports(summary_path: Path, drift_path: Path, summary: JobSummary,
                  report: dict) -> None:
    """A job's summary and drift report, each written atomically."""
    for path, doc in ((summary_path, summary.to_json()), (drift_path, report)):
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(doc, indent=2))
