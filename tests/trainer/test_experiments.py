"""The paper's two experiments, in their --quick form, and calibration."""

import numpy as np
import pytest

from server.features import shipped_schema
from trainer.calibration import expected_calibration_error, run_calibration
from trainer.experiments import _hashed, run_collisions, run_sync_interval, write_outputs

SCHEMA = shipped_schema()


def test_hashing_collides_as_asked_and_keeps_padding(rng):
    fids = rng.integers(1, 2**62, 10_000, dtype=np.uint64)
    fids[::7] = 0
    hashed = _hashed(fids, buckets=100, salt=3)
    assert np.all(hashed[fids == 0] == 0)
    assert set(np.unique(hashed[fids != 0]).tolist()) <= set(range(1, 101))
    assert len(np.unique(hashed[fids != 0])) == 100
    np.testing.assert_array_equal(hashed, _hashed(fids, buckets=100, salt=3))


def test_collisions_quick(tmp_path):
    result = run_collisions(SCHEMA, seeds=1, quick=True)
    assert [r["variant"] for r in result["rows"]] == ["collisionless", "hashed-8x", "hashed-1/2", "hashed-1/4",
                                                      "hashed-1/8"]
    for row in result["rows"]:
        assert 0.45 < row["auc_mean"] < 1.0 and row["seeds"] == 1
    write_outputs(result, tmp_path)
    assert (tmp_path / "collisions.json").exists() and (tmp_path / "collisions.png").stat().st_size > 1000


def test_sync_interval_quick():
    result = run_sync_interval(SCHEMA, seeds=1, quick=True)
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["batch-only", "online-syncs-1", "online-syncs-10", "online-syncs-50", "trainer-live"]
    assert {r["batch_size"] for r in rows.values()} == {100}  # one batch size for every variant
    # One sync at the very end serves the batch model throughout: identical scores.
    assert rows["online-syncs-1"]["auc_mean"] == rows["batch-only"]["auc_mean"]
    assert rows["online-syncs-50"]["auc_mean"] != rows["batch-only"]["auc_mean"]


def test_ece_is_the_binned_gap(rng):
    scores = rng.random(1000)
    labels = (rng.random(1000) < 0.3).astype(float)
    gap = 0.0
    for b in range(10):
        inside = (scores >= b / 10) & (scores < (b + 1) / 10)
        if inside.any():
            gap += inside.mean() * abs(scores[inside].mean() - labels[inside].mean())
    assert expected_calibration_error(labels, scores) == pytest.approx(gap)


def test_served_scores_are_calibrated_at_every_negative_rate():
    """Synthetic stream of known per-item click rates, negatives kept at 1.0,
    0.5 and 0.1: the held-out served scores average the observed rate and
    match it bin by bin (a correction on the negatives alone gives ~2.7x at 0.1)."""
    result = run_calibration(SCHEMA, quick=True, datasets=("synthetic",))
    assert [r["negative_rate"] for r in result["rows"]] == [1.0, 0.5, 0.1]
    for row in result["rows"]:
        assert {"negative_rate", "mean_pred", "observed_rate", "ratio", "ece"} <= row.keys()
        assert 0.9 <= row["ratio"] <= 1.1, row
        assert row["ece"] <= 0.02, row
