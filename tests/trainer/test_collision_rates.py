"""collision_rates against a dict-counting reference on random FIDs and buckets."""

from collections import Counter

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from server.features import random_fids
from trainer.experiments import _hashed, collision_rates


@given(st.integers(1, 400), st.integers(1, 600), st.integers(0, 2**32))
def test_collision_rate_is_the_share_of_fids_sharing_a_row(n, buckets, seed):
    rng = np.random.default_rng(seed)
    distinct = np.unique(np.concatenate([random_fids(1, rng, n), random_fids(10, rng, n // 2 + 1),
                                         random_fids(11, rng, n // 3 + 1)]))
    rows = _hashed(distinct, buckets, seed % 7)
    per_row = Counter(rows.tolist())
    shared = [per_row[r] > 1 for r in rows.tolist()]
    got = collision_rates(distinct, rows)
    assert got["collision_rate"] == round(sum(shared) / len(shared), 4)
    for name, slot in (("user_id", 1), ("item_id", 10)):
        mine = [s for s, f in zip(shared, distinct.tolist()) if f >> 48 == slot]
        assert got[f"collision_rate_{name}"] == round(sum(mine) / len(mine), 4)


def test_no_hashing_no_collisions(rng):
    distinct = np.unique(random_fids(1, rng, 1000))
    assert collision_rates(distinct, distinct) == {"collision_rate": 0.0, "collision_rate_user_id": 0.0,
                                                   "collision_rate_item_id": 0.0}
