"""A ranker serving fp16 or int8 rows: snapshots and deltas arrive as fp32 and are served as quantized, on a
private table and on the shared one; the serving snapshot keeps the row type; settings name the choices."""

import os
import struct
import time

import numpy as np
import pytest

from server.dense import initial_dense_state
from server.runtime.ranker import ROW_DTYPE_ENV, RankerRuntime, row_dtype_from_settings
from server.runtime.shared_ranker import SharedRankerRuntime
from server.streams.delta_log import FileDeltaWriter
from server.streams.deltas import DeltaRecord
from server.streams.snapshots import list_snapshots, write_snapshot
from server.table import EmbeddingTable
from server.table.quantize import quantized
from tests.server.runtime.test_shared_ranker import FIDS, REQUEST, SCHEMA
from tests.waiting import wait_until
from updater.applier import DeltaApplier



def bits(rows):
    return np.ascontiguousarray(rows, np.float32).view(np.uint32)


def trainer_snapshot(data, rng, seq=4):
    """An fp32 snapshot, as the trainer writes them; returns its rows."""
    rows = rng.normal(0, 0.4, (FIDS.shape[0], SCHEMA.dim)).astype(np.float32)
    table = EmbeddingTable(SCHEMA.dim)
    table.upsert(FIDS, rows, now=1.0)
    write_snapshot(data, table, initial_dense_state(SCHEMA.num_fields, SCHEMA.dim, SCHEMA.dense), seq)
    return rows


def snapshot_format(data):
    return struct.unpack_from("<I", (list_snapshots(data)[-1] / "table.snap").read_bytes(), 8)[0]


def test_an_int8_ranker_serves_the_trainers_snapshot_and_deltas_as_quantized_and_keeps_int8(tmp_path, rng):
    data = tmp_path / "data"
    rows = trainer_snapshot(data, rng)
    runtime = RankerRuntime(SCHEMA, data, "t", row_dtype="int8")
    try:
        assert runtime.table.row_dtype == "int8" and "(int8)" in runtime.startup_message
        assert (bits(runtime.table.lookup(FIDS)) == bits(quantized(rows, "int8"))).all()
        applier = DeltaApplier(runtime, open_reader=None)
        update = rng.normal(0, 0.4, (3, SCHEMA.dim)).astype(np.float32)
        assert applier.apply(DeltaRecord.sparse(5, time.time(), FIDS[:3], update)) is None
        assert (bits(runtime.table.lookup(FIDS[:3])) == bits(quantized(update, "int8"))).all()
        scores, seq = runtime.score([REQUEST])
        assert seq == 5 and np.isfinite(scores[0]).all()
    finally:
        runtime.close()  # past its snapshot: writes the serving snapshot at seq 5
    assert snapshot_format(data) == 2
    again = RankerRuntime(SCHEMA, data, "t", row_dtype="int8")
    try:
        served = again.table.lookup(FIDS)
        assert again.delta_seq == 5 and (bits(served[:3]) == bits(quantized(update, "int8"))).all()
        assert (bits(served[3:]) == bits(quantized(rows[3:], "int8"))).all()
    finally:
        again.close(snapshot=False)


def test_an_fp16_ranker_halts_on_a_delta_beyond_fp16_and_writes_none_of_it(tmp_path, rng):
    data = tmp_path / "data"
    trainer_snapshot(data, rng)
    runtime = RankerRuntime(SCHEMA, data, "t", row_dtype="fp16")
    try:
        before = runtime.table.lookup(FIDS).copy()
        huge = np.zeros((2, SCHEMA.dim), np.float32)
        huge[1, 3] = 1e5
        reason = DeltaApplier(runtime, open_reader=None).apply(DeltaRecord.sparse(5, 1.0, FIDS[:2], huge))
        assert "fp16" in reason and "--row-dtype int8 or fp32" in reason and f"FID {int(FIDS[1])}" in reason
        assert runtime.delta_seq == 4 and (bits(runtime.table.lookup(FIDS)) == bits(before)).all()
    finally:
        runtime.close(snapshot=False)


def test_shared_instances_serve_int8_rows_and_refuse_an_instance_of_another_row_type(tmp_path, rng):
    data, shm_root = tmp_path / "data", tmp_path / "shm"
    shm_root.mkdir()
    rows = trainer_snapshot(data, rng)

    def instance(name, row_dtype):
        return SharedRankerRuntime(SCHEMA, data, name, make_applier=DeltaApplier.following, server_pid=os.getpid(),
                                   shm_root=shm_root, row_dtype=row_dtype)

    first, second = instance("a", "int8"), instance("b", "int8")
    try:
        assert (bits(second.table.lookup(FIDS)) == bits(quantized(rows, "int8"))).all()
        update = rng.normal(0, 0.4, (FIDS.shape[0], SCHEMA.dim)).astype(np.float32)
        with FileDeltaWriter(data / "deltas") as deltas:
            for seq in range(1, 5):  # already in the snapshot
                deltas.append(DeltaRecord.sparse(seq, time.time(), FIDS[:1], np.zeros((1, SCHEMA.dim), np.float32)))
            deltas.append(DeltaRecord.sparse(5, time.time(), FIDS, update))
        wait_until(lambda: second.delta_seq == 5)
        assert (bits(second.table.lookup(FIDS)) == bits(quantized(update, "int8"))).all()
        np.testing.assert_array_equal(first.score([REQUEST])[0][0], second.score([REQUEST])[0][0])
        with pytest.raises(RuntimeError, match="stores int8 rows, this instance requires fp16"):
            instance("c", "fp16")
    finally:
        second.close()
        first.close()
    assert snapshot_format(data) == 2


def test_the_row_type_comes_from_serve_then_the_model_parameter_then_fp32():
    assert row_dtype_from_settings({}, {}) == "fp32"
    assert row_dtype_from_settings({"row_dtype": "fp16"}, {}) == "fp16"
    assert row_dtype_from_settings({"row_dtype": "fp16"}, {ROW_DTYPE_ENV: "int8"}) == "int8"
    with pytest.raises(ValueError, match="row_dtype requires one of fp32, fp16, int8.*'float8'"):
        row_dtype_from_settings({"row_dtype": "float8"}, {})
