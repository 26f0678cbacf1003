"""SharedRankerRuntime without Triton: two instances over one shared table (in one process, two leases)."""

import os
import time

import numpy as np
import pytest

from server.dense import initial_dense_state
from server.tensor_io import encode_tensors
from server.features import PAD_FID, shipped_schema
from server.runtime.ranker import RankRequest
from server.runtime.shared_ranker import SERVER_PID, SharedRankerRuntime, process_identity
from server.streams.snapshots import list_snapshots, write_snapshot
from updater.applier import DeltaApplier
from server.table import EmbeddingTable
from server.table.shared import SharedEmbeddingTable, shm_directory
from tests.waiting import wait_until
from server.streams.deltas import DeltaRecord
from server.streams.delta_log import FileDeltaWriter

SCHEMA = shipped_schema()
USER, ITEMS = SCHEMA.encode_request({"user_id": 5, "hour": 7}, [{"item_id": i, "item_genres": ["Drama"]}
                                                              for i in range(10)])
REQUEST = RankRequest(b"r", 1.0, USER, ITEMS)
FIDS = np.unique(np.concatenate([USER, ITEMS.ravel()]))
FIDS = FIDS[FIDS != PAD_FID]


@pytest.fixture
def shm_root(tmp_path):
    root = tmp_path / "shm"
    root.mkdir()
    return root


def runtime(data_dir, shm_root, name, **kw):
    return SharedRankerRuntime(SCHEMA, data_dir, name, make_applier=DeltaApplier.following,
                               server_pid=kw.pop("server_pid", os.getpid()), shm_root=shm_root, **kw)


def test_instances_share_rows_seq_and_dense_and_apply_once(tmp_path, shm_root, rng):
    data = tmp_path / "data"
    table = EmbeddingTable(SCHEMA.dim)
    table.upsert(FIDS[:3], rng.standard_normal((3, SCHEMA.dim), dtype=np.float32), now=1.0)
    write_snapshot(data, table, initial_dense_state(SCHEMA.num_fields, SCHEMA.dim, SCHEMA.dense), 4)
    first, second = runtime(data, shm_root, "a"), runtime(data, shm_root, "b")
    try:
        assert first.table.is_writer and not second.table.is_writer
        assert len(second.table) == 3 and second.delta_seq == 4
        with FileDeltaWriter(data / "deltas") as deltas:
            for seq in range(1, 5):  # in the snapshot already: skipped
                deltas.append(DeltaRecord.sparse(seq, time.time(), FIDS[:1], np.zeros((1, SCHEMA.dim), np.float32)))
            deltas.append(DeltaRecord.sparse(5, time.time(), FIDS,
                                             rng.standard_normal((len(FIDS), SCHEMA.dim)).astype(np.float32)))
            dense = initial_dense_state(SCHEMA.num_fields, SCHEMA.dim, {**SCHEMA.dense, "seed": 9})
            deltas.append(DeltaRecord.dense(6, time.time(), dense))
        wait_until(lambda: second.delta_seq == 6)
        (a, seq_a), (b, seq_b) = first.score([REQUEST]), second.score([REQUEST])
        assert seq_a == seq_b == 6
        np.testing.assert_array_equal(a[0], b[0])
        time.sleep(0.1)  # the reader does not apply deltas however long it waits
        assert first.updater.rows_applied == len(FIDS) and second.updater.rows_applied == 0
    finally:
        second.close()
        first.close()
    assert not shm_directory(data, shm_root).exists()  # the last one out removed it
    assert list_snapshots(data)[-1].name == f"{6:020d}"  # the writer wrote the serving snapshot


def test_reader_takes_over_and_resumes_after_the_stored_seq(tmp_path, shm_root, rng):
    data = tmp_path / "data"
    first, second = runtime(data, shm_root, "a"), runtime(data, shm_root, "b")
    try:
        with FileDeltaWriter(data / "deltas") as deltas:
            deltas.append(DeltaRecord.sparse(1, time.time(), FIDS[:4], np.ones((4, SCHEMA.dim), np.float32)))
            wait_until(lambda: second.delta_seq == 1)
            first.close(snapshot=False)  # the writer leaves: its lease frees
            wait_until(lambda: second.table.is_writer)
            deltas.append(DeltaRecord.sparse(2, time.time(), FIDS, np.full((len(FIDS), SCHEMA.dim), 2, np.float32)))
            wait_until(lambda: second.delta_seq == 2)
        assert second.updater.rows_applied == len(FIDS)
        np.testing.assert_array_equal(second.table.lookup(FIDS), 2.0)
    finally:
        second.close()


