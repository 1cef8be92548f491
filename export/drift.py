"""Drift: is a batch of deployment rows drawn from the distribution the model was validated
on? numpy + scipy.special (its distribution functions: importing scipy.stats took
~1 s of a command's start), no torch.

Every check compares one per-row quantity of the batch with the same quantity measured on
the validation split when the model was exported (the card's `drift_reference`):
- continuous per-row summaries: per image channel, the mean and the standard deviation of
  its pixels; per table feature, its value; the top-1 confidence of a classifier or the
  predicted value of a regressor. Two-sample Kolmogorov-Smirnov test, counted on the
  reference's quantile bins (mergeable counts; binning can only lower the statistic, so
  the test stays conservative).
- the predicted classes: chi-square test of homogeneity against the classes predicted on
  the validation split, classes expected fewer than 5 times in the batch merged.
Rows are the samples, never pixels: neighbouring pixels are not independent draws, rows
are. The p-values of all checks are corrected together (Holm), so a batch from the
validated distribution gets a status other than `ok` with probability at most ALPHA.
Each check's effect size is its PSI over the reference deciles (classes for the class
check), read as usual: below 0.1 stable, 0.1-0.25 a shift worth a look, 0.25 and above a
large one. A check is `warn` when it is significant and its PSI is at least PSI_WARN,
`drift` when significant with PSI at least PSI_DRIFT: with enough rows a test finds
differences too small to matter (MNIST's test writers against its training writers read
PSI 0.005 at 10,000 rows, p < 0.01), and those must not page anyone. A check that is not
significant is `ok` only when the batch was large enough for a shift of PSI_WARN to have
been significant (at the strictest Holm level); on fewer rows it is `inconclusive`, with
the rows it would need: a test without power must not read as a clean bill of health.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from export.card import Card
from export.driftref import DriftBins, DriftReference, summary_names

ALPHA = 0.01  # family-wise false-alarm rate of one report
PSI_WARN, PSI_DRIFT = 0.1, 0.25  # effect sizes of a significant shift: warn, drift
QUANTILE_BINS = 128  # reference bins a continuous check counts into
EFFECT_BINS = 10  # PSI is read on reference deciles
EPS = 1e-4  # floor for empty bins, so PSI stays finite
# The KS distance of a shift of PSI_WARN: a normal shifted by sqrt(0.1) of its standard
# deviation (PSI = delta^2 there) moves the CDF by at most 2 * Phi(sqrt(0.1) / 2) - 1.
D_WARN = 0.126
STATUSES = ("ok", "inconclusive", "warn", "drift")  # from least to most alarming


def bin_index(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Bin of each value over [lo, hi] in `bins` equal bins; values outside land in the edge
    bins (deployment values beyond the training range are counted, not dropped)."""
    scaled = (np.asarray(values, dtype=np.float64) - lo) * (bins / (hi - lo))
    return np.clip(scaled, 0, bins - 1).astype(np.int64)


