"""``monolith-rt bench apply``: throughput of the updater path against encoding the same rows.

The rows are what a trainer emits: sparse records of ``rows_per_record``
rows (FIDs drawn from a pool of ``rows`` IDs, so a run both inserts new rows,
growing the table, and overwrites rows it already holds), written to a
delta stream on local disk first. Then, in the same run, one thread each:

    encode_rows_per_s   DeltaRecord.encode() of every record:
                        the trainer's side of the wire (the baseline)
    rows_per_s          the updater's side: FileDeltaReader.read (segment
                        log read, CRC, decode, sequence check) and
                        DeltaApplier.apply (validation, chunked upserts into
                        a live RankerRuntime's table) of every record

Inputs are generated and the kernels compiled before any timer starts.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from server.benchmarks import progress
from server.features import FeatureSchema
from server.runtime.ranker import RankerRuntime
from updater.applier import DeltaApplier
from server.streams.deltas import DeltaRecord
from server.streams.delta_log import FileDeltaReader, FileDeltaWriter


def _progress(message: str) -> None:
    progress("bench apply", message)


def bench_apply(schema: FeatureSchema, rows: int, dim: int, rows_per_record: int = 10_000, seed: int = 0) -> dict:
    if rows < rows_per_record or rows_per_record < 1 or dim < 1:
        raise ValueError(f"requires rows >= rows_per_record >= 1 and dim >= 1, got rows={rows} "
                         f"rows_per_record={rows_per_record} dim={dim}")
    schema = FeatureSchema(tuple(dataclasses.replace(s, dim=dim) for s in schema.slots), schema.dense)
    rng = np.random.default_rng(seed)
    _progress(f"generating {rows:,} rows (dim {dim}) in records of {rows_per_record:,}")
    pool = rng.integers(1, 2**63 - 1, rows, dtype=np.int64).view(np.uint64)
    fids = rng.choice(pool, rows)
    values = rng.standard_normal((rows, dim), dtype=np.float32) * 0.1
    bounds = list(range(0, rows, rows_per_record)) + [rows]
    work = Path(tempfile.mkdtemp(prefix="monolith-bench-apply-"))
    try:
        records = [DeltaRecord.sparse(seq, 1.0, fids[a:b], values[a:b])
                   for seq, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]), start=1)]
        t0 = time.perf_counter()
        encoded = [record.encode() for record in records]
        encode_s = time.perf_counter() - t0
        _progress(f"writing {len(records)} records to a delta stream")
        with FileDeltaWriter(work / "deltas") as writer:
            for record in records:
                writer.append(record)
        _progress("compiling kernels (warm-up)")
        warm = RankerRuntime(schema, work / "warm", "warm")
        DeltaApplier(warm, None).apply(DeltaRecord.decode(encoded[0]))
        warm.close(snapshot=False)

        runtime = RankerRuntime(schema, work / "serve", "bench")
        applier = DeltaApplier(runtime, None)
        reader = FileDeltaReader(work / "deltas")
        t0 = time.perf_counter()
        while records := reader.read(max_records=16):
            for record in records:
                reason = applier.apply(record)
                if reason is not None:
                    raise RuntimeError(f"bench apply: record refused: {reason}")
        apply_s = time.perf_counter() - t0
        reader.close()
        table_rows = len(runtime.table)
        runtime.close(snapshot=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if runtime.delta_seq != len(encoded):
        raise RuntimeError(f"bench apply: applied up to seq {runtime.delta_seq}, wrote {len(encoded)}")
    return {"rows": rows, "dim": dim, "rows_per_record": rows_per_record, "records": len(encoded),
            "table_rows": table_rows, "rows_per_s": round(rows / apply_s), "encode_rows_per_s": round(rows / encode_s),
            "apply_s": round(apply_s, 3), "encode_s": round(encode_s, 3)}
