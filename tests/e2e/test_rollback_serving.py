"""`monolith-rt deltas rollback --to-seq S` on the real tritonserver: the server's table and dense weights
equal the state at S byte for byte (rows created after S deleted), through a kill -9 of the server right
after the rollback is appended (before or while it applies it), and for a server that replays the stream from
an older snapshot."""

import shutil
import subprocess
import sys
import time

import numpy as np

from server.client import RankerClient
from server.dense import initial_dense_state
from server.tensor_io import encode_tensors
from server.features import shipped_schema
from server.host.launcher import TritonServer
from server.streams.snapshots import list_snapshots, load_latest_snapshot, write_snapshot
from server.table import EmbeddingTable
from tests.stream_state import stream_state
from tests.waiting import wait_for_seq
from server.streams.deltas import DeltaRecord
from server.streams.delta_log import FileDeltaWriter
from updater.tools import scan

SCHEMA = shipped_schema()
K = SCHEMA.dim
USER, ITEMS = SCHEMA.encode_request({"user_id": 5}, [{"item_id": i} for i in range(4)])


def state(data, until_seq=None):
    return stream_state(data / "deltas", until_seq)


def served_state(data):
    snapshot = load_latest_snapshot(data)
    rows = {f: r.tobytes() for fids, values, _ in snapshot.table.items() for f, r in zip(fids.tolist(), values)}
    return snapshot.delta_seq, rows, snapshot.dense_state


def wait_for_server_seq(server, seq):
    with RankerClient(server.grpc_url, "grpc") as client:
        wait_for_seq(client, USER, ITEMS, seq)


def append_records(writer, rng, count, pool_lo, pool_hi, dense_every=4):
    for _ in range(count):
        seq = writer.next_seq
        if seq % dense_every == 0:
            dense = initial_dense_state(SCHEMA.num_fields, K, {**SCHEMA.dense, "seed": seq})
            writer.append(DeltaRecord.dense(seq, time.time(), dense))
            continue
        fids = np.unique(rng.integers(pool_lo, pool_hi, 3000, dtype=np.uint64))
        evicted = np.setdiff1d(rng.integers(pool_lo, pool_hi, 50, dtype=np.uint64), fids)
        writer.append(DeltaRecord.sparse(seq, time.time(), fids, rng.standard_normal((len(fids), K),
                                                                                     dtype=np.float32), evicted))


def rollback_cli(data, to_seq):
    return subprocess.run([sys.executable, "-m", "server.cli", "deltas", "rollback", "--data-dir", str(data),
                           "--to-seq", str(to_seq)], capture_output=True, text=True, timeout=120)


def assert_equal_state(seq_rows_dense, expected):
    _, rows, dense = seq_rows_dense
    assert rows.keys() == expected[0].keys(), (f"{len(rows.keys() - expected[0].keys())} rows only served, "
                                               f"{len(expected[0].keys() - rows.keys())} missing")
    differ = sum(rows[f] != b for f, b in expected[0].items())
    assert differ == 0, f"{differ} of {len(rows)} rows differ"
    assert encode_tensors(dense) == encode_tensors(expected[1])  # names, order, dtypes, shapes and bytes


def test_rollback_restores_every_server_to_the_state_at_s(tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    with FileDeltaWriter(data / "deltas") as writer:
        append_records(writer, rng, 3, 1, 20_000)
        rows, dense = state(data)
        table = EmbeddingTable(K)
        table.upsert(np.array(list(rows), np.uint64), np.stack([np.frombuffer(b, np.float32)
                                                                for b in rows.values()]), now=1.0)
        write_snapshot(data, table, dense, 3)  # an older snapshot a restarting server replays from
        append_records(writer, rng, 4, 1, 20_000)
    s = 7
    expected = state(data, until_seq=s)
    with TritonServer(data) as srv:
        with FileDeltaWriter(data / "deltas") as writer:
            append_records(writer, rng, 8, 10_000, 40_000)  # overwrites, evictions and rows created after S
        wait_for_server_seq(srv, 15)
        refused = rollback_cli(data, 16)
        assert refused.returncode == 1 and "retained range 0..15" in refused.stderr and "got 16" in refused.stderr
        done = rollback_cli(data, s)
        assert done.returncode == 0, done.stderr
        assert "rollback to seq 7 (stream at 15)" in done.stdout and "deleted" in done.stdout
        srv.kill()  # SIGKILL to the server tree while it applies the rollback
    last = state(data)
    assert_equal_state((None, *last), expected)  # the stream's own end state is the state at S
    tail_seq = max(record.seq for _, _, _, record in scan(data / "deltas"))
    with TritonServer(data) as srv:
        wait_for_server_seq(srv, tail_seq)
    live = served_state(data)
    assert live[0] == tail_seq
    assert_equal_state(live, expected)
    # A server that starts from the snapshot at 3 and replays 4..tail ends in the same state.
    for path in list_snapshots(data):
        if path.name != f"{3:020d}":
            shutil.rmtree(path)
    with TritonServer(data) as srv:
        wait_for_server_seq(srv, tail_seq)
    assert_equal_state(served_state(data), expected)