def test_leftover_of_a_dead_server_is_removed_and_a_live_one_refused(tmp_path, shm_root):
    data = tmp_path / "data"
    data.mkdir()
    directory = shm_directory(data, shm_root)
    dead_pid = 2**22 + 7  # above the default pid_max: no such process
    leftover = SharedEmbeddingTable.create(directory, SCHEMA.dim, owner=12345)
    leftover.user[SERVER_PID] = dead_pid
    leftover.mark_ready()
    leftover.close()
    fresh = runtime(data, shm_root, "a")
    try:
        assert fresh.table.owner == process_identity(os.getpid()) and fresh.table.is_writer
        with pytest.raises(RuntimeError, match="requires one server, got two"):
            runtime(data, shm_root, "b", server_pid=os.getppid())
    finally:
        fresh.close()


def test_a_killed_server_that_is_not_yet_reaped_counts_as_gone(tmp_path, shm_root):
    """A tritonserver killed together with its serve stays a zombie until init reaps it: its table is a
    leftover, not a live server's (the restart of a killed replica was refused while it was one)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    owner = process_identity(child.pid)  # the identity its table was created with, while it lived
    child.kill()
    wait_until(lambda: open(f"/proc/{child.pid}/stat").read().split(")")[-1].split()[0] == "Z", "a zombie")
    try:
        assert owner is not None and process_identity(child.pid) is None
        data = tmp_path / "data"
        data.mkdir()
        leftover = SharedEmbeddingTable.create(shm_directory(data, shm_root), SCHEMA.dim, owner=owner)
        leftover.user[SERVER_PID] = child.pid
        leftover.mark_ready()
        leftover.close()
        fresh = runtime(data, shm_root, "a")
        fresh.close()
    finally:
        child.wait()
    assert process_identity(os.getpid()) is not None


def test_the_writer_heals_from_a_snapshot_and_every_instance_serves_it(tmp_path, shm_root, rng):
    """Retention dropped deltas 1..5 past the served snapshot (seq 0): the
    writer halts, retries, loads the newest snapshot (seq 7) into shared
    memory (rows it lacks deleted) and follows the stream; the reader serves
    the same rows, seq and dense weights without doing anything."""
    data = tmp_path / "data"
    old_rows = FIDS[:5]
    old = EmbeddingTable(SCHEMA.dim)
    old.upsert(old_rows, np.full((5, SCHEMA.dim), 9, np.float32), now=1.0)
    write_snapshot(data, old, initial_dense_state(SCHEMA.num_fields, SCHEMA.dim, SCHEMA.dense), 0)
    with FileDeltaWriter(data / "deltas", segment_bytes=1) as deltas:  # one record per segment
        for seq in range(1, 11):
            deltas.append(DeltaRecord.sparse(seq, time.time(), FIDS[seq % len(FIDS)][None],
                                             np.full((1, SCHEMA.dim), seq, np.float32)))
        deltas.delete_before(6)
    first, second = runtime(data, shm_root, "a"), runtime(data, shm_root, "b")
    try:
        assert second.delta_seq == 0 and len(second.table) == 5
        snap = EmbeddingTable(SCHEMA.dim)
        snap.upsert(FIDS[5:], np.full((len(FIDS) - 5, SCHEMA.dim), 7, np.float32), now=7.0)
        dense = initial_dense_state(SCHEMA.num_fields, SCHEMA.dim, {**SCHEMA.dense, "seed": 11})
        write_snapshot(data, snap, dense, 7)
        wait_until(lambda: second.delta_seq == 10, timeout_s=30)
        assert first.updater.halts >= 1 and first.updater.snapshot_reloads == 1 and not first.updater.halted
        expected = {int(f): 7.0 for f in FIDS[5:]}
        expected.update({int(FIDS[seq % len(FIDS)]): float(seq) for seq in range(8, 11)})
        for instance in (first, second):
            rows, found = instance.table.lookup_found(FIDS)
            assert found.tolist() == [int(f) in expected for f in FIDS], "rows outside the snapshot survived"
            np.testing.assert_array_equal(rows[found, 0], [expected[int(f)] for f in FIDS[found]])
        (a, seq_a), (b, seq_b) = first.score([REQUEST]), second.score([REQUEST])
        assert seq_a == seq_b == 10
        np.testing.assert_array_equal(a[0], b[0])
        assert encode_tensors(second.dense) == encode_tensors(dense)  # names, shapes and bytes
    finally:
        second.close()
        first.close()
