"""Delta streams: where the trainer appends delta records and servers tail them.

One small interface, two transports carrying the same record bytes: the
embedded default, a durable segment log on local disk (the trainer is
co-located; this module), and NATS JetStream for replicas past one machine
(server.streams.jetstream). ``Streams.open_delta_writer/reader`` give either.

Sequence numbers: delta ``seq`` n is stored as log record n - 1, so resuming
"after seq S" starts at log record S, and a record whose seq disagrees with
its place in the log is refused on both sides.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from server.streams.log import SegmentLogReader, SegmentLogWriter
from server.streams.deltas import DeltaError, DeltaRecord
from server.streams.watch import DirectoryWatch


class DeltaWriter(Protocol):
    next_seq: int

    def append(self, record: DeltaRecord) -> int: ...

    def close(self) -> None: ...


class DeltaReader(Protocol):
    def read(self, max_records: int | None = None) -> list[DeltaRecord]: ...

    # Optional: ``wait(timeout_s)`` blocks until a record may have arrived (a reader without it is polled).

    def close(self) -> None: ...


class FileDeltaWriter:
    """Appends delta records to a segment log directory, synced per append
    (a delta is acknowledged to nobody, but a snapshot may name its seq)."""

    def __init__(self, directory: str | Path, segment_bytes: int = 64 << 20):
        self._log = SegmentLogWriter(directory, segment_bytes=segment_bytes, fsync="always")

    @property
    def next_seq(self) -> int:
        return self._log.next_index + 1

    def append(self, record: DeltaRecord) -> int:
        if record.seq != self.next_seq:
            raise ValueError(f"delta seq requires {self.next_seq} (next in the stream), got {record.seq}")
        self._log.append(record.encode())
        return record.seq

    def delete_before(self, seq: int) -> list[Path]:
        """Retention: drops segments whose records all have seq < ``seq``."""
        return self._log.delete_segments_before(seq - 1)

    def close(self) -> None:
        self._log.close()

    def __enter__(self) -> "FileDeltaWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FileDeltaReader:
    """Tails a segment log directory for delta records after seq ``after_seq``.
    ``read`` raises DeltaError or LogCorruptError on a bad record (after
    returning the good ones before it) and never returns the bad one.
    ``wait`` blocks until the writer appends (server.streams.watch), so a
    follower wakes when a record lands instead of polling."""

    def __init__(self, directory: str | Path, after_seq: int = 0):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._watch = DirectoryWatch([directory])  # before the first read: no append goes unnoticed
        self._log = SegmentLogReader(directory, start_record=after_seq)
        self.directory = directory
        self._error: Exception | None = None

    def read(self, max_records: int | None = None) -> list[DeltaRecord]:
        if self._error is not None:
            raise self._error
        out = []
        for index, payload in self._log.read(max_records):
            try:
                record = DeltaRecord.decode(payload)
                if record.seq != index + 1:
                    raise DeltaError(f"record {index} carries seq {record.seq}, expected {index + 1}")
            except DeltaError as exc:
                # Sticky: the log has moved past it, and nothing after it may be applied.
                self._error = DeltaError(f"{self.directory}: {exc}")
                if not out:
                    raise self._error from exc
                break
            out.append(record)
        return out

    def wait(self, timeout_s: float) -> bool:
        """Blocks until the log directory changes (True) or ``timeout_s`` passes (False)."""
        return self._watch.wait(timeout_s)

    def close(self) -> None:
        self._watch.close()
        self._log.close()


def read_through(reader: DeltaReader, after_seq: int, until_seq: int, timeout_s: float = 60.0,
                 where: str = "the delta stream") -> Iterator[DeltaRecord]:
    """The records of ``reader`` (opened after seq ``after_seq``) up to seq ``until_seq``, that one
    included, whatever the backend: a JetStream reader fetches in the background and returns nothing
    until its messages arrive, so an empty read is not the end. Raises TimeoutError when they do not
    come within ``timeout_s``."""
    deadline, seq = time.monotonic() + timeout_s, after_seq
    while seq < until_seq:
        records = reader.read(max_records=256)
        if not records:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{where} gave records up to seq {seq} within {timeout_s:.0f} s, requires up "
                                   f"to {until_seq}")
            time.sleep(0.01)
            continue
        for record in records:
            if record.seq > until_seq:
                return
            seq = record.seq
            yield record
