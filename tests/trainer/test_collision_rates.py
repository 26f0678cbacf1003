"""collision_rates against a dict-counting reference; per-slot hashing keeps slots apart."""

from collections import Counter

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from server.features import random_fids, shipped_schema, slot_of
from trainer.experiments import _hashed, _hashed_by_slot, _slot_buckets, collision_rates


@given(st.integers(1, 400), st.integers(1, 600), st.integers(0, 2**32))
def test_collision_rate_is_the_share_of_fids_sharing_a_row(n, buckets, seed):
    rng = np.random.default_rng(seed)
    distinct = np.unique(np.concatenate([random_fids(1, rng, n), random_fids(10, rng, n // 2 + 1),
                                         random_fids(11, rng, n // 3 + 1)]))
    rows = _hashed(distinct, buckets, seed % 7)
    per_row = Counter(rows.tolist())
    shared = [per_row[r] > 1 for r in rows.tolist()]
    got = collision_rates(distinct, rows, shipped_schema())  # user_id: slot 1, item_id: slot 10
    assert got["collision_rate"] == round(sum(shared) / len(shared), 4)
    for name, slot in (("user_id", 1), ("item_id", 10)):
        mine = [s for s, f in zip(shared, distinct.tolist()) if f >> 48 == slot]
        assert got[f"collision_rate_{name}"] == round(sum(mine) / len(mine), 4)


def test_no_hashing_no_collisions(rng):
    distinct = np.unique(random_fids(1, rng, 1000))
    assert collision_rates(distinct, distinct, shipped_schema()) == {"collision_rate": 0.0, "collision_rate_user_id": 0.0,
                                                   "collision_rate_item_id": 0.0}


@given(st.integers(1, 300), st.sampled_from([1 / 8, 1 / 2, 8.0]), st.integers(0, 2**32))
def test_per_slot_hashing_keeps_slots_and_padding_and_fills_each_slots_buckets(n, scale, seed):
    rng = np.random.default_rng(seed)
    fids = np.concatenate([random_fids(1, rng, n), random_fids(10, rng, 3 * n), np.zeros(5, np.uint64)])
    distinct = np.unique(fids[fids != 0])
    buckets = _slot_buckets(distinct, scale)
    hashed = _hashed_by_slot(fids, buckets, seed % 5)
    assert np.all(hashed[fids == 0] == 0)
    np.testing.assert_array_equal(slot_of(hashed[fids != 0]), slot_of(fids[fids != 0]))
    for slot in (1, 10):
        mine = hashed[slot_of(hashed) == slot] & np.uint64(2**48 - 1)
        assert buckets[slot] == max(1, int((slot_of(distinct) == slot).sum() * scale))
        assert 1 <= mine.min() and mine.max() <= buckets[slot]
    np.testing.assert_array_equal(hashed, _hashed_by_slot(fids, buckets, seed % 5))
