"""``monolith-rt deltas inspect|verify|produce``: look at, check and feed a delta stream."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from server.features import random_fids
from server.streams import LogCorruptError, SegmentLogReader
from server.streams.segments import list_segments
from server.streams.deltas import DeltaError, DeltaRecord
from server.streams.delta_log import FileDeltaWriter


def scan(directory: str | Path):
    """Yields (segment_first_index, log_index, payload_bytes, record); raises on corruption."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no delta stream directory {directory}")
    firsts = list_segments(directory)
    with SegmentLogReader(directory, start_record=firsts[0] if firsts else 0) as reader:
        while True:
            batch = reader.read(max_records=256)
            if not batch:
                return
            for index, payload in batch:
                record = DeltaRecord.decode(payload)
                if record.seq != index + 1:
                    raise DeltaError(f"record {index} carries seq {record.seq}, expected {index + 1}")
                segment = max(f for f in firsts if f <= index) if firsts else 0
                yield segment, index, len(payload), record
            firsts = list_segments(directory)


def inspect(directory: str | Path) -> list[dict]:
    """Per segment: seq range, record kinds, rows, evictions, payload bytes."""
    summary: dict[int, dict] = {}
    for segment, _, size, record in scan(directory):
        s = summary.setdefault(segment, {"segment": f"{segment:020d}.seg", "first_seq": record.seq,
                                         "kinds": defaultdict(int), "rows": 0, "evicted": 0, "bytes": 0})
        s["last_seq"] = record.seq
        s["kinds"][record.kind_name] += 1
        s["rows"] += record.fids.shape[0]
        s["evicted"] += record.evicted.shape[0]
        s["bytes"] += size
    return [{**s, "kinds": dict(s["kinds"])} for s in summary.values()]


def verify(directory: str | Path) -> tuple[bool, str]:
    """(ok, message): every checksum and the sequence, end to end."""
    count, first, last = 0, None, None
    try:
        for _, _, _, record in scan(directory):
            first = record.seq if first is None else first
            last = record.seq
            count += 1
    except (LogCorruptError, DeltaError, FileNotFoundError, ValueError) as exc:
        return False, f"FAILED after {count} good records: {exc}"
    span = f"seq {first}..{last}" if count else "empty"
    return True, f"ok: {count} records, {span}, every checksum and sequence number valid"


class SyntheticProducer:
    """Writes real sparse delta records at a target rate of rows per second:
    every ``interval_s`` one record with rows_per_s * interval_s rows of FIDs
    drawn from ``fids`` if given (e.g. the FIDs a load test requests, so
    updates hit the rows being read), else from [1, key_space], with random
    values. A share ``new_share`` of each record's rows are FIDs never
    written before (slot ``new_slot``), so the table keeps growing and
    inserts displace rows as they would with new IDs arriving."""

    def __init__(self, directory: str | Path, rows_per_s: float, dim: int = 16, key_space: int = 100_000,
                 interval_s: float = 0.1, seed: int = 0, fids: np.ndarray | None = None, new_share: float = 0.0,
                 new_slot: int = 10):
        if rows_per_s <= 0 or interval_s <= 0 or key_space < 1 or not 0 <= new_share <= 1:
            raise ValueError(f"requires rows_per_s > 0, interval_s > 0, key_space >= 1, 0 <= new_share <= 1, got "
                             f"{rows_per_s}, {interval_s}, {key_space}, {new_share}")
        self.new_share = new_share
        self._new_slot = new_slot
        self.writer = FileDeltaWriter(directory)
        self.rows_per_record = max(1, round(rows_per_s * interval_s))
        self.interval_s = interval_s
        self.dim = dim
        self.key_space = key_space
        self.fids = None if fids is None else np.asarray(fids, dtype=np.uint64)
        self.rng = np.random.default_rng(seed)
        self.records = 0
        self.rows = 0

    def produce_one(self) -> DeltaRecord:
        if self.fids is not None:
            fids = self.rng.choice(self.fids, self.rows_per_record)
        else:
            fids = self.rng.integers(1, self.key_space + 1, self.rows_per_record, dtype=np.uint64)
        fresh = self.rng.random(self.rows_per_record) < self.new_share
        fids[fresh] = random_fids(self._new_slot, self.rng, int(fresh.sum()))
        values = self.rng.standard_normal((self.rows_per_record, self.dim), dtype=np.float32) * 0.1
        record = DeltaRecord.sparse(self.writer.next_seq, time.time(), fids, values)
        self.writer.append(record)
        self.records += 1
        self.rows += self.rows_per_record
        return record

    def run(self, duration_s: float, stop=None) -> None:
        """Produces on a fixed schedule for duration_s (or until stop.is_set())."""
        start = time.monotonic()
        next_at = start
        while time.monotonic() - start < duration_s and not (stop is not None and stop.is_set()):
            self.produce_one()
            next_at += self.interval_s
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def close(self) -> None:
        self.writer.close()


def print_inspect(directory: str) -> int:
    try:
        rows = inspect(directory)
    except (LogCorruptError, DeltaError, FileNotFoundError, ValueError) as exc:
        print(f"monolith-rt deltas inspect: {exc}", file=sys.stderr)
        return 1
    print(f"{'segment':<26} {'seq':>21} {'kinds':<24} {'rows':>10} {'evicted':>8} {'bytes':>12}")
    for s in rows:
        kinds = " ".join(f"{k}={v}" for k, v in sorted(s["kinds"].items()))
        print(f"{s['segment']:<26} {s['first_seq']:>10}..{s['last_seq']:<10} {kinds:<24} {s['rows']:>10} "
              f"{s['evicted']:>8} {s['bytes']:>12}")
    if not rows:
        print("(no records)")
    return 0
