"""What a server holds after replaying a delta stream from seq 1: the reference the rollback tests compare to."""

from pathlib import Path

from server.dense import initial_dense_state
from server.features import shipped_schema
from server.streams.deltas import DENSE
from updater.tools import scan

SCHEMA = shipped_schema()


def stream_state(deltas: Path, until_seq: int | None = None) -> tuple[dict[int, bytes], dict]:
    """({fid: row bytes}, dense state) after records 1..until_seq (all when None); the dense weights
    start as the schema's seeded ones, as a server with no snapshot starts."""
    rows, dense = {}, initial_dense_state(SCHEMA.num_fields, SCHEMA.dim, SCHEMA.dense)
    for _, _, _, record in scan(deltas):
        if until_seq is not None and record.seq > until_seq:
            break
        if record.kind == DENSE:
            dense = record.dense_state
            continue
        rows.update((f, r.tobytes()) for f, r in zip(record.fids.tolist(), record.values))
        for f in record.evicted.tolist():
            rows.pop(f, None)
    return rows, dense
