"""Rollback: records that put every server back at the state of an earlier seq,
and the control file through which an operator (or the guard) steers a
running trainer.

State at seq S: the newest base at or before S (a serving snapshot at P <= S
whose successors P+1.. are all still in the stream, or the empty table and
the seeded dense weights when the stream still starts at seq 1), then every
record P+1..S folded in. Only the rows that records after S touched (written
or evicted), plus any ``extra_fids`` a caller names, are rebuilt, so the
cost is the records read, not the table size::

    affected = fids written or evicted by records S+1..last  (+ extra_fids)
    value_S(f) = base(f), then for seq in P+1..S: written -> row, evicted -> absent
    rollback = sparse(rows of affected present at S, deletes for the rest)
               + dense(dense at S)    always: the trainer's dense weights may have
                                      moved since S without being emitted yet

Where the past is read (``history_of``): on the local bus the segment files
and snapshots of the data directory (LocalHistory); on JetStream the bus
itself (BusHistory): the snapshot at or before S from the object store, the
records since from the DELTAS stream. Either way the rollback goes out as
ordinary delta records through the bus's writer (fenced on JetStream).

The rollback records are ordinary delta records (absolute values), appended
at the head of the stream: servers apply them like any delta, a server that
replays the stream from any snapshot ends in the same state, and a rollback
cut short by a crash is repaired by running it again (every value in it is
absolute, and the records it left are themselves "after S").

Retained range: [lowest base seq, last seq] (a base: seq 0 while the stream
still starts at seq 1, or a snapshot whose later records are all retained),
the same range in the refusal's message, in `retained_range` and in the
README; a target outside it is refused.

Control file ``<data_dir>/guard/control.json`` (written to a temp file,
fsynced, renamed): ``{"hold": bool, "request": int, "rollback_to_seq": int
| null, "rollback_request": int}``. ``request`` grows by one per operator
command; ``rollback_request`` is the request of the latest rollback (hold
and resume leave it). The trainer polls the file and records the last
request and the last rollback request it carried out in
``<data_dir>/guard/state.json`` beside its guard state (same atomic write),
so a restarted trainer neither repeats a rollback nor misses one.

A rollback while no trainer runs is appended here *and* recorded as a
request: the next trainer to start reconciles the stream to its checkpoint
(trainer.online.reconcile, which would undo the rollback) and then carries
out the recorded rollback, so servers and trainer both end at the state at
S.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.dense import initial_dense_state
from server.durable import fsync_path
from server.features import FeatureSchema
from server.streams.snapshots import list_snapshots, load_snapshot
from server.streams import DELTAS, SNAPSHOTS, Streams, open_streams
from server.streams.bus import FencedError
from server.streams.segments import list_segments
from server.streams.deltas import DENSE, DeltaRecord
from server.streams.delta_log import FileDeltaReader, FileDeltaWriter, read_through

GUARD_DIR = "guard"
ROWS_PER_RECORD = 100_000
CONTROL = "control.json"
STATE = "state.json"


class RollbackRangeError(ValueError):
    """A rollback target outside the retained range of the stream."""


@dataclass
class RestorePlan:
    """The state at ``to_seq`` of the rows that changed after it.

    fids uint64[n], found bool[n], rows float32[n, K] (zeros where not found);
    dense_state: the dense weights at to_seq (None only in plans built by hand)."""

    to_seq: int
    last_seq: int
    fids: np.ndarray
    found: np.ndarray
    rows: np.ndarray
    dense_state: dict[str, np.ndarray] | None

    def records(self, next_seq: int, created_s: float | None = None,
                rows_per_record: int = ROWS_PER_RECORD) -> list[DeltaRecord]:
        """The rollback as delta records numbered from ``next_seq``: the restored rows in records of at most
        ``rows_per_record`` (a record stays far below the log's 64 MiB payload limit), the deletes with the
        last of them, then the dense weights."""
        created_s = time.time() if created_s is None else created_s
        fids, rows, gone = self.fids[self.found], self.rows[self.found], self.fids[~self.found]
        starts = range(0, max(1, fids.shape[0]), rows_per_record)
        out = [DeltaRecord.sparse(next_seq + k, created_s, fids[a:a + rows_per_record], rows[a:a + rows_per_record],
                                  gone if k == len(starts) - 1 else ()) for k, a in enumerate(starts)]
        if self.dense_state is not None:
            out.append(DeltaRecord.dense(next_seq + len(out), created_s, self.dense_state))
        return out

    def summary(self) -> str:
        return (f"rollback to seq {self.to_seq} (stream at {self.last_seq}): {int(self.found.sum())} rows restored, "
                f"{int((~self.found).sum())} deleted" + (", dense weights restored" if self.dense_state is not None
                                                         else ""))


def _deltas(data_dir) -> Path:
    return Streams(data_dir).path(DELTAS)


class LocalHistory:
    """The delta history of ``data_dir``'s local segment files and snapshots."""

    def __init__(self, data_dir):
        self.data_dir = Path(data_dir)
        self.where = str(_deltas(data_dir))

    def span(self) -> tuple[list[int], int]:
        """(seqs a state can be rebuilt from: 0 for an unpruned stream, and snapshots with every later
        record retained; the last seq)."""
        directory = _deltas(self.data_dir)
        firsts = list_segments(directory) if directory.is_dir() else []
        first_seq = firsts[0] + 1 if firsts else 1
        last = 0
        for record in self.records(max(0, (firsts[-1] if firsts else 0))):
            last = record.seq
        last = max(last, first_seq - 1)
        bases = [0] if first_seq <= 1 else []
        bases += [int(p.name) for p in list_snapshots(self.data_dir) if first_seq - 1 <= int(p.name) <= last]
        return bases, last

    def load_base(self, seq: int):
        return load_snapshot(Streams(self.data_dir).path(SNAPSHOTS) / f"{seq:020d}")

    def records(self, after_seq: int, until_seq: int | None = None):
        reader = FileDeltaReader(_deltas(self.data_dir), after_seq=after_seq)
        try:
            while records := reader.read(max_records=256):
                for record in records:
                    if until_seq is not None and record.seq > until_seq:
                        return
                    yield record
        finally:
            reader.close()


class BusHistory:
    """The delta history on a JetStream bus: snapshots from its object store, records from its DELTAS
    stream (``last_seq``: the writer's last seq when the caller holds the writer, else the stream head)."""

    READ_TIMEOUT_S = 60.0

    def __init__(self, streams, last_seq: int | None = None):
        self.streams = streams
        self.where = "the JetStream delta stream MONOLITH_DELTAS and snapshot store"
        self._last = last_seq

    def span(self) -> tuple[list[int], int]:
        last = self.streams.delta_head()[0] if self._last is None else self._last
        first = self.streams.delta_first()
        pointer = self.streams.snapshot_pointer()
        first_seq = first if first is not None else (pointer["seq"] + 1 if pointer else 1)
        last = max(last, first_seq - 1)
        bases = [0] if first_seq <= 1 else []
        bases += [seq for seq in self.streams.snapshots.seqs() if first_seq - 1 <= seq <= last]
        return sorted(set(bases)), last

    def load_base(self, seq: int):
        with tempfile.TemporaryDirectory(prefix="rollback-") as tmp:
            return load_snapshot(self.streams.snapshots.download(seq, Path(tmp) / f"{seq:020d}"))

    def records(self, after_seq: int, until_seq: int | None = None):
        until = self.span()[1] if until_seq is None else until_seq
        reader = self.streams.open_delta_reader(after_seq)
        try:
            yield from read_through(reader, after_seq, until, self.READ_TIMEOUT_S, f"rollback: {self.where}")
        finally:
            reader.close()


def history_of(data_dir, streams=None, last_seq: int | None = None):
    """Where a rollback reads the past: the bus's own history on JetStream, else the local files."""
    if streams is None or type(streams) is Streams:
        return LocalHistory(data_dir)
    return BusHistory(streams, last_seq)


def retained_range(history) -> tuple[int, int]:
    """(lowest seq whose state can be rebuilt, last seq in the stream): the only targets a rollback
    accepts. ``history``: a LocalHistory/BusHistory or a data directory (local)."""
    bases, last = _history(history).span()
    return (min(bases) if bases else last + 1), last


def _history(history):
    return history if isinstance(history, (LocalHistory, BusHistory)) else LocalHistory(history)


def range_error(history, low: int, last: int, to_seq: int) -> RollbackRangeError:
    return RollbackRangeError(f"rollback target requires a seq in the retained range {low}..{last} of "
                              f"{history.where}, got {to_seq}" + (" (the stream is empty)" if last == 0 else "")
                              + "; the range runs from the oldest base (seq 0 while the stream starts at seq 1, "
                              "or a snapshot whose later records are all retained) to the last seq")


def plan_rollback(history, to_seq: int, schema: FeatureSchema, extra_fids=()) -> RestorePlan:
    """The state at ``to_seq`` of every row changed after it (and of ``extra_fids``), and the dense
    weights at ``to_seq`` (always: the trainer's may have moved since without being emitted).
    ``history``: a LocalHistory/BusHistory or a data directory (local).
    Raises RollbackRangeError when to_seq is outside the retained range."""
    history = _history(history)
    bases, last = history.span()
    low = min(bases) if bases else last + 1
    if not low <= to_seq <= last:
        raise range_error(history, low, last, to_seq)
    touched = [np.asarray(extra_fids, dtype=np.uint64)]
    for record in history.records(to_seq, until_seq=last):
        if record.kind != DENSE:
            touched += [record.fids, record.evicted]
    fids = np.unique(np.concatenate(touched))
    base = max(b for b in bases if b <= to_seq)
    if base > 0:
        snapshot = history.load_base(base)
        rows, found = snapshot.table.lookup_found(fids)
        rows = rows.copy()
        dense = snapshot.dense_state
    else:
        rows, found = np.zeros((fids.shape[0], schema.dim), np.float32), np.zeros(fids.shape[0], np.bool_)
        dense = initial_dense_state(schema.num_fields, schema.dim, schema.dense)
    for record in history.records(base, until_seq=to_seq):
        if record.kind == DENSE:
            dense = record.dense_state
            continue
        if not fids.shape[0]:
            continue
        at = np.searchsorted(fids, record.fids)
        hit = (at < fids.shape[0]) & (fids[np.minimum(at, fids.shape[0] - 1)] == record.fids)
        rows[at[hit]] = record.values[hit]
        found[at[hit]] = True
        found[np.isin(fids, record.evicted)] = False
    rows[~found] = 0.0
    return RestorePlan(to_seq, last, fids, found, rows, {k: v.copy() for k, v in dense.items()})


def append_rollback(writer, plan: RestorePlan) -> list[int]:
    """Appends the plan's records; returns their seqs."""
    return [writer.append(record) for record in plan.records(writer.next_seq)]


# ------------------------------------------------------------------ control file

def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}); requires the JSON this module writes") from None


