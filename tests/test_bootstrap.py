"""The paired bootstrap interval of a loss improvement, checked against a hand computation."""

from __future__ import annotations

import pytest

from loraops.evaluate.bootstrap import paired_improvement_interval, resample_indices
from loraops.results import ExampleLosses

BASE = ExampleLosses(nll=[12.0, 9.0, 20.0, 4.0, 15.0], tokens=[4, 3, 8, 2, 5])
ADAPTER = ExampleLosses(nll=[8.0, 9.5, 14.0, 1.0, 16.0], tokens=[4, 3, 8, 2, 5])


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default quantile)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def test_interval_equals_a_hand_computation_over_the_same_resamples():
    interval = paired_improvement_interval(BASE, ADAPTER, confidence=0.9, resamples=200, seed=7)

    gains = []
    for draw in resample_indices(5, 200, 7).tolist():
        tokens = sum(BASE.tokens[i] for i in draw)
        gains.append(sum(BASE.nll[i] - ADAPTER.nll[i] for i in draw) / tokens)
    assert interval.low == pytest.approx(_percentile(gains, 0.05), abs=1e-12)
    assert interval.high == pytest.approx(_percentile(gains, 0.95), abs=1e-12)
    assert interval.estimate == pytest.approx((60.0 - 48.5) / 22)  # token-weighted, as the gate's loss
    assert interval.low < interval.estimate < interval.high
    assert interval.describe() == f"90% CI [{interval.low:.3f}, {interval.high:.3f}]"


def test_same_seed_same_interval_and_a_constant_gain_has_no_spread():
    again = paired_improvement_interval(BASE, ADAPTER, 0.9, 200, 7)
    assert again == paired_improvement_interval(BASE, ADAPTER, 0.9, 200, 7)
    shifted = ExampleLosses(nll=[n - 0.5 * t for n, t in zip(BASE.nll, BASE.tokens)], tokens=BASE.tokens)
    flat = paired_improvement_interval(BASE, shifted, 0.95, 300, 1)
    assert flat.low == pytest.approx(0.5) and flat.high == pytest.approx(0.5)


def test_refuses_unpaired_examples():
    other = ExampleLosses(nll=[1.0, 2.0], tokens=[1, 1])
    with pytest.raises(ValueError, match="same examples and target tokens"):
        paired_improvement_interval(BASE, other, 0.95, 100, 0)
