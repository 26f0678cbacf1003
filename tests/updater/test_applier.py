"""DeltaApplier.catch_up: the stream's backlog applied on the caller's thread before serving starts."""

import time

import numpy as np

from server.features import shipped_schema
from server.runtime.ranker import RankerRuntime
from updater.applier import DeltaApplier
from server.streams.deltas import DeltaRecord
from server.streams.delta_log import FileDeltaReader, FileDeltaWriter

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
