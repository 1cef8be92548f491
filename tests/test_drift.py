"""The drift statistics (export/drift.py): calibrated under the null, powerful under a shift,
Holm across checks, and mergeable counts. Real-data rates: scripts/bench_drift.py."""

from __future__ import annotations

import numpy as np
import pytest

from export.card import Card
from export.drift import (ALPHA, PSI_DRIFT, PSI_WARN, DriftAccumulator, format_report, holm, psi,
                          reference, small_reference, summary_names)
from export.runtime import Prediction

CARD = Card.from_json({
    "task": "classification", "class_names": ["a", "b", "c"], "outputs": ["logits", "probabilities"],
    "input": {"name": "features", "kind": "tabular", "dtype": "float32", "shape": [2],
              "columns": ["u", "v"], "value_range": [-10, 10]},
    "dataset": {"name": "synthetic", "fingerprint": "0" * 64}})


def _rows(rng, n, shift=0.0, classes=(0.5, 0.3, 0.2)):
    x = np.stack([rng.normal(shift, 1, n), rng.exponential(1, n)], 1).astype(np.float32)
    probs = rng.dirichlet((8, 1, 1), n).astype(np.float32)
    labels = rng.choice(3, n, p=classes)
    return x, Prediction(labels, probs)


def _report(ref_card, x, pred):
    acc = DriftAccumulator(ref_card)
    acc.update(x, pred)
    return acc.report()


@pytest.fixture(scope="module")
def card():
    rng = np.random.default_rng(0)
    return CARD.replace(drift_reference=reference(CARD, *_rows(rng, 3000)))


def test_reference_names_and_bins(card):
    ref = card.drift_reference
    assert summary_names(CARD) == ["feature u", "feature v", "confidence"]
    assert [c.name for c in ref.continuous] == summary_names(CARD)
    for check in ref.continuous:
        assert sum(check.counts) == 3000 and len(check.counts) == len(check.edges) + 1
    assert sum(ref.classes) == 3000
    assert small_reference(card) is None


@pytest.mark.parametrize("size", [30, 300, 3000])
def test_false_alarm_rate_is_at_most_alpha_under_the_null(card, size):
    rng = np.random.default_rng(size)
    alarms = sum(_report(card, *_rows(rng, size))["status"] in ("warn", "drift")
                 for _ in range(300))
    # 300 draws at a true rate of ALPHA (0.01) exceed 9 alarms with probability < 0.1%.
    assert alarms <= 9, alarms


def test_too_few_rows_read_inconclusive_never_ok(card):
    """30 rows cannot show a shift of PSI 0.1 at the Holm level: not ok, with the rows that
    would be needed; the same rows far off the reference are still caught."""
    rng = np.random.default_rng(3)
    small = _report(card, *_rows(rng, 30))
    assert small["status"] == "inconclusive"
    assert {c["status"] for c in small["checks"]} == {"inconclusive"}
    assert 150 < small["rows_needed"] < 400, small["rows_needed"]
    assert "~" in format_report(small) and "rows to be seen" in format_report(small)
    enough = _report(card, *_rows(rng, small["rows_needed"]))
    assert enough["status"] == "ok"
    for shift in (1.0, 3.0):  # shifted: never ok
        assert _report(card, *_rows(rng, 12, shift=shift))["status"] != "ok"
    assert _report(card, *_rows(rng, 12, shift=3.0))["status"] == "drift"


def test_a_tiny_reference_says_so_and_never_reads_ok():
    rng = np.random.default_rng(4)
    tiny = CARD.replace(drift_reference=reference(CARD, *_rows(rng, 32)))
    assert "too few" in small_reference(tiny)
    report = _report(tiny, *_rows(rng, 5000))
    assert report["status"] == "inconclusive" and report["rows_needed"] is None
    assert "larger drift reference" in format_report(report)


