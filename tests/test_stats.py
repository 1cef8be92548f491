"""The training split's statistics (trainer/data/stats.py): images are summarised from
byte-value counts, which must give the numbers the general pass and numpy give."""

import numpy as np
import pytest

import trainer.data.dataset as dataset
from trainer.data import stats
from trainer.data.dataset import Split


@pytest.mark.parametrize("shape", [(400, 1, 28, 28), (250, 3, 17, 9)])
def test_image_statistics_from_byte_counts_equal_numpys_and_the_general_pass(shape, monkeypatch):
    monkeypatch.setattr(dataset, "CHUNK_BYTES", 20_000)  # many chunks
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    x[:, :, :3] = rng.integers(0, 40, (shape[0], shape[1], 3, shape[3]))  # skewed rows
    picked = np.sort(rng.choice(shape[0], shape[0] - 17, replace=False))
    split = Split(x, np.zeros(shape[0], np.int64), None).subset(picked)
    want = x[picked].astype(np.float64)
    for lo, hi in [(0, 255), (0, 1), (12, 200)]:
        mean, std, hist = stats._channel_moments(split, lo, hi)
        np.testing.assert_allclose(mean, want.mean(axis=(0, 2, 3)), rtol=1e-12)
        np.testing.assert_allclose(std, want.std(axis=(0, 2, 3)), rtol=1e-12)
        general = stats._float_moments(split, lo, hi)
        np.testing.assert_array_equal(hist, general[2])
        assert hist.sum(axis=1).tolist() == [want[:, 0].size] * shape[1]


def test_feature_statistics_take_the_general_pass():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, (5000, 4)).astype(np.float32)
    mean, std, hist = stats._channel_moments(Split(x, np.zeros(5000, np.int64), None), -5, 11)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(std, x.astype(np.float64).std(axis=0), rtol=1e-9)
    assert hist.sum(axis=1).tolist() == [5000] * 4
