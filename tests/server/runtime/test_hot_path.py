"""The ranker's request checks: the numba fast path agrees with the numpy rule it copies."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from server.features import PAD_FID, shipped_schema, slot_of
from server.runtime.ranker import EMPTY_KEY, _first_bad_fid

SCHEMA = shipped_schema()


def reference_first_bad(fids, columns):
    bad = (fids == EMPTY_KEY) | ((fids != PAD_FID) & (slot_of(fids) != columns))
    flat = np.flatnonzero(bad.reshape(-1))
    return int(flat[0]) if flat.size else -1


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 50), faults=st.integers(0, 3))
def test_first_bad_fid_matches_the_numpy_rule(seed, n, faults):
    rng = np.random.default_rng(seed)
    columns = SCHEMA.item_column_slots
    signatures = rng.integers(0, 1 << 48, (n, columns.shape[0]), dtype=np.uint64)
    fids = (columns.astype(np.uint64) << np.uint64(48)) | signatures
    fids[rng.random(fids.shape) < 0.3] = PAD_FID
    for _ in range(faults):
        r, c = rng.integers(0, n), rng.integers(0, columns.shape[0])
        fids[r, c] = EMPTY_KEY if rng.random() < 0.5 else (np.uint64(rng.integers(1, 60)) << np.uint64(48)) | np.uint64(7)
    assert _first_bad_fid(fids, columns) == reference_first_bad(fids, columns)
