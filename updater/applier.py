"""The hot-swap updater: a thread inside the ranker's process that applies deltas.

It tails the delta stream from the snapshot's sequence number and applies
records strictly in order, while requests keep being served. Between records
it waits on the reader (the file log's reader wakes when the trainer appends:
server.streams.watch), so a record is applied as soon as it lands and an idle
updater wakes ten times a second; a reader that cannot wait is polled.

    sparse   rows upserted into the live table in chunks of ``chunk_rows``
             (one chunk holds the table's writer well under a millisecond),
             then evicted FIDs deleted; readers never block (see server.table.cuckoo)
    dense    the record's dense state checked against the network (names,
             shapes, finite: server.dense.fit_dense_state) off the request
             path, then swapped in with one reference assignment; a batch
             reads runtime.dense once

``runtime.delta_seq`` moves to a record's seq only once that record is wholly
applied, so a response stamped with seq S reflects every record up to S.

A gap in sequence numbers, a record for an unknown table, a dim mismatch, a
row with NaN or Inf, a dense state that does not fit the network, a corrupt
record or a stream that cannot be opened or read *halts* the updater:
serving continues on the last good state, the reason is logged at error
level and exposed (``halted_reason``, ``halted``, metrics). A sparse record
is checked whole before its first row is written, so a refused record leaves
no row of it behind; a failure while writing (none is expected) halts, and
the retry applies the record again whole (absolute values). Records at or
below the current seq (already in the snapshot) are skipped.

Healing: after a halt the updater reopens the stream at its seq and tries
again, ``retry_delays_s`` apart; when those retries are spent it loads the
newest snapshot past its seq (``load_snapshot``: one that covers the gap or
the bad record), swaps its table and dense weights in (one reference
assignment each, requests keep being served) and follows the stream from
there. With no such snapshot yet it keeps trying every
``retry_delays_s[-1]`` seconds. ``halted`` is true from a halt until a
record is applied or a snapshot loaded again, and while the thread is dead.
Counters: ``halts``, ``snapshot_reloads``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np

from server.dense import fit_dense_state
from server.streams import LogCorruptError
from server.table import EMPTY_KEY, EmbeddingTable
from server.table.quantize import FP16_MAX
from server.streams.deltas import DENSE, SPARSE, DeltaError, DeltaRecord
from server.streams.delta_log import DeltaReader

log = logging.getLogger(__name__)


class DeltaApplier:
    """Applies delta records to a RankerRuntime (table, dense, delta_seq).

    Args:
        runtime: the object serving requests; needs .table, .dense, .schema, .delta_seq.
        open_reader: after_seq -> DeltaReader, called at start and after each halt.
        load_snapshot: () -> the newest readable server.streams.snapshots.Snapshot, or None.
        poll_interval_s: sleep when the stream has nothing new and its reader cannot wait for a record.
        idle_wait_s: the longest wait on a reader that can (a stop is seen within it).
        chunk_rows: rows per table upsert.
        retry_delays_s: waits before each retry after a halt; then a snapshot reload.
    """

    def __init__(self, runtime, open_reader: Callable[[int], DeltaReader], poll_interval_s: float = 0.005,
                 chunk_rows: int = 4096, load_snapshot: Callable[[], object] | None = None,
                 retry_delays_s: tuple[float, ...] = (0.1, 0.5, 2.0), idle_wait_s: float = 0.1):
        if not retry_delays_s or min(retry_delays_s) <= 0:
            raise ValueError(f"retry_delays_s requires one or more delays > 0, got {retry_delays_s}")
        self.runtime = runtime
        self._open_reader = open_reader
        self._load_snapshot = load_snapshot
        self.poll_interval_s = poll_interval_s
        self.idle_wait_s = idle_wait_s
        self.chunk_rows = chunk_rows
        self.retry_delays_s = tuple(retry_delays_s)
        self.rows_applied = 0
        self.rows_deleted = 0
        self.records_applied = 0
        self.records_rejected = 0
        self.dense_swaps = 0
        self.halts = 0
        self.snapshot_reloads = 0
        self.lag_s = 0.0
        self.halted_reason: str | None = None
        self.warm_up_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delta-applier", daemon=True)

    @classmethod
    def following(cls, runtime) -> "DeltaApplier":
        """The applier a serving runtime runs: it follows the runtime's delta stream and heals from its
        newest snapshot (the model adapter passes this as RankerRuntime's ``make_applier``)."""
        return cls(runtime, runtime.streams.open_delta_reader, load_snapshot=runtime.newest_snapshot)

    def start(self) -> "DeltaApplier":
        self.warm_up_s = self.warm_up()
        self._thread.start()
        return self

    def warm_up(self) -> float:
        """Checks and writes a scratch sparse record (decoded, as the stream's are) into a scratch table of
        the serving dim, so that numba compiles (or loads) the write path now, not on the first real delta:
        on empty caches that took 2-4 s, with the first click's row waiting. Returns the seconds."""
        started = time.perf_counter()
        dim, row_dtype = self.runtime.table.dim, self.runtime.table.row_dtype
        fids = np.array([1, 2], np.uint64)
        # through its bytes: decoded arrays are read-only, and numba compiles those apart from writable ones
        record = DeltaRecord.decode(DeltaRecord.sparse(1, time.time(), fids, np.zeros((2, dim), np.float32),
                                                       fids[1:]).encode())
        if sparse_fault(record, row_dtype) is None:
            write_sparse(EmbeddingTable(dim, row_dtype=row_dtype), record.fids, record.values, record.evicted,
                         record.created_s)
        return time.perf_counter() - started

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started (a shared table's reader starts it on takeover)
            self._thread.join(timeout_s)

    def catch_up(self) -> None:
        """Applies, on the caller's thread, the records already in the stream
        after the current seq (call before ``start``: a server then answers its
        first request at the stream's end, never behind what it served before a
        restart). Stops quietly at the end of the stream or at the first fault;
        the thread, once started, deals with that fault as usual."""
        try:
            reader = self._open_reader(self.runtime.delta_seq)
        except Exception as exc:
            log.warning("delta catch-up could not open the stream: %r", exc)
            return
        try:
            while records := reader.read(max_records=64):
                for record in records:
                    if self.apply(record) is not None:
                        return
        except Exception as exc:
            log.warning("delta catch-up stopped at delta_seq %d: %r", self.runtime.delta_seq, exc)
        finally:
            reader.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def halted(self) -> bool:
        """Not applying: halted and not yet healed, or the thread is not running when it should."""
        return self.halted_reason is not None or (not self._stop.is_set() and not self.running
                                                  and self._thread.ident is not None)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            applied = self.records_applied
            reason = self._follow()
            if reason is None:
                return  # stopped
            if self.records_applied > applied:
                failures = 0  # it moved on since the last halt: a new fault
            self._halt(reason, first=failures == 0)
            if failures < len(self.retry_delays_s):
                delay = self.retry_delays_s[failures]
                failures += 1
            else:
                delay = self.retry_delays_s[-1]
                if self._reload_snapshot():
                    failures = 0
                    continue
            self._stop.wait(delay)

    def _follow(self) -> str | None:
        """Tails the stream from the current seq until stopped (None) or a halt (its reason)."""
        try:
            reader = self._open_reader(self.runtime.delta_seq)
        except Exception as exc:
            return f"cannot open the delta stream after seq {self.runtime.delta_seq}: {exc!r}"
        try:
            while not self._stop.is_set():
                try:
                    records = reader.read(max_records=64)
                except (DeltaError, LogCorruptError) as exc:
                    return f"corrupt delta record: {exc}"
                for record in records:
                    reason = self.apply(record)
                    if reason is not None:
                        return reason
                    self.halted_reason = None
                if not records:
                    self._wait(reader)
            return None
        except Exception as exc:  # a reader or table failure: never die silently
            log.exception("delta updater failed")
            return f"updater failed: {exc!r}"
        finally:
            reader.close()

    def _wait(self, reader) -> None:
        """Until the stream may hold a new record: a reader that can wait (``wait``: the file log wakes when
        the trainer appends) is waited on, ``idle_wait_s`` at most so that a stop is seen; others are polled."""
        wait = getattr(reader, "wait", None)
        if wait is None:
            self._stop.wait(self.poll_interval_s)
        else:
            wait(self.idle_wait_s)

    def _reload_snapshot(self) -> bool:
        """Loads the newest snapshot past the current seq, if there is one; True if it did."""
        if self._load_snapshot is None:
            return False
        try:
            snapshot = self._load_snapshot()
        except Exception as exc:
            log.error("delta updater: loading a snapshot failed: %r", exc)
            return False
        runtime = self.runtime
        if snapshot is None or snapshot.delta_seq <= runtime.delta_seq:
            return False
        if snapshot.table.dim != runtime.table.dim:
            log.error("delta updater: snapshot %s has dim %d, serving requires %d", snapshot.path,
                      snapshot.table.dim, runtime.table.dim)
            return False
        dense = self._fit_dense(snapshot.dense_state)
        if isinstance(dense, str):
            log.error("delta updater: snapshot %s: %s", snapshot.path, dense)
            return False
        runtime.table = snapshot.table
        runtime.dense = dense
        previous, runtime.delta_seq = runtime.delta_seq, snapshot.delta_seq
        self.snapshot_reloads += 1
        self.halted_reason = None
        log.warning("delta updater healed: loaded snapshot %s (delta_seq %d -> %d)", snapshot.path, previous,
                    snapshot.delta_seq)
        return True

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
        reason = sparse_fault(record, table.row_dtype)
        if reason is not None:
            return reason
        self.rows_deleted += write_sparse(table, record.fids, record.values, record.evicted, record.created_s,
                                          self.chunk_rows)
        self.rows_applied += record.fids.shape[0]
        return None

    def _apply_dense(self, record: DeltaRecord) -> str | None:
        dense = self._fit_dense(record.dense_state)
        if isinstance(dense, str):
            return f"delta {record.seq}: {dense}"
        self.runtime.dense = dense
        self.dense_swaps += 1
        return None

    def _fit_dense(self, state):
        """``state`` as the network's weights (server.dense), or why it does not fit."""
        schema = self.runtime.schema
        try:
            return fit_dense_state(state, schema.num_fields, schema.dim, schema.dense)
        except ValueError as exc:
            return str(exc)

    def _halt(self, reason: str, first: bool) -> None:
        """Counts a fault once (``first``), however often it is retried."""
        self.halted_reason = reason
        if first:
            self.halts += 1
            self.records_rejected += 1
        log.error("delta updater halted, serving stays at delta_seq %d: %s", self.runtime.delta_seq, reason)


def write_sparse(table, fids: np.ndarray, rows: np.ndarray, evicted: np.ndarray, now: float,
                 chunk_rows: int = 4096) -> int:
    """A sparse record's effect on a table: rows upserted (absolute values, in chunks so
    that a reader never waits long on one call), then evicted FIDs deleted. Returns how
    many of ``evicted`` were present."""
    for start in range(0, fids.shape[0], chunk_rows):
        table.upsert(fids[start:start + chunk_rows], rows[start:start + chunk_rows], now=now)
    deleted = 0
    for start in range(0, evicted.shape[0], chunk_rows):
        deleted += int(table.delete(evicted[start:start + chunk_rows]).sum())
    return deleted


def sparse_fault(record: DeltaRecord, row_dtype: str = "fp32") -> str | None:
    """Why a sparse record must not be applied to a table of ``row_dtype`` (checked whole, before any
    row is written), or None."""
    if np.any(record.fids == EMPTY_KEY) or np.any(record.evicted == EMPTY_KEY):
        return f"delta {record.seq}: holds the reserved FID 2**64-1"
    bad = ~np.isfinite(record.values).all(axis=1)
    if np.any(bad):
        first = int(np.flatnonzero(bad)[0])
        return (f"delta {record.seq}: {int(bad.sum())} rows hold NaN or Inf (first: FID {int(record.fids[first])}); "
                f"requires finite values")
    if row_dtype == "fp16":
        over = (np.abs(record.values) > FP16_MAX).any(axis=1)
        if np.any(over):
            first = int(np.flatnonzero(over)[0])
            return (f"delta {record.seq}: {int(over.sum())} rows hold values beyond fp16's +-{FP16_MAX:g} (first: "
                    f"FID {int(record.fids[first])}), which this fp16 table cannot store; serve with "
                    f"--row-dtype int8 or fp32")
    return None
