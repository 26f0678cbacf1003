"""Hot updates on the real tritonserver: deltas change scores in place, never a reload."""

import threading
import time

import numpy as np
import pytest

from server.client import RankerClient
from server.dense import initial_dense_state
from server.tensor_io import encode_tensors
from server.features import PAD_FID, shipped_schema
from server.host.launcher import TritonServer
from server.streams import SegmentLogWriter
from server.streams.snapshots import load_latest_snapshot, write_snapshot
from server.table import EmbeddingTable
from server.streams.deltas import DeltaRecord
from server.streams.delta_log import FileDeltaWriter
from loadtest.stack import read_metric
from tests.waiting import wait_for_seq, wait_until
from updater.tools import SyntheticProducer, scan

SCHEMA = shipped_schema()
USER, ITEMS = SCHEMA.encode_request({"user_id": 5, "hour": 7}, [{"item_id": i, "item_genres": ["Drama"]}
                                                              for i in range(10)])


def wait_metric(server, name, value, timeout_s=10.0):
    """Metrics refresh once a second: poll until name == value."""
    wait_until(lambda: read_metric(server.metrics_url, name) == value, f"{name} == {value}", timeout_s, poll_s=0.2)


def loads_in_log(server):
    return server.log_path.read_text().count("successfully loaded 'ranker'")


@pytest.fixture
def server(tmp_path):
    with TritonServer(tmp_path / "data") as srv:
        yield srv


def test_sparse_then_dense_deltas_change_scores_without_reload(server, tmp_path):
    rng = np.random.default_rng(0)
    with RankerClient(server.grpc_url, "grpc") as client, FileDeltaWriter(server.data_dir / "deltas") as deltas:
        before, seq = client.rank(USER, ITEMS, request_id=b"before")
        assert seq == 0
        fids = np.unique(np.concatenate([USER, ITEMS.ravel()]))
        fids = fids[fids != PAD_FID]
        deltas.append(DeltaRecord.sparse(1, time.time(), fids,
                                         rng.normal(0, 0.5, (len(fids), SCHEMA.dim)).astype(np.float32)))
        sparse_scores, seq = wait_for_seq(client, USER, ITEMS, 1)
        assert seq == 1 and not np.allclose(sparse_scores, before)
        assert np.ptp(sparse_scores) > 0  # candidates now differ from each other

        dense = initial_dense_state(SCHEMA.num_fields, SCHEMA.dim, {**SCHEMA.dense, "seed": 7})
        deltas.append(DeltaRecord.dense(2, time.time(), dense))
        dense_scores, seq = wait_for_seq(client, USER, ITEMS, 2)
        assert seq == 2 and not np.allclose(dense_scores, sparse_scores)

        # Triton counts a request once its response is out: the last one may not be counted yet
        wait_until(lambda: int(client.raw.get_inference_statistics("ranker", as_json=True)["model_stats"][0]
                               ["inference_stats"]["success"]["count"]) >= 3, "3 successful requests counted")
    assert loads_in_log(server) == 1
    wait_metric(server, "monolith_delta_seq", 2)
    server.stop()
    # Clean shutdown saved the serving state at seq 2: it matches what was sent.
    snapshot = load_latest_snapshot(server.data_dir)
    assert snapshot.delta_seq == 2
    assert encode_tensors(snapshot.dense_state) == encode_tensors(dense)  # names, shapes and bytes


def test_kill_9_while_streaming_then_catch_up_exactly(tmp_path):
    data = tmp_path / "data"
    producer = SyntheticProducer(data / "deltas", rows_per_s=20_000, dim=SCHEMA.dim, key_space=5_000,
                                 interval_s=0.05, seed=3)
    stop = threading.Event()
    thread = threading.Thread(target=producer.run, args=(30.0, stop))
    srv = TritonServer(data).start()
    try:
        thread.start()
        with RankerClient(srv.grpc_url, "grpc") as client:
            wait_for_seq(client, USER, ITEMS, 5)
        srv.kill()  # SIGKILL to the server and its model stubs, mid-stream
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
        producer.close()
    last_seq = producer.records
    intended: dict[int, bytes] = {}
    for _, _, _, record in scan(data / "deltas"):
        for f, row in zip(record.fids.tolist(), record.values):
            intended[f] = row.tobytes()
        for f in record.evicted.tolist():
            intended.pop(f, None)

    with TritonServer(data) as srv, RankerClient(srv.grpc_url, "grpc") as client:
        wait_for_seq(client, USER, ITEMS, last_seq)
        assert loads_in_log(srv) == 2  # one per start: none while applying
    snapshot = load_latest_snapshot(data)
    assert snapshot.delta_seq == last_seq
    served = {}
    for fids, rows, _ in snapshot.table.items():
        for f, row in zip(fids.tolist(), rows):
            served[f] = row.tobytes()
    assert served == intended


def test_corrupt_delta_is_refused_and_serving_continues(server):
    with RankerClient(server.http_url, "http") as client:
        good = DeltaRecord.sparse(1, time.time(), USER[:1], np.ones((1, SCHEMA.dim), np.float32))
        bad = bytearray(DeltaRecord.sparse(2, time.time(), USER[:1], np.zeros((1, SCHEMA.dim), np.float32)).encode())
        bad[40] ^= 0x01
        with SegmentLogWriter(server.data_dir / "deltas") as raw:
            raw.append(good.encode())
            raw.append(bytes(bad))
        wait_for_seq(client, USER, ITEMS, 1)
        wait_metric(server, "monolith_delta_updater_halted", 1)
        scores, seq = client.rank(USER, ITEMS, request_id=b"after-corrupt")
        assert seq == 1 and scores.shape == (10,)
        wait_metric(server, "monolith_delta_records_rejected_total", 1)
        wait_metric(server, "monolith_delta_updater_halts_total", 1)
        assert "delta updater halted" in server.log_path.read_text()
        # A snapshot past the bad record heals it: loaded in place, serving goes on from there.
        table = EmbeddingTable(SCHEMA.dim)
        table.upsert(USER[:1], np.full((1, SCHEMA.dim), 0.25, np.float32), now=time.time())
        write_snapshot(server.data_dir, table, initial_dense_state(SCHEMA.num_fields, SCHEMA.dim, SCHEMA.dense), 2)
        with SegmentLogWriter(server.data_dir / "deltas") as raw:
            raw.append(DeltaRecord.sparse(3, time.time(), USER[1:2], np.ones((1, SCHEMA.dim), np.float32)).encode())
        _, seq = wait_for_seq(client, USER, ITEMS, 3)
        assert seq == 3
        wait_metric(server, "monolith_delta_updater_halted", 0)
        wait_metric(server, "monolith_delta_snapshot_reloads_total", 1)
    assert loads_in_log(server) == 1
