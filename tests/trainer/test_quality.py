"""The prequential monitor: ring window, blocks per seq range, and figures of the unsampled stream."""

import numpy as np
import pytest

from trainer.model import auc
from trainer.quality import QualityMonitor, auc_standard_error, report


def sampled(rng, n, rate=0.1):
    """Calibrated scores, labels; negatives kept at ``rate`` with weight 1 / rate (as the joiner does)."""
    p = rng.beta(1, 3, n)
    y = (rng.random(n) < p).astype(np.float32)
    keep = (y > 0) | (rng.random(n) < rate)
    return p[keep], y[keep], np.where(y[keep] > 0, 1.0, 1.0 / rate)


def test_weights_give_the_unsampled_calibration_and_leave_auc_alone(rng):
    scores, labels, weights = sampled(rng, 200_000)
    seqs = np.zeros(len(labels), np.int64)
    weighted, unweighted = report(scores, labels, seqs, weights), report(scores, labels, seqs)
    assert weighted.calibration == pytest.approx(1.0, abs=0.03)
    assert unweighted.calibration < 0.6  # the sampled stream's positive rate is ~3x the real one
    assert weighted.auc == unweighted.auc


def test_the_window_keeps_the_newest_and_blocks_report_their_seq_range(rng):
    monitor = QualityMonitor(window=1000, block=250)
    closed = []
    for seq in range(1, 9):
        scores, labels, weights = sampled(rng, 400)
        n = len(labels)
        closed += monitor.add(scores, labels, np.full(n, seq), np.arange(n, dtype=np.uint64),
                              np.arange(n, dtype=np.uint64), weights)
    assert monitor.total == sum(b.examples for b in monitor.blocks) + monitor.total % 250
    scores, labels, seqs, *_ = monitor.arrays()
    assert len(labels) == 1000 and seqs[-1] == 8 and np.all(np.diff(seqs) >= 0)
    assert all(b.seq_lo <= b.seq_hi for b in monitor.blocks) and monitor.blocks[-1].seq_hi <= 8
    r = monitor.report()
    assert r.auc == auc(labels, scores) and r.examples == 1000
    monitor.clear()
    assert len(monitor.arrays()[0]) == 0


def test_the_auc_standard_error_shrinks_with_examples():
    assert auc_standard_error(0.7, 1000, 1000) < auc_standard_error(0.7, 100, 100) < auc_standard_error(0.7, 10, 10)
    assert np.isnan(auc_standard_error(0.7, 0, 10))
