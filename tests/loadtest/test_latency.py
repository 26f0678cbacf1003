"""Load-test machinery: percentile math, the open-loop schedule, and short real runs."""


import numpy as np
import pytest

from loadtest.histogram import LatencyHistogram
from loadtest.latency import arrival_schedule
from server.features import shipped_schema

SCHEMA = shipped_schema()


def test_hdr_percentiles_match_a_known_distribution(rng):
    samples = rng.exponential(2.0, 200_000)  # ms
    h = LatencyHistogram()
    for s in samples:
        h.record_ms(s)
    assert h.count == len(samples)
    for q in (50, 90, 99, 99.9):
        exact = np.percentile(samples, q)
        assert h.percentile_ms(q) == pytest.approx(exact, rel=0.01, abs=0.002)
    # and the analytic quantiles of Exp(mean 2): -2 ln(1 - q)
    assert h.percentile_ms(99) == pytest.approx(-2 * np.log(0.01), rel=0.03)


def test_open_loop_schedule_keeps_the_rate(rng):
    constant = arrival_schedule(100.0, 10.0, "constant", rng)
    np.testing.assert_allclose(np.diff(constant), 0.01)
    assert len(constant) == 1000
    poisson = arrival_schedule(200.0, 50.0, "poisson", rng)
    assert abs(len(poisson) - 10_000) < 5 * np.sqrt(10_000)
    gaps = np.diff(poisson)
    assert gaps.mean() == pytest.approx(1 / 200, rel=0.05)
    assert gaps.std() == pytest.approx(1 / 200, rel=0.1)  # exponential: std == mean
    assert poisson.max() < 50.0 and np.all(gaps >= 0)