def bin_counts(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    return np.bincount(bin_index(values, lo, hi, bins).ravel(), minlength=bins)


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two histograms (counts or frequencies)."""
    e = np.maximum(np.asarray(expected, np.float64) / max(1e-12, np.sum(expected)), EPS)
    a = np.maximum(np.asarray(actual, np.float64) / max(1e-12, np.sum(actual)), EPS)
    e, a = e / e.sum(), a / a.sum()
    return float(((a - e) * np.log(a / e)).sum())


def _summaries(x, pred, image: bool, chunk: int = 4096) -> list[np.ndarray]:
    """The per-row values of every continuous check, (N,) each. `x` is an array or any
    sequence whose slices are arrays (rows read from a memory map), taken `chunk` rows at
    a time."""
    parts = []
    for start in range(0, max(1, len(x)), chunk):  # an empty x still gives its columns
        piece = np.asarray(x[start:start + chunk])
        if image:
            flat = piece.reshape(len(piece), piece.shape[1], -1).astype(np.float32)  # (n, C, HW)
            parts.append(np.concatenate([flat.mean(axis=2), flat.std(axis=2)], axis=1))
        else:
            parts.append(piece.astype(np.float64))
    cols = list(np.concatenate(parts).T)
    return cols + [pred.values if pred.values is not None else pred.confidence]


def reference(card: Card, x: np.ndarray, pred) -> dict:
    """The card's `drift_reference`: quantile bins and counts of every per-row summary on the
    validation rows `x` with the exported graph's predictions `pred`, and their classes."""
    columns = _summaries(x, pred, card.input.image)
    checks = []
    for name, values in zip(summary_names(card), columns):
        inner = np.quantile(values, np.linspace(0, 1, QUANTILE_BINS + 1)[1:-1])
        edges = np.unique(inner)  # ties (a constant feature, confidence 1.0) merge bins
        counts = np.bincount(np.searchsorted(edges, values, side="right"),
                             minlength=len(edges) + 1)
        checks.append(DriftBins(name=name, edges=tuple(edges.tolist()),
                                counts=tuple(counts.tolist())))
    classes = (None if pred.labels is None else
               tuple(np.bincount(pred.labels, minlength=len(card.class_names)).tolist()))
    ref = DriftReference(rows=int(len(x)), split="validation", continuous=tuple(checks),
                         classes=classes)
    # kept: reading the card needs no scipy.stats
    return dataclasses.replace(ref, rows_needed=tuple(_batch_rows_needed(ref)))


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error control, any dependence)."""
    order = np.argsort(p_values)
    adjusted, running = np.empty(len(p_values)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist()


def ks_check(ref_counts: np.ndarray, counts: np.ndarray) -> dict:
    """Two-sample KS on shared bins: statistic, p-value (asymptotic with Stephens'
    small-sample correction) and PSI over the reference deciles."""
    from scipy.special import kolmogorov  # the survival function of scipy.stats.kstwobign

    n, m = counts.sum(), ref_counts.sum()
    d = float(np.abs(np.cumsum(counts) / n - np.cumsum(ref_counts) / m).max())
    en = np.sqrt(n * m / (n + m))
    p = float(kolmogorov((en + 0.12 + 0.11 / en) * d))
    # Deciles of the reference: group the bins by where their middle falls in its CDF.
    mid = (np.cumsum(ref_counts) - ref_counts / 2) / m
    group = np.minimum((mid * EFFECT_BINS).astype(np.int64), EFFECT_BINS - 1)
    effect = psi(np.bincount(group, ref_counts, EFFECT_BINS), np.bincount(group, counts, EFFECT_BINS))
    return {"test": "ks", "statistic": d, "p": p, "psi": effect}


def chi2_check(ref_counts: np.ndarray, counts: np.ndarray) -> dict:
    """Chi-square test of homogeneity of two count vectors; categories the batch is expected
    to hold fewer than 5 times are merged into one."""
    from scipy.special import chdtrc  # the survival function of scipy.stats.chi2

    n, m = counts.sum(), ref_counts.sum()
    sparse = ref_counts * (n / m) < 5
    ref = np.append(ref_counts[~sparse], ref_counts[sparse].sum())
    got = np.append(counts[~sparse], counts[sparse].sum())
    keep = (ref + got) > 0
    ref, got = ref[keep], got[keep]
    if len(ref) < 2:  # one category left: nothing to compare
        return {"test": "chi2", "statistic": 0.0, "p": 1.0, "psi": psi(ref, got)}
    # Pearson's statistic of the 2 x k table, as scipy.stats.chi2_contingency(correction=False)
    table = np.stack([got, ref]).astype(np.float64)
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    return {"test": "chi2", "statistic": stat, "p": float(chdtrc(len(ref) - 1, stat)),
            "psi": psi(ref, got)}


def needed_effective_rows(test: str, checks: int, df: int = 1) -> float:
    """The effective size n*m/(n+m) of a batch of n rows against m reference rows at which
    a shift of PSI_WARN is significant at the strictest Holm level, ALPHA / checks. KS: the
    statistic sqrt(n*m/(n+m)) * D reaches its critical value at D = D_WARN; chi-square: for
    small shifts PSI is the chi-square divergence, and the statistic is n*m/(n+m) times it."""
    from scipy.special import chdtri, kolmogi  # scipy.stats' chi2.isf and kstwobign.isf

    level = ALPHA / checks
    if test == "ks":
        return float(kolmogi(level) / D_WARN) ** 2
    return float(chdtri(max(df, 1), level)) / PSI_WARN


def rows_needed(effective: float, reference_rows: int) -> int | None:
    """Batch rows n with n*m/(n+m) >= `effective`; None when the reference (m) is too small
    for any batch to get there."""
    if reference_rows <= effective:
        return None
    return int(np.ceil(effective * reference_rows / (reference_rows - effective)))


def _status(p_adjusted: float, effect: float, rows: int, needed: int | None) -> str:
    if p_adjusted < ALPHA and effect >= PSI_WARN:
        return "drift" if effect >= PSI_DRIFT else "warn"
    return "ok" if needed is not None and rows >= needed else "inconclusive"


def _needed(ref: DriftReference, check: dict, checks: int) -> int | None:
    df = int(np.count_nonzero(ref.classes or [])) - 1
    return rows_needed(needed_effective_rows(check["test"], checks, df), ref.rows)


def _batch_rows_needed(ref: DriftReference) -> list[int | None]:
    """Batch rows each kind of test needs to tell a PSI_WARN shift at the strictest level."""
    has_classes = ref.classes is not None
    checks = len(ref.continuous) + has_classes
    return [_needed(ref, {"test": t}, checks) for t in ("ks", "chi2")[:1 + has_classes]]


def small_reference(card: Card) -> str | None:
    """Why the card's drift reference is too small to judge a batch of its own size, or
    None."""
    ref = card.drift_reference
    if not ref:
        return None
    worst = ref.rows_needed or _batch_rows_needed(ref)  # cards before it was kept
    if all(n is not None and n <= ref.rows for n in worst):
        return None
    return (f"too few for its tests to tell a shift of PSI {PSI_WARN:g} from chance on a "
            f"batch of its size; reports will read inconclusive (validate on more rows)")


class DriftAccumulator:
    """Counts a job's rows into the reference's bins chunk by chunk. The counts are the
    whole state: `state()` is JSON-ready and `merge()` adds another accumulator's (a
    resumed job's parts, Ray workers, server windows)."""

    def __init__(self, card: Card):
        self.card, self.ref = card, card.drift_reference
        self.image = card.input.image
        self.counts = {"rows": 0}
        if self.ref:
            self.counts["continuous"] = [np.zeros(len(c.counts), np.int64)
                                         for c in self.ref.continuous]
            if self.ref.classes is not None:
                self.counts["classes"] = np.zeros(len(self.ref.classes), np.int64)

    def update(self, x: np.ndarray, pred) -> None:
        self.counts["rows"] += len(x)
        if not self.ref or not len(x):
            return
        for i, values in enumerate(_summaries(x, pred, self.image)):
            edges = self.ref.continuous[i].edges
            self.counts["continuous"][i] += np.bincount(
                np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
        if "classes" in self.counts:
            self.counts["classes"] += np.bincount(pred.labels, minlength=len(self.ref.classes))

    def state(self) -> dict:
        return {"rows": self.counts["rows"],
                "continuous": [c.tolist() for c in self.counts.get("continuous", [])],
                "classes": self.counts["classes"].tolist() if "classes" in self.counts else None}

    def merge(self, state: dict) -> None:
        self.counts["rows"] += state["rows"]
        for mine, theirs in zip(self.counts.get("continuous", []), state["continuous"]):
            mine += np.asarray(theirs, np.int64)
        if "classes" in self.counts:
            self.counts["classes"] += np.asarray(state["classes"], np.int64)

    def report(self) -> dict:
        if not self.ref:
            return {"status": "unavailable", "rows": self.counts["rows"], "checks": [],
                    "reason": "the model card has no drift reference; re-export the model "
                              "with this version to get drift tests"}
        checks = [{"name": ref.name, **ks_check(np.asarray(ref.counts), counts)}
                  for ref, counts in zip(self.ref.continuous, self.counts["continuous"])]
        if "classes" in self.counts:
            checks.append({"name": "predicted classes",
                           **chi2_check(np.asarray(self.ref.classes), self.counts["classes"])})
        rows = self.counts["rows"]
        for check, adjusted in zip(checks, holm([c["p"] for c in checks])):
            check["p_adjusted"] = adjusted
            check["rows_needed"] = _needed(self.ref, check, len(checks))
            check["status"] = _status(adjusted, check["psi"], rows, check["rows_needed"])
        status = max((c["status"] for c in checks), key=STATUSES.index, default="inconclusive")
        needed = [c["rows_needed"] for c in checks if c["status"] == "inconclusive"]
        return {"status": status, "rows": rows, "reference_rows": self.ref.rows,
                "rows_needed": None if None in needed else max(needed, default=None),
                "alpha": ALPHA, "psi_warn": PSI_WARN, "psi_drift": PSI_DRIFT,
                "correction": "holm", "checks": checks}


def reaches(status: str, level: str) -> bool:
    """Whether a report's status is at least `level` (warn or drift)."""
    return STATUSES.index(status) >= STATUSES.index(level) and status != "inconclusive"


def format_report(report: dict, limit: int = 12) -> str:
    """A short table: the checks with the smallest corrected p-values first."""
    if report["status"] == "unavailable":
        return f"drift: UNAVAILABLE ({report['reason']})"
    lines = [f"drift: {report['status'].upper()} ({report['rows']} rows vs "
             f"{report['reference_rows']} validation rows; family-wise false-alarm rate "
             f"{ALPHA:g}, Holm; a significant check warns at PSI >= {PSI_WARN:g}, "
             f"drifts at >= {PSI_DRIFT:g})"]
    if report["status"] == "inconclusive":
        needed = report.get("rows_needed")
        lines.append(f"  too few rows to tell: a shift of PSI {PSI_WARN:g} needs "
                     + (f"~{needed:,} rows to be seen" if needed else
                        "a larger drift reference (re-export on more validation rows)"))
    ranked = sorted(report["checks"], key=lambda c: (c["p_adjusted"], -c["psi"]))
    w = max([24] + [len(c["name"]) for c in ranked[:limit]])
    lines.append(f"  {'check':{w}} {'test':>4} {'stat':>8} {'p (Holm)':>9} {'PSI':>7}  status")
    for c in ranked[:limit]:
        lines.append(f"  {c['name']:{w}} {c['test']:>4} {c['statistic']:8.4f} "
                     f"{c['p_adjusted']:9.2g} {c['psi']:7.4f}  {c['status']}")
    if len(ranked) > limit:
        lines.append(f"  ... {len(ranked) - limit} more checks, all with larger p-values")
    return "\n".join(lines)
