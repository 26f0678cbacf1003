"""Rollback records restore the state at an earlier seq exactly; targets outside the retained range are refused;
a rollback cut short by a crash is repaired by running it again (no Triton: the e2e test drives real servers)."""

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.dense import initial_dense_state
from server.features import shipped_schema
from server.streams.snapshots import write_snapshot
from server.streams import DELTAS, Streams
from server.streams.segments import list_segments
from server.table import EmbeddingTable
from server.streams.deltas import DeltaRecord
from updater.rollback import (RollbackRangeError, plan_rollback, read_control, retained_range, rollback_now,
                              write_control)
from server.streams.delta_log import FileDeltaWriter
from server.tensor_io import encode_tensors
from tests.stream_state import stream_state

SCHEMA = shipped_schema()
K = SCHEMA.dim


def fold(data_dir, until_seq=None):
    return stream_state(Streams(data_dir).path(DELTAS), until_seq)


def write_stream(data_dir, n_records, pool, seed, snapshot_at=(), segment_bytes=64 << 20):
    """n_records random sparse records (FIDs from a pool of ``pool``, some evictions) and a dense one
    every fifth; serving snapshots (folded state) after the seqs in snapshot_at."""
    rng = np.random.default_rng(seed)
    with FileDeltaWriter(Streams(data_dir).path(DELTAS), segment_bytes=segment_bytes) as writer:
        for _ in range(n_records):
            seq = writer.next_seq
            if seq % 5 == 0:
                writer.append(DeltaRecord.dense(seq, time.time(), {
                    k: rng.standard_normal(v.shape, dtype=np.float32)
                    for k, v in initial_dense_state(SCHEMA.num_fields, K, SCHEMA.dense).items()}))
            else:
                fids = np.unique(rng.integers(1, pool + 1, rng.integers(1, 40), dtype=np.uint64))
                evicted = rng.integers(1, pool + 1, rng.integers(0, 4), dtype=np.uint64)
                evicted = np.setdiff1d(evicted, fids)
                writer.append(DeltaRecord.sparse(seq, time.time(), fids,
                                                 rng.standard_normal((len(fids), K), dtype=np.float32), evicted))
            if seq in snapshot_at:
                rows, dense = fold(data_dir)
                table = EmbeddingTable(K)
                if rows:
                    table.upsert(np.array(list(rows), np.uint64),
                                 np.stack([np.frombuffer(b, np.float32) for b in rows.values()]), now=1.0)
                write_snapshot(data_dir, table, dense, seq)


def assert_state_equal(a, b):
    assert a[0].keys() == b[0].keys(), f"{len(a[0].keys() - b[0].keys())} extra, {len(b[0].keys() - a[0].keys())} missing"
    assert sum(a[0][f] != b[0][f] for f in a[0]) == 0
    assert encode_tensors(a[1]) == encode_tensors(b[1])  # dense: names, order, dtypes, shapes and bytes


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, 25), pool=st.sampled_from([30, 3000]), seed=st.integers(0, 10**6), data=st.data())
def test_rollback_restores_the_state_at_s_byte_for_byte(tmp_path_factory, n, pool, seed, data):
    data_dir = tmp_path_factory.mktemp("rb")
    snapshot_at = set(data.draw(st.lists(st.integers(1, n), max_size=3)))
    write_stream(data_dir, n, pool, seed, snapshot_at)
    to_seq = data.draw(st.integers(0, n))
    expected = fold(data_dir, until_seq=to_seq)
    message = rollback_now(data_dir, to_seq, SCHEMA)
    assert f"rollback to seq {to_seq}" in message
    assert_state_equal(fold(data_dir), expected)


def test_targets_outside_the_retained_range_are_refused(tmp_path):
    with pytest.raises(RollbackRangeError, match=r"retained range 0\.\.0 .* got 1 \(the stream is empty\)"):
        plan_rollback(tmp_path, 1, SCHEMA)
    write_stream(tmp_path, 12, 100, 0, snapshot_at={8}, segment_bytes=1)  # one record per segment
    with pytest.raises(RollbackRangeError, match=r"retained range 0\.\.12 .* got 13"):
        rollback_now(tmp_path, 13, SCHEMA)
    with pytest.raises(RollbackRangeError, match="got -1"):
        rollback_now(tmp_path, -1, SCHEMA)
    # Retention dropped the records before the snapshot at 8: states before it cannot be rebuilt.
    with FileDeltaWriter(Streams(tmp_path).path(DELTAS), segment_bytes=1) as writer:
        writer.delete_before(9)
    assert list_segments(Streams(tmp_path).path(DELTAS))[0] == 8  # seq 9 onwards
    assert retained_range(tmp_path) == (8, 12)
    with pytest.raises(RollbackRangeError, match=r"retained range 8\.\.12 .* got 7"):
        rollback_now(tmp_path, 7, SCHEMA)
    assert "rollback to seq 8 (stream at 12)" in rollback_now(tmp_path, 8, SCHEMA)


def test_a_large_rollback_is_split_into_records_and_stays_exact(tmp_path):
    write_stream(tmp_path, 12, 3000, 4)
    expected = fold(tmp_path, until_seq=3)
    plan = plan_rollback(tmp_path, 3, SCHEMA)
    with FileDeltaWriter(Streams(tmp_path).path(DELTAS)) as writer:
        records = plan.records(writer.next_seq, rows_per_record=7)
        assert len(records) == -(-int(plan.found.sum()) // 7) + 1  # + the dense one
        for record in records:
            writer.append(record)
    assert_state_equal(fold(tmp_path), expected)


def test_a_rollback_cut_short_is_repaired_by_running_it_again(tmp_path):
    write_stream(tmp_path, 30, 500, 1)
    expected = fold(tmp_path, until_seq=10)
    plan = plan_rollback(tmp_path, 10, SCHEMA)
    assert plan.dense_state is not None and (~plan.found).any() and plan.found.any()
    with FileDeltaWriter(Streams(tmp_path).path(DELTAS)) as writer:
        writer.append(plan.records(writer.next_seq)[0])  # the sparse half only: killed before the dense one
    segment = sorted(Streams(tmp_path).path(DELTAS).glob("*.seg"))[-1]
    size = segment.stat().st_size
    with open(segment, "r+b") as f:  # and the sparse half torn mid-write
        f.truncate(size - 7)
    rollback_now(tmp_path, 10, SCHEMA)
    assert_state_equal(fold(tmp_path), expected)


def test_the_control_file_counts_requests_and_keeps_hold(tmp_path):
    assert read_control(tmp_path) == {"hold": False, "rollback_to_seq": None, "request": 0, "rollback_request": 0}
    write_control(tmp_path, hold=True)
    control = write_control(tmp_path, rollback_to_seq=5)
    assert control == {"hold": True, "rollback_to_seq": 5, "request": 2, "rollback_request": 2}
    assert write_control(tmp_path, hold=False) == {"hold": False, "rollback_to_seq": 5, "request": 3,
                                                   "rollback_request": 2} == read_control(tmp_path)
    (tmp_path / "guard" / "control.json").write_text("{not json")
    with pytest.raises(ValueError, match="control.json is unreadable"):
        read_control(tmp_path)
