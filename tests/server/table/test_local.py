"""EmbeddingTable against a dict model, plus admission, expiry and edge cases."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.features import SIGNATURE_BITS
from server.table import cuckoo
from server.table import EMPTY_KEY, EmbeddingTable

DIM = 3
# Few distinct keys so that operations collide; a few huge ones for the high bits.
KEYS = st.one_of(st.integers(0, 60), st.sampled_from([2**63 - 1, 2**64 - 2, 2**40 + 7, 1 << 62]))


def row_for(key: int, version: int) -> np.ndarray:
    return np.array([key % 1000, version, -version], dtype=np.float32)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("upsert"), st.lists(KEYS, max_size=12), st.integers(0, 100)),
        st.tuples(st.just("delete"), st.lists(KEYS, max_size=6), st.just(0)),
        st.tuples(st.just("lookup"), st.lists(KEYS, max_size=12), st.just(0)),
        st.tuples(st.just("evict"), st.just([]), st.integers(0, 60)),
    ),
    max_size=40,
)


@given(ops=OPS)
def test_matches_dict_model_across_growth(ops):
    table = EmbeddingTable(DIM, capacity=8, sketch_width=64)
    model: dict[int, tuple[np.ndarray, float]] = {}
    clock = 0.0
    for op, keys, arg in ops:
        fids = np.array(keys, dtype=np.uint64)
        if op == "upsert":
            clock += 1.0
            rows = np.stack([row_for(k, arg) for k in keys]) if keys else np.empty((0, DIM), np.float32)
            written = table.upsert(fids, rows, now=clock)
            assert written.all()
            for k, r in zip(keys, rows):
                model[k] = (r, clock)
        elif op == "delete":
            deleted = table.delete(fids)
            # Later duplicates of a key in one call find it already gone.
            expected = []
            for k in keys:
                expected.append(k in model)
                model.pop(k, None)
            assert deleted.tolist() == expected
        elif op == "lookup":
            rows, found = table.lookup_found(fids)
            for k, r, f in zip(keys, rows, found):
                assert f == (k in model)
                np.testing.assert_array_equal(r, model[k][0] if k in model else np.zeros(DIM, np.float32))
            assert table.contains(fids).tolist() == [k in model for k in keys]
        else:
            ttl = float(arg) / 10
            evicted = set(table.evict_expired(ttl_s=ttl).tolist())
            newest = clock if clock > 0 else -np.inf  # newest update ever made, even if since deleted
            expected = {k for k, (_, stamp) in model.items() if stamp < newest - ttl}
            assert evicted == expected
            for k in expected:
                del model[k]
        assert len(table) == len(model)
    exported = {}
    for fids, rows, stamps in table.items(chunk_rows=5):
        for k, r, s in zip(fids.tolist(), rows, stamps):
            assert k not in exported
            exported[k] = (r, s)
    assert set(exported) == set(model)
    for k, (r, s) in model.items():
        np.testing.assert_array_equal(exported[k][0], r)
        assert exported[k][1] == s


@given(key=st.integers(0, 2**64 - 2), log2_buckets=st.integers(1, 20))
def test_alt_bucket_is_an_involution(key, log2_buckets):
    mask = np.uint64((1 << log2_buckets) - 1)
    key = np.uint64(key)
    b0, b1 = cuckoo._buckets(key, mask)
    assert b0 != b1
    assert cuckoo._alt_bucket(key, b0, mask) == b1
    assert cuckoo._alt_bucket(key, b1, mask) == b0


@given(counts=st.lists(st.integers(0, 2**63), min_size=1, max_size=200))
def test_sketch_never_undercounts(counts):
    sketch = np.zeros((3, 16), dtype=np.uint16)  # tiny: many collisions
    fids = np.array(counts, dtype=np.uint64)
    out = np.empty(len(fids), dtype=np.uint16)
    cuckoo.sketch_count(sketch, fids, out)
    seen = {}
    for k in counts:
        seen[k] = seen.get(k, 0) + 1
    estimate = np.empty(len(fids), dtype=np.uint16)
    cuckoo.sketch_estimate(sketch, fids, estimate)
    for k, e in zip(counts, estimate):
        assert e >= seen[k]


def test_large_table_survives_many_growths(rng):
    fids = np.unique(rng.integers(0, 2**63, 200_000, dtype=np.int64)).view(np.uint64)
    rows = rng.standard_normal((len(fids), 4), dtype=np.float32)
    table = EmbeddingTable(4, capacity=16)
    for start in range(0, len(fids), 10_000):
        table.upsert(fids[start : start + 10_000], rows[start : start + 10_000], now=1.0)
    assert len(table) == len(fids)
    assert table.growths >= 10
    assert table.first_growth_load_factor is not None
    out, found = table.lookup_found(fids)
    assert found.all()
    np.testing.assert_array_equal(out, rows)
    assert table.load_factor <= table.max_load_factor


def test_admission_waits_for_min_count():
    table = EmbeddingTable(2)
    fid = np.array([42], dtype=np.uint64)
    row = np.ones((1, 2), dtype=np.float32)
    assert not table.upsert(fid, row, now=1.0, min_count=3)[0]
    assert not table.upsert(fid, row, now=2.0, min_count=3)[0]
    assert len(table) == 0 and not table.contains(fid)[0]
    assert table.frequency(fid)[0] == 2
    assert table.upsert(fid, row * 5, now=3.0, min_count=3)[0]
    np.testing.assert_array_equal(table.lookup(fid), row * 5)
    # Present FIDs are always updated, whatever the threshold.
    assert table.upsert(fid, row * 7, now=4.0, min_count=100)[0]
    np.testing.assert_array_equal(table.lookup(fid), row * 7)


def test_expiry_uses_newest_update_or_given_clock():
    table = EmbeddingTable(1)
    table.upsert(np.array([1, 2], np.uint64), np.zeros((2, 1), np.float32), now=100.0)
    table.upsert(np.array([3], np.uint64), np.zeros((1, 1), np.float32), now=200.0)
    assert table.evict_expired(ttl_s=150).size == 0  # newest is 200: nothing older than 50
    assert sorted(table.evict_expired(ttl_s=50).tolist()) == [1, 2]
    assert table.evict_expired(ttl_s=10, now=1000.0).tolist() == [3]
    assert len(table) == 0


@given(st.lists(st.tuples(st.integers(1, 2**20), st.integers(0, 3), st.integers(0, 100)), max_size=40),
       st.integers(0, 120), st.booleans())
def test_count_expired_is_what_the_same_eviction_removes(entries, ttl_s, given_clock):
    """count_expired_by_slot(ttl, now) == len(evict_expired_by_slot(ttl, now)), and counting removes nothing."""
    table = EmbeddingTable(1)
    for key, slot, stamp in entries:
        table.upsert(np.array([(slot << SIGNATURE_BITS) | key], np.uint64), np.zeros((1, 1), np.float32), now=float(stamp))
    ttl_by_slot = {0: float(ttl_s), 1: float(ttl_s) / 2, 2: 0.0}  # slot 3 never expires
    now = 90.0 if given_clock else None
    size = len(table)
    counted = table.count_expired_by_slot(ttl_by_slot, now)
    assert len(table) == size
    assert counted == table.evict_expired_by_slot(ttl_by_slot, now).shape[0] == size - len(table)


def test_missing_rows_zero_or_deterministic_init():
    table = EmbeddingTable(8)
    fids = np.array([5, 6, 5], dtype=np.uint64)
    np.testing.assert_array_equal(table.lookup(fids), np.zeros((3, 8), np.float32))
    init = table.lookup(fids, init_scale=0.05)
    assert np.all(np.abs(init) <= 0.05) and np.any(init != 0)
    np.testing.assert_array_equal(init[0], init[2])
    assert not np.array_equal(init[0], init[1])
    np.testing.assert_array_equal(EmbeddingTable(8).lookup(fids, init_scale=0.05), init)


def test_reserved_key_and_bad_arguments_are_rejected():
    table = EmbeddingTable(2)
    with pytest.raises(ValueError, match="reserved empty key"):
        table.upsert(np.array([EMPTY_KEY], np.uint64), np.zeros((1, 2), np.float32), now=0.0)
    assert not table.lookup_found(np.array([EMPTY_KEY], np.uint64))[1][0]
    assert not table.delete(np.array([EMPTY_KEY], np.uint64))[0]
    with pytest.raises(ValueError, match=r"rows requires shape \(2, 2\)"):
        table.upsert(np.array([1, 2], np.uint64), np.zeros((2, 3), np.float32), now=0.0)
    with pytest.raises(TypeError, match="float64"):
        table.lookup(np.array([1.0]))
    with pytest.raises(ValueError, match="1-D"):
        table.lookup(np.zeros((2, 2), np.uint64))
    with pytest.raises(ValueError, match="finite"):
        table.upsert(np.array([1], np.uint64), np.zeros((1, 2), np.float32), now=float("nan"))
    with pytest.raises(ValueError, match="dim"):
        EmbeddingTable(0)
    assert table.lookup(np.array([], dtype=np.int32)).shape == (0, 2)


def test_int64_fids_are_reinterpreted_as_uint64():
    table = EmbeddingTable(1)
    table.upsert(np.array([-2], np.int64), np.ones((1, 1), np.float32), now=0.0)
    assert table.contains(np.array([2**64 - 2], np.uint64))[0]
