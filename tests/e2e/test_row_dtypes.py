"""The real tritonserver serving int8 rows (``serve --row-dtype int8``, through the environment it sets): scores
are those of the trainer's rows as quantized, not of the fp32 rows; its serving snapshot stays int8."""

import shutil
import urllib.request
import struct
import time

import numpy as np

from server.client import RankerClient
from server.dense import initial_dense_state
from server.features import PAD_FID, shipped_schema
from server.host.launcher import TritonServer
from server.runtime.ranker import ROW_DTYPE_ENV, RankerRuntime, RankRequest
from server.streams.delta_log import FileDeltaWriter
from server.streams.deltas import DeltaRecord
from server.streams.snapshots import list_snapshots, write_snapshot
from server.table import EmbeddingTable
from tests.waiting import wait_for_seq, wait_until

SCHEMA = shipped_schema()
USER, ITEMS = SCHEMA.encode_request({"user_id": 9, "hour": 3}, [{"item_id": i, "item_genres": ["Action", "Comedy"]}
                                                              for i in range(30)])


def table_bytes_metric(metrics_url) -> float:
    """monolith_table_bytes of the ranker labelled row_dtype="int8" (0 until reported)."""
    for line in urllib.request.urlopen(metrics_url, timeout=5).read().decode().splitlines():
        if line.startswith("monolith_table_bytes{") and 'row_dtype="int8"' in line and 'model="ranker"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def local_scores(data, row_dtype):
    runtime = RankerRuntime(SCHEMA, data, "local", row_dtype=row_dtype)
    try:
        return runtime.score([RankRequest(b"x", 1.0, USER, ITEMS)])[0][0]
    finally:
        runtime.close(snapshot=False)


def test_triton_serves_int8_rows_as_quantized_and_applies_deltas_to_them(tmp_path, monkeypatch, rng):
    fids = np.unique(np.concatenate([USER, ITEMS.ravel()]))
    fids = fids[fids != PAD_FID]
    table = EmbeddingTable(SCHEMA.dim)
    table.upsert(fids, rng.normal(0, 0.5, (len(fids), SCHEMA.dim)).astype(np.float32), now=1.0)
    dense = initial_dense_state(SCHEMA.num_fields, SCHEMA.dim, {**SCHEMA.dense, "seed": 99})
    data = tmp_path / "data"
    write_snapshot(data, table, dense, delta_seq=3)
    update = rng.normal(0, 0.5, (len(fids), SCHEMA.dim)).astype(np.float32)
    local = tmp_path / "local"
    shutil.copytree(data, local)
    table.upsert(fids, update, now=2.0)
    write_snapshot(local, table, dense, delta_seq=4)  # what serving holds once the delta below is applied
    expected, fp32 = local_scores(local, "int8"), local_scores(local, "fp32")
    assert np.abs(expected - fp32).max() > 1e-5  # the row types really differ in what they serve

    monkeypatch.setenv(ROW_DTYPE_ENV, "int8")
    with TritonServer(data) as server, RankerClient(server.grpc_url, "grpc") as client:
        with FileDeltaWriter(data / "deltas") as deltas:
            for seq in range(1, 4):  # already in the snapshot: skipped
                deltas.append(DeltaRecord.sparse(seq, time.time(), fids[:1], np.zeros((1, SCHEMA.dim), np.float32)))
            deltas.append(DeltaRecord.sparse(4, time.time(), fids, update))
        scores, seq = wait_for_seq(client, USER, ITEMS, 4)
        assert "rows (int8)" in server.log_path.read_text()
        wait_until(lambda: table_bytes_metric(server.metrics_url) > 0, "the table's bytes reported with its row type")
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-7)
    snapshot = list_snapshots(data)[-1]
    assert snapshot.name == f"{4:020d}" and struct.unpack_from("<I", (snapshot / "table.snap").read_bytes(), 8)[0] == 2
