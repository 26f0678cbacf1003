"""DeltaApplier: records applied in order, refusals that leave nothing behind, halts and healing from a
snapshot, and catch_up (the backlog applied on the caller's thread before serving starts)."""

import time

import numpy as np
import pytest

from server.features import shipped_schema
from server.runtime.ranker import RankerRuntime
from server.streams.delta_log import FileDeltaReader, FileDeltaWriter
from server.streams.deltas import DENSE, SPARSE, DeltaRecord
from server.streams.snapshots import load_latest_snapshot, write_snapshot
from server.table import EmbeddingTable
from tests.waiting import wait_until
from updater.applier import DeltaApplier

SCHEMA = shipped_schema()


def test_catch_up_applies_the_backlog_and_stops_at_a_fault(tmp_path):
    deltas = tmp_path / "deltas"
    with FileDeltaWriter(deltas) as writer:
        for seq in range(1, 4):
            writer.append(DeltaRecord.sparse(seq, time.time(), np.array([seq], np.uint64),
                                             np.full((1, SCHEMA.dim), seq, np.float32)))
        writer.append(DeltaRecord.sparse(4, time.time(), np.array([4], np.uint64), np.zeros((1, SCHEMA.dim), np.float32)))
    runtime = RankerRuntime(SCHEMA, tmp_path, "t")
    try:
        applier = DeltaApplier(runtime, lambda after: FileDeltaReader(deltas, after))
        applier.catch_up()
        assert runtime.delta_seq == 4 and not applier.running
        np.testing.assert_array_equal(runtime.table.lookup(np.array([2], np.uint64)), 2.0)
        with FileDeltaWriter(deltas) as writer:
            writer.append(DeltaRecord.sparse(5, time.time(), np.array([5], np.uint64),
                                             np.ones((1, SCHEMA.dim + 1), np.float32)))  # wrong dim: refused
        applier.catch_up()
        assert runtime.delta_seq == 4 and applier.halted_reason is None  # the thread reports faults, not catch_up
    finally:
        runtime.close(snapshot=False)


@pytest.fixture
def runtime(tmp_path):
    rt = RankerRuntime(SCHEMA, tmp_path, "t")
    yield rt
    rt.close(snapshot=False)


def test_applier_applies_in_order_and_refuses_what_does_not_fit(runtime):
    applier = DeltaApplier(runtime, open_reader=None)
    row = np.full((1, SCHEMA.dim), 0.5, np.float32)
    assert applier.apply(DeltaRecord.sparse(1, 1.0, [11], row)) is None
    assert runtime.delta_seq == 1 and runtime.table.lookup(np.array([11], np.uint64))[0, 0] == 0.5
    assert applier.apply(DeltaRecord.sparse(1, 1.0, [12], row)) is None  # replay: skipped
    assert not runtime.table.contains(np.array([12], np.uint64))[0]
    assert "gap" in applier.apply(DeltaRecord.sparse(3, 1.0, [13], row))
    assert "unknown table" in applier.apply(DeltaRecord.sparse(2, 1.0, [13], row, table_id=4))
    assert "dim 3" in applier.apply(DeltaRecord.sparse(2, 1.0, [13], np.ones((1, 3), np.float32)))
    assert "does not fit" in applier.apply(DeltaRecord.dense(2, 1.0, {"nope": np.zeros(1, np.float32)}))
    wrong_shape = {**runtime.dense, "bias": np.zeros(2, np.float32)}
    assert "bias [2] vs [1]" in applier.apply(DeltaRecord.dense(2, 1.0, wrong_shape))
    assert runtime.delta_seq == 1
    state = {k: np.full_like(v, 0.01) for k, v in runtime.dense.items()}
    old = runtime.dense
    assert applier.apply(DeltaRecord(2, 1.0, DENSE, dense_state=state)) is None
    assert runtime.dense is not old and runtime.delta_seq == 2
    assert all(runtime.dense[k].tobytes() == v.tobytes() for k, v in state.items())
    assert applier.apply(DeltaRecord.sparse(3, 1.0, [], np.empty((0, SCHEMA.dim), np.float32), evicted=[11])) is None
    assert not runtime.table.contains(np.array([11], np.uint64))[0] and applier.rows_deleted == 1


