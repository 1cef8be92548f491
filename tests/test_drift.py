"""PSI checks: no flag for sampling noise alone, a flag for a real shift."""

from __future__ import annotations

import numpy as np

from export.drift import bin_counts, check, psi


def _freq(values):
    counts = bin_counts(values, 0.0, 1.0, 20)
    return counts / counts.sum()


def test_small_samples_of_one_distribution_are_not_flagged():
    rng = np.random.default_rng(0)
    flagged = 0
    for _ in range(100):
        reference, batch = rng.beta(20, 1, 269), rng.beta(20, 1, 269)
        flagged += check(_freq(reference), bin_counts(batch, 0, 1, 20), 269)["status"] != "ok"
    assert flagged <= 5  # the floor is about the 95th percentile of null PSI


def test_a_real_shift_is_flagged_and_large_batches_have_a_small_floor():
    rng = np.random.default_rng(1)
    reference = _freq(rng.beta(20, 1, 10000))
    shifted = check(reference, bin_counts(rng.beta(5, 1, 10000), 0, 1, 20), 10000)
    same = check(reference, bin_counts(rng.beta(20, 1, 10000), 0, 1, 20), 10000)
    assert shifted["status"] == "drift" and shifted["psi"] > 0.25
    assert same["status"] == "ok" and same["noise_floor"] < 0.01


def test_psi_is_zero_for_identical_and_values_outside_the_range_count():
    counts = np.array([5, 10, 85])
    assert psi(counts / counts.sum(), counts) < 1e-12
    assert bin_counts(np.array([-5.0, 0.5, 99.0]), 0.0, 1.0, 2).tolist() == [1, 2]
