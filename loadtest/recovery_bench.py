"""``monolith-rt bench recovery``: how long a restarted server takes to serve current state.

Builds, before any timer, a serving snapshot of ``rows`` rows at delta_seq 0
and ``seconds`` worth of sparse deltas after it (``rows_per_s`` rows a
second, one record per 100 ms, FIDs drawn from the snapshot's and new
ones). Then times a server start on that data dir: launch -> ready (the
snapshot is loaded during model initialisation) -> the first response whose
delta_seq is the last record's (replay done). The same server start on an
empty data dir, in the same run, is the baseline.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from server.client import RankerClient
from server.dense import initial_dense_state
from server.features import FeatureSchema
from server.host.launcher import TritonServer
from server.streams.snapshots import write_snapshot
from server.table import EmbeddingTable
from server.streams.deltas import DeltaRecord
from server.streams.delta_log import FileDeltaWriter
from server.streams import DELTAS, Streams


def _timed_start(data_dir: Path, schema: FeatureSchema, last_seq: int) -> dict:
    user, items = schema.encode_request({"user_id": 1}, [{"item_id": 1}])
    t0 = time.perf_counter()
    server = TritonServer(data_dir).start()
    ready = time.perf_counter() - t0
    try:
        with RankerClient(server.grpc_url, "grpc") as client:
            while client.rank(user, items, request_id=b"recovery")[1] < last_seq:
                time.sleep(0.01)
        caught_up = time.perf_counter() - t0
    finally:
        server.stop()
    return {"ready_s": round(ready, 2), "caught_up_s": round(caught_up, 2)}


def bench_recovery(schema: FeatureSchema, rows: int, seconds: float, rows_per_s: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="monolith-recovery-") as tmp:
        data = Path(tmp) / "data"
        print(f"[bench recovery] snapshot of {rows:,} rows", file=sys.stderr, flush=True)
        fids = np.unique(rng.integers(1, 2**62, rows, dtype=np.uint64))
        table = EmbeddingTable(schema.dim, capacity=int(len(fids) / 0.9))
        table.upsert(fids, rng.standard_normal((len(fids), schema.dim), dtype=np.float32), now=1.0)
        write_snapshot(data, table, initial_dense_state(schema.num_fields, schema.dim, schema.dense), delta_seq=0)
        records = int(seconds * 10)
        per_record = max(1, int(rows_per_s / 10))
        print(f"[bench recovery] {records} delta records of {per_record} rows ({seconds:.0f} s at "
              f"{rows_per_s:,.0f} rows/s)", file=sys.stderr, flush=True)
        with FileDeltaWriter(Streams(data).path(DELTAS)) as writer:
            for seq in range(1, records + 1):
                pick = np.concatenate([rng.choice(fids, per_record // 2),
                                       rng.integers(1, 2**62, per_record - per_record // 2, dtype=np.uint64)])
                writer.append(DeltaRecord.sparse(seq, time.time(), pick,
                                                 rng.standard_normal((len(pick), schema.dim), dtype=np.float32)))
        print("[bench recovery] restarting a server on it", file=sys.stderr, flush=True)
        recovered = _timed_start(data, schema, records)
        print("[bench recovery] baseline: a server on an empty data dir", file=sys.stderr, flush=True)
        empty = _timed_start(Path(tmp) / "empty", schema, 0)
    return {"rows": int(len(fids)), "delta_records": records, "delta_rows": records * per_record,
            "recovery_ready_s": recovered["ready_s"], "recovery_s": recovered["caught_up_s"],
            "empty_start_s": empty["caught_up_s"]}
