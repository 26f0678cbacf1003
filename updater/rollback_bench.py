"""``monolith-rt bench rollback``: what a rollback costs, per bus.

A stream is written first (not timed): ``records`` sparse records of
``rows_per_record`` rows (FIDs from a pool of ``pool`` IDs), a dense record
and a serving snapshot after the first quarter, the target S at the half.
Then, per bus (local segment files; a spawned 3-node JetStream cluster):

    plan_s            updater.rollback.plan_rollback: the base snapshot (local
                      directory / object store), the records after S to find
                      the rows changed since, the records base..S to fold
    apply_s           appending the plan's records through the bus's writer
                      (fenced on JetStream)
    rows_changed_since_s   rows restored or deleted
    records_replayed  stream records the plan read (after S, and base..S)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from server.benchmarks import progress
from server.features import FeatureSchema
from server.dense import initial_dense_state
from server.streams import Streams
from server.streams.deltas import DeltaRecord
from server.streams.snapshots import write_snapshot
from server.table import EmbeddingTable
from updater.rollback import append_rollback, history_of, plan_rollback


def _progress(message: str) -> None:
    progress("bench rollback", message)


def _write(streams, data_dir: Path, schema: FeatureSchema, records: int, rows_per_record: int, pool: int,
           seed: int) -> tuple[int, int, object, int]:
    """Writes the stream; returns (base seq, S, the open writer, the first seq written)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 2**63 - 1, pool, dtype=np.int64).view(np.uint64)
    writer = streams.open_delta_writer()
    table = EmbeddingTable(schema.dim)
    dense = initial_dense_state(schema.num_fields, schema.dim, schema.dense)
    first = writer.next_seq
    base = s = None
    for k in range(records):
        fids = np.unique(rng.choice(ids, rows_per_record))
        rows = rng.standard_normal((fids.shape[0], schema.dim), dtype=np.float32) * 0.1
        writer.append(DeltaRecord.sparse(writer.next_seq, time.time(), fids, rows))
        table.upsert(fids, rows, now=time.time())
        if k == records // 4:
            writer.append(DeltaRecord.dense(writer.next_seq, time.time(), dense))
            base = writer.next_seq - 1
            path = write_snapshot(data_dir, table, dense, base)
            streams.publish_snapshot(path, base)
        if k == records // 2:
            s = writer.next_seq - 1
    return base, s, writer, first


def _one(bus: str, schema: FeatureSchema, records: int, rows_per_record: int, pool: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-rollback-{bus}-") as tmp:
        root = Path(tmp)
        cluster = None
        if bus == "local":
            streams = Streams(root / "data")
        else:
            from server.streams.jetstream import BusConfig, JetStreamStreams
            from server.streams.nats_cluster import NatsCluster

            _progress("starting a 3-node nats-server cluster")
            cluster = NatsCluster(root / "nats").start()
            streams = JetStreamStreams(root / "data", BusConfig(url=cluster.url,
                                                                credentials=str(cluster.credentials("trainer"))))
            streams.ensure_streams()
        try:
            _progress(f"{bus}: writing {records} records of {rows_per_record:,} rows")
            base, s, writer, first = _write(streams, root / "data", schema, records, rows_per_record, pool, seed)
            last = writer.next_seq - 1
            started = time.perf_counter()
            plan = plan_rollback(history_of(root / "data", None if bus == "local" else streams, last), s, schema)
            planned = time.perf_counter()
            seqs = append_rollback(writer, plan)
            applied = time.perf_counter()
            writer.close()
            return {"rows_changed_since_s": int(plan.fids.shape[0]), "rows_restored": int(plan.found.sum()),
                    "rows_deleted": int((~plan.found).sum()), "records_replayed": (last - s) + (s - base),
                    "records_after_s": last - s, "base_seq": base, "to_seq": s, "last_seq": last,
                    "rollback_records": len(seqs), "plan_s": round(planned - started, 3),
                    "apply_s": round(applied - planned, 3), "first_seq": first}
        finally:
            if bus != "local":
                streams.close()
            if cluster is not None:
                cluster.stop()


def bench_rollback(schema: FeatureSchema, buses: list[str], records: int = 40, rows_per_record: int = 5000,
                   pool: int = 200_000, seed: int = 0) -> dict:
    if records < 4 or rows_per_record < 1 or pool < 1:
        raise ValueError(f"requires records >= 4, rows_per_record >= 1, pool >= 1; got records={records} "
                         f"rows_per_record={rows_per_record} pool={pool}")
    out = {"config": {"records": records, "rows_per_record": rows_per_record, "pool": pool, "dim": schema.dim,
                      "seed": seed, "nats": "3-node cluster on loopback, 3 replicas per stream"}}
    for bus in buses:
        out[bus] = _one(bus, schema, records, rows_per_record, pool, seed)
    return out