def healing_applier(runtime, deltas, **kwargs):
    return DeltaApplier(runtime, lambda after_seq: FileDeltaReader(deltas, after_seq),
                        load_snapshot=lambda: load_latest_snapshot(runtime.data_dir), retry_delays_s=(0.01, 0.02),
                        **kwargs)


def row(value):
    return np.full((1, SCHEMA.dim), value, np.float32)


def test_updater_behind_the_stream_heals_from_a_snapshot_and_resumes(runtime, tmp_path):
    """The stream's first records are gone (retention): the reader cannot
    open at seq 0, the updater halts, retries, then loads the newest
    snapshot past its seq and follows the stream from there."""
    deltas = tmp_path / "deltas"
    with FileDeltaWriter(deltas, segment_bytes=1) as writer:  # one record per segment
        for seq in range(1, 11):
            writer.append(DeltaRecord.sparse(seq, float(seq), [100 + seq], row(seq)))
        writer.delete_before(6)
    snap_table = EmbeddingTable(SCHEMA.dim)
    snap_table.upsert(np.array([100 + s for s in range(1, 8)], np.uint64), np.repeat(row(1.0), 7, axis=0), now=7.0)
    write_snapshot(tmp_path, snap_table, runtime.dense, 7)
    applier = healing_applier(runtime, deltas).start()
    try:
        wait_until(lambda: runtime.delta_seq == 10, f"stuck at {runtime.delta_seq}: {applier.halted_reason}")
    finally:
        applier.stop()
    assert applier.halts == 1 and applier.snapshot_reloads == 1 and not applier.halted
    assert runtime.table.lookup(np.array([109], np.uint64))[0, 0] == 9.0  # from the stream after the snapshot
    assert runtime.table.lookup(np.array([102], np.uint64))[0, 0] == 1.0  # from the snapshot


def test_updater_that_cannot_open_the_stream_reports_halted_and_retries(runtime, tmp_path):
    deltas = tmp_path / "deltas"
    deltas.write_text("not a directory")
    applier = healing_applier(runtime, deltas).start()
    try:
        wait_until(lambda: applier.halted, "never reported halted")
        assert "cannot open" in applier.halted_reason and applier.halts == 1
        deltas.unlink()
        with FileDeltaWriter(deltas) as writer:
            writer.append(DeltaRecord.sparse(1, 1.0, [5], row(0.5)))
        wait_until(lambda: runtime.delta_seq == 1, f"never healed: {applier.halted_reason}")
        assert not applier.halted and applier.snapshot_reloads == 0
    finally:
        applier.stop()


def test_a_refused_record_leaves_no_row_behind(runtime):
    applier = DeltaApplier(runtime, open_reader=None, chunk_rows=16)
    fids = np.arange(1, 41, dtype=np.uint64)
    values = np.ones((40, SCHEMA.dim), np.float32)
    values[-1, 3] = np.nan  # in the last chunk
    nan_record = DeltaRecord(1, 1.0, SPARSE, fids=fids, values=values)
    assert "NaN or Inf" in applier.apply(DeltaRecord.decode(nan_record.encode()))
    reserved = DeltaRecord(1, 1.0, SPARSE, fids=np.append(fids[:39], np.uint64(2**64 - 1)),
                           values=np.ones((40, SCHEMA.dim), np.float32))
    assert "reserved" in applier.apply(reserved)
    assert len(runtime.table) == 0 and runtime.delta_seq == 0
    bad_dense = {k: np.full_like(v, np.inf) for k, v in runtime.dense.items()}
    assert "NaN or Inf" in applier.apply(DeltaRecord(1, 1.0, DENSE, dense_state=bad_dense))
    with pytest.raises(ValueError, match="finite"):  # the writing side refuses them too
        DeltaRecord.sparse(1, 1.0, fids, values)
    with pytest.raises(ValueError, match="finite"):
        DeltaRecord.dense(1, 1.0, bad_dense)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_updater_thread_reports_halted(runtime):
    def open_reader(after_seq):
        raise SystemExit  # escapes every handler: the thread ends

    applier = DeltaApplier(runtime, open_reader).start()
    wait_until(lambda: not applier.running, "the thread did not end")
    assert applier.halted  # the gauge reads 1 although no halt reason was ever set
    applier.stop()
