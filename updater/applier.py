"""The hot-swap updater: a thread inside the ranker's process that applies deltas.

It tails the delta stream from the snapshot's sequence number and applies
records strictly in order, while requests keep being served:

    sparse   rows upserted into the live table in chunks of ``chunk_rows``
             (one chunk holds the table's writer well under a millisecond),
             then evicted FIDs deleted; readers never block (see server.cuckoo)
    dense    a new module built and loaded off the request path, then swapped
             in with one reference assignment; a batch reads runtime.dense once

``runtime.delta_seq`` moves to a record's seq only once that record is wholly
applied, so a response stamped with seq S reflects every record up to S.

A gap in sequence numbers, a record for an unknown table, a dim mismatch, a
dense state that does not fit the network, or a corrupt record halts the
updater: serving continues on the last good state, the reason is logged at
error level and exposed (``halted_reason``, metrics). Records at or below the
current seq (already in the snapshot) are skipped: absolute values make
replaying them harmless anyway.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from server.dense import build_dense
from server.segment_log import LogCorruptError
from updater.delta import DENSE, SPARSE, DeltaError, DeltaRecord
from updater.stream import DeltaReader

log = logging.getLogger(__name__)


class DeltaApplier:
    """Applies delta records to a RankerRuntime (table, dense, delta_seq).

    Args:
        runtime: the object serving requests; needs .table, .dense, .schema, .delta_seq.
        open_reader: after_seq -> DeltaReader, called once at start.
        poll_interval_s: sleep when the stream has nothing new.
        chunk_rows: rows per table upsert.
    """

    def __init__(self, runtime, open_reader: Callable[[int], DeltaReader], poll_interval_s: float = 0.005,
                 chunk_rows: int = 4096):
        self.runtime = runtime
        self._open_reader = open_reader
        self.poll_interval_s = poll_interval_s
        self.chunk_rows = chunk_rows
        self.rows_applied = 0
        self.rows_deleted = 0
        self.records_applied = 0
        self.records_rejected = 0
        self.dense_swaps = 0
        self.lag_s = 0.0
        self.halted_reason: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delta-applier", daemon=True)

    def start(self) -> "DeltaApplier":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        reader = self._open_reader(self.runtime.delta_seq)
        try:
            while not self._stop.is_set():
                try:
                    records = reader.read(max_records=64)
                except (DeltaError, LogCorruptError) as exc:
                    self._halt(f"corrupt delta record: {exc}")
                    return
                for record in records:
                    reason = self.apply(record)
                    if reason is not None:
                        self._halt(reason)
                        return
                if not records:
                    self._stop.wait(self.poll_interval_s)
        except Exception as exc:  # never die silently
            self._halt(f"updater crashed: {exc!r}")
            raise
        finally:
            reader.close()

    def apply(self, record: DeltaRecord) -> str | None:
        """Applies one record; returns why it was refused, or None."""
        runtime = self.runtime
        if record.seq <= runtime.delta_seq:
            return None
        if record.seq != runtime.delta_seq + 1:
            return f"gap in delta sequence: serving is at {runtime.delta_seq}, next record is {record.seq}"
        if record.kind == SPARSE:
            reason = self._apply_sparse(record)
        elif record.kind == DENSE:
            reason = self._apply_dense(record)
        else:
            reason = f"delta {record.seq}: unknown kind {record.kind}"
        if reason is not None:
            return reason
        runtime.delta_seq = record.seq
        self.records_applied += 1
        self.lag_s = max(0.0, time.time() - record.created_s)
        return None

    def _apply_sparse(self, record: DeltaRecord) -> str | None:
        table = self.runtime.table
        if record.table_id != 0:
            return f"delta {record.seq}: unknown table {record.table_id} (serving has table 0)"
        if record.fids.shape[0] and record.dim != table.dim:
            return f"delta {record.seq}: rows of dim {record.dim}, table requires {table.dim}"
        for start in range(0, record.fids.shape[0], self.chunk_rows):
            stop = start + self.chunk_rows
            table.upsert(record.fids[start:stop], record.values[start:stop], now=record.created_s)
        for start in range(0, record.evicted.shape[0], self.chunk_rows):
            self.rows_deleted += int(table.delete(record.evicted[start : start + self.chunk_rows]).sum())
        self.rows_applied += record.fids.shape[0]
        return None

    def _apply_dense(self, record: DeltaRecord) -> str | None:
        schema = self.runtime.schema
        model = build_dense(schema.num_fields, schema.dim, schema.dense)
        try:
            model.load_state_dict(record.dense_state, strict=True)
        except (RuntimeError, KeyError) as exc:
            return f"delta {record.seq}: dense state does not fit the network: {exc}"
        self.runtime.dense = model.eval()
        self.dense_swaps += 1
        return None

    def _halt(self, reason: str) -> None:
        self.halted_reason = reason
        self.records_rejected += 1
        log.error("delta updater halted, serving stays at delta_seq %d: %s", self.runtime.delta_seq, reason)