def read_control(data_dir) -> dict:
    """{"hold", "request", "rollback_to_seq", "rollback_request"} (defaults when no file)."""
    return {"hold": False, "request": 0, "rollback_to_seq": None, "rollback_request": 0,
            **(_read_json(Path(data_dir) / GUARD_DIR / CONTROL) or {})}


def write_control(data_dir, hold: bool | None = None, rollback_to_seq: int | None = None) -> dict:
    """Records an operator command durably; returns the new control (its ``request`` numbers it)."""
    control = read_control(data_dir)
    control["request"] += 1
    if hold is not None:
        control["hold"] = hold
    if rollback_to_seq is not None:
        control["rollback_to_seq"], control["rollback_request"] = rollback_to_seq, control["request"]
    _write_json(Path(data_dir) / GUARD_DIR / CONTROL, control)
    return control


def read_state(data_dir) -> dict | None:
    return _read_json(Path(data_dir) / GUARD_DIR / STATE)


def write_state(data_dir, state: dict) -> None:
    _write_json(Path(data_dir) / GUARD_DIR / STATE, state)


# ------------------------------------------------------------------ operator commands

def rollback_now(data_dir, to_seq: int, schema: FeatureSchema, wait_s: float = 30.0, streams=None) -> str:
    """``deltas rollback --to-seq S``, on the configured bus (``streams``: default ``open_streams``).
    With no trainer holding the delta stream (its file lock, or on JetStream its lease), the
    rollback records are appended here; with one, the request goes through the control file and
    this waits (up to ``wait_s``) for the trainer to carry it out (it also restores its own rows,
    so it does not re-emit what was undone). Returns what was done; raises RollbackRangeError,
    TimeoutError or BusError."""
    owned = streams is None
    streams = open_streams(data_dir) if owned else streams
    try:
        local = type(streams) is Streams
        try:
            writer = streams.open_delta_writer(**({} if local else {"lease_wait_s": 0.0}))
        except (BlockingIOError, FencedError):
            writer = None
        if writer is not None:
            try:
                plan = plan_rollback(history_of(data_dir, streams, writer.next_seq - 1), to_seq, schema)
                seqs = append_rollback(writer, plan)
                write_control(data_dir, rollback_to_seq=to_seq)  # for the next trainer to adopt
            finally:
                writer.close()
            return (f"{plan.summary()}; appended as seq {seqs[0]}..{seqs[-1]}; no trainer running: the next one "
                    f"to start adopts the state at seq {to_seq}")
        history = history_of(data_dir, streams)
        low, last = retained_range(history)
        if not low <= to_seq <= last:  # refuse before asking the trainer
            raise range_error(history, low, last, to_seq)
    finally:
        if owned:
            streams.close()
    request = write_control(data_dir, rollback_to_seq=to_seq)["request"]
    return f"trainer running: {wait_for_trainer(data_dir, request, wait_s)}"


def wait_for_trainer(data_dir, request: int, wait_s: float) -> str:
    """The trainer's report on control request ``request``, once it has carried it out."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        state = read_state(data_dir) or {}
        if state.get("request", 0) >= request:
            return state.get("last_action", "done")
        time.sleep(0.1)
    raise TimeoutError(f"the trainer did not carry out control request {request} within {wait_s} s "
                       f"(it stays recorded in {Path(data_dir) / GUARD_DIR / CONTROL}; is the trainer alive?)")


def set_hold(data_dir, hold: bool, wait_s: float = 5.0) -> str:
    """``deltas hold|resume``: recorded durably; a running trainer acts on it within a poll, a
    trainer started later starts in that state."""
    request = write_control(data_dir, hold=hold)["request"]
    verb = "hold" if hold else "resume"
    try:
        FileDeltaWriter(_deltas(data_dir)).close()
    except BlockingIOError:
        try:
            return f"{verb}: {wait_for_trainer(data_dir, request, wait_s)}"
        except TimeoutError as exc:
            return f"{verb} recorded; {exc}"
    return (f"{verb} recorded in {Path(data_dir) / GUARD_DIR / CONTROL}: no trainer is running; the next one "
            f"starts {'holding sparse emission' if hold else 'emitting'}")