def test_a_shift_is_drift_with_its_check_named(card):
    rng = np.random.default_rng(7)
    report = _report(card, *_rows(rng, 500, shift=1.0))
    assert report["status"] == "drift"
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["feature u"]["status"] == "drift" and by_name["feature u"]["psi"] > PSI_DRIFT
    assert by_name["feature v"]["status"] == "ok"
    prior = _report(card, *_rows(rng, 500, classes=(0.2, 0.3, 0.5)))
    assert {c["name"]: c["status"] for c in prior["checks"]}["predicted classes"] == "drift"


@pytest.mark.parametrize("shift,expected", [(0.05, "ok"), (0.45, "warn")])
def test_effect_size_decides_between_ok_warn_and_drift(card, shift, expected):
    """Significant either way at 20,000 rows: a negligible shift (PSI < 0.1) stays ok, a
    moderate one (0.1 <= PSI < 0.25) warns."""
    rng = np.random.default_rng(8)
    report = _report(card, *_rows(rng, 20000, shift=shift))
    u = {c["name"]: c for c in report["checks"]}["feature u"]
    assert u["p_adjusted"] < ALPHA and u["status"] == expected, u
    assert (u["psi"] < PSI_WARN) if expected == "ok" else (PSI_WARN <= u["psi"] < PSI_DRIFT)


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]


def test_counts_merge_to_the_same_report(card):
    rng = np.random.default_rng(9)
    x, pred = _rows(rng, 1000, shift=0.3)
    whole = _report(card, x, pred)
    a, b = DriftAccumulator(card), DriftAccumulator(card)
    a.update(x[:400], Prediction(pred.labels[:400], pred.probabilities[:400]))
    b.update(x[400:], Prediction(pred.labels[400:], pred.probabilities[400:]))
    a.merge(b.state())
    assert a.report() == whole


def test_a_card_without_reference_says_so():
    report = DriftAccumulator(CARD).report()
    assert report["status"] == "unavailable" and "re-export" in report["reason"]


def test_psi_is_zero_for_identical_histograms():
    counts = np.array([5, 10, 85])
    assert psi(counts, counts) < 1e-12 and psi(counts, counts[::-1]) > 1


def test_the_tests_give_scipy_stats_own_statistics_and_p_values():
    """The checks call scipy.special's distribution functions (scipy.stats costs ~1 s to
    import); statistic, p-value and the rows needed equal scipy.stats' own."""
    from scipy.stats import chi2, chi2_contingency, kstwobign

    from export.drift import D_WARN, chi2_check, ks_check, needed_effective_rows

    rng = np.random.default_rng(3)
    for _ in range(50):
        k = int(rng.integers(2, 12))
        ref, got = rng.integers(5, 400, k), rng.integers(0, 60, k)
        ours = chi2_check(ref, got)
        sparse = ref * (got.sum() / ref.sum()) < 5
        table = np.stack([np.append(got[~sparse], got[sparse].sum()),
                          np.append(ref[~sparse], ref[sparse].sum())])
        table = table[:, table.sum(axis=0) > 0]
        if table.shape[1] >= 2:
            stat, p, _, _ = chi2_contingency(table, correction=False)
            assert ours["statistic"] == pytest.approx(stat, rel=1e-12)
            assert ours["p"] == pytest.approx(p, rel=1e-9, abs=1e-300)
        a, b = rng.integers(0, 50, k), rng.integers(1, 50, k)
        d = np.abs(np.cumsum(a) / a.sum() - np.cumsum(b) / b.sum()).max() if a.sum() else None
        if d is not None:
            en = np.sqrt(a.sum() * b.sum() / (a.sum() + b.sum()))
            want = kstwobign.sf((en + 0.12 + 0.11 / en) * d)
            assert ks_check(b, a)["p"] == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert needed_effective_rows("ks", 4) == pytest.approx((kstwobign.isf(ALPHA / 4) / D_WARN) ** 2)
    assert needed_effective_rows("chi2", 4, 9) == pytest.approx(chi2.isf(ALPHA / 4, 9) / PSI_WARN)
