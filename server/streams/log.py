"""The segment log: one writer appending records, any number of readers tailing them.

File format, torn versus corrupt: server.streams.segments.

Invariants: lexical order of segment names is log order; indices run 0, 1, 2,
... with no gap or repeat, across segments too; a segment is fsynced before
the next one is created (unless fsync="never"); only the newest segment can
end torn.

Durability (``fsync=``): "always" fsyncs each append; "batch" fsyncs on
``sync()`` (server.streams.appender.BackgroundAppender calls it once per
batch: group commit); "never" leaves it to the OS. Writes are unbuffered, so
once ``append`` returns, readers see the record and only power loss (before
the next sync) can lose it.

``Position(segment, offset, record)``: record ``record`` starts at byte
``offset`` of segment ``segment``; a reader started from one seeks there. From
a record index, a reader opens the segment with the largest first index not
above it and skips the records before.

Concurrency: one writer per directory (flock, across processes), its methods
serialised on one lock; any number of readers, in any process, tail alongside
it, each reader object used by one thread.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from pathlib import Path

from server.durable import fsync_path
from server.streams.segments import (
    FSYNC_POLICIES,
    HEADER,
    MAGIC,
    RECORD_BAD,
    RECORD_OK,
    RECORD_TAIL,
    LogCorruptError,
    Position,
    View,
    check_max_payload,
    delete_sealed_segments,
    record_crc,
    list_segments,
    read_record,
    segment_path,
)

__all__ = ["LogCorruptError", "Position", "SegmentLogReader", "SegmentLogWriter"]

log = logging.getLogger(__name__)


class SegmentLogWriter:
    """Appends to the log in ``directory`` (created if missing); on open, recovers the newest segment.

    ``segment_bytes``: roll before a segment would grow past it (a larger record gets
    a segment of its own). ``fsync``: "always", "batch" or "never". Raises
    LogCorruptError if the newest segment holds an invalid record that is not a
    torn tail, BlockingIOError if another writer holds the directory.
    """

    def __init__(
        self, directory, *, segment_bytes: int = 64 << 20, fsync: str = "batch", max_payload_bytes: int = 64 << 20
    ):
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync requires one of {FSYNC_POLICIES}, got {fsync!r}")
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes requires >= 1, got {segment_bytes}")
        check_max_payload(max_payload_bytes)
        self.directory = Path(directory)
        self.segment_bytes, self.max_payload_bytes, self.recovered_bytes = segment_bytes, max_payload_bytes, 0
        self._fsync, self._lock, self._closed, self._broken = fsync, threading.Lock(), False, None
        self._fd, self._dir_dirty = -1, False
        if not self.directory.exists():
            self.directory.mkdir(parents=True)
            if fsync != "never":
                fsync_path(self.directory.parent)
        self._lock_fd = os.open(self.directory / ".writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise BlockingIOError(exc.errno, f"log directory {self.directory} is open by another writer") from None
            self._open_newest_segment()
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _open_newest_segment(self) -> None:
        names = list_segments(self.directory)
        if not names:
            self._next_index = 0
            return self._create_segment()
        self._segment = names[-1]
        path = segment_path(self.directory, self._segment)
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        try:
            view, offset, expected = View(fd), 0, self._segment
            while (found := read_record(view, offset, expected, self.max_payload_bytes))[0] == RECORD_OK:
                offset, expected = found[2], expected + 1
            if found[0] == RECORD_BAD:
                raise LogCorruptError(path, offset, found[1])
            if (size := view.size()) > offset:
                os.ftruncate(fd, offset)
                os.fsync(fd)
                self.recovered_bytes = size - offset
                log.warning("segment %s offset %d: truncated torn tail of %d bytes: %s", path, offset, size - offset,
                            found[1])
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._size, self._next_index = fd, offset, expected

    def _create_segment(self) -> None:
        path = segment_path(self.directory, self._next_index)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        self._segment, self._size, self._dir_dirty = self._next_index, 0, True

    @property
    def next_index(self) -> int:
        """Index the next appended record will get."""
        return self._next_index

    def append(self, payload: bytes) -> int:
        """Append one record (one write call); returns its global index."""
        n = len(payload)
        if n > self.max_payload_bytes:
            raise ValueError(f"payload of {n} bytes exceeds max_payload_bytes={self.max_payload_bytes}")
        with self._lock:
            self._check_usable()
            total = HEADER.size + n
            if self._fd < 0 or (self._size > 0 and self._size + total > self.segment_bytes):
                if self._fd >= 0:
                    if self._fsync != "never":
                        os.fsync(self._fd)
                    os.close(self._fd)
                    self._fd = -1
                self._create_segment()
            index = self._next_index
            header = HEADER.pack(MAGIC, n, record_crc(n, index, payload), index)
            try:
                if (written := os.writev(self._fd, [header, payload])) != total:
                    raise OSError(errno.EIO, f"short write to segment {self._segment}: {written} of {total} bytes")
            except BaseException:
                try:  # never leave a partial record for the next append to follow
                    os.ftruncate(self._fd, self._size)
                except OSError as exc:
                    self._broken = exc
                raise
            self._size += total
            self._next_index = index + 1
            if self._fsync == "always":
                self._sync_locked()
            return index

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError(f"SegmentLogWriter for {self.directory} is closed")
        if self._broken is not None:
            raise RuntimeError(f"SegmentLogWriter for {self.directory} could not truncate a partial record; reopen it")

    def sync(self) -> None:
        """Make everything appended so far durable (a no-op with fsync="never")."""
        with self._lock:
            self._check_usable()
            self._sync_locked()

    def _sync_locked(self) -> None:
        if self._fsync == "never":
            return
        if self._fd >= 0:
            os.fsync(self._fd)
        if self._dir_dirty:
            fsync_path(self.directory)
            self._dir_dirty = False

    def delete_segments_before(self, record_index: int) -> list[Path]:
        """Delete the segments all of whose records have index < ``record_index`` (never the newest)."""
        with self._lock:
            self._check_usable()
            return delete_sealed_segments(self.directory, record_index, fsync=self._fsync != "never")

    def close(self) -> None:
        """Sync (unless fsync="never") and release the directory; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._broken is None:
                    self._sync_locked()
            finally:
                if self._fd >= 0:
                    os.close(self._fd)
                os.close(self._lock_fd)

    def __enter__(self) -> SegmentLogWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SegmentLogReader:
    """Reads, and tails, the log in ``directory`` (which may hold no segment yet) without blocking.

    ``start_record``: the first record to return, as a global index or as a
    ``Position`` (from ``position``) to seek to. ValueError if it precedes the
    oldest retained record, or the Position's segment is gone or too short.
    """

    def __init__(self, directory, *, start_record: int | Position = 0, max_payload_bytes: int = 64 << 20):
        check_max_payload(max_payload_bytes)
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"log directory {self.directory} does not exist")
        self.max_payload_bytes = max_payload_bytes
        self._view: View | None = None
        self._segment, self._offset, self._sealed, self._closed = -1, 0, False, False
        if isinstance(start_record, Position):
            self._start = self._expected = start_record.record
            try:
                self._open(start_record.segment)
            except FileNotFoundError:
                raise ValueError(f"{start_record}: segment no longer exists in {self.directory}") from None
            if start_record.offset > (size := self._view.size()):
                self.close()
                raise ValueError(f"{start_record} lies past the end of its segment ({size} bytes)")
            self._offset = start_record.offset
        else:
            if start_record < 0:
                raise ValueError(f"start_record requires >= 0, got {start_record}")
            self._start = self._expected = start_record
            self._open_next()

    @property
    def next_record(self) -> int:
        """Global index of the next record ``read`` will return."""
        return max(self._expected, self._start)

    @property
    def position(self) -> Position:
        """Where the scan resumes; ``.record == next_record`` after any read that returned records."""
        return Position(self._segment if self._segment >= 0 else self._expected, self._offset, self._expected)

    def read(self, max_records: int | None = None) -> list[tuple[int, bytes]]:
        """The (index, payload) records available now, in order, at most ``max_records``.

        LogCorruptError at the first invalid record, once those before it have been
        returned; the reader stays there and raises again.
        """
        if self._closed:
            raise RuntimeError(f"SegmentLogReader for {self.directory} is closed")
        if max_records is not None and max_records < 0:
            raise ValueError(f"max_records requires >= 0 or None, got {max_records}")
        if self._view is not None:
            self._view.reset()
        out: list[tuple[int, bytes]] = []
        try:
            while max_records is None or len(out) < max_records:
                if self._view is None and not self._open_next():
                    break
                status, value, end = read_record(self._view, self._offset, self._expected, self.max_payload_bytes)
                if status == RECORD_BAD and not self._sealed:
                    # An append in flight can be seen half written by one read and whole
                    # (with the next record after it) by the next: look again before judging.
                    self._view.reset()
                    status, value, end = read_record(self._view, self._offset, self._expected,
                                                      self.max_payload_bytes)
                if status == RECORD_OK:
                    if self._expected >= self._start:
                        out.append((self._expected, value))
                    self._offset, self._expected = end, self._expected + 1
                elif status == RECORD_BAD or (status == RECORD_TAIL and self._sealed):
                    reason = value if status == RECORD_BAD else f"{value} in a sealed segment"
                    raise LogCorruptError(segment_path(self.directory, self._segment), self._offset, reason)
                elif not self._sealed:
                    # A newer segment means this one is complete, but the writer may have
                    # appended to it after the read above: read it once more.
                    self._sealed = any(n > self._segment for n in list_segments(self.directory))
                    if not self._sealed:
                        break
                    self._view.reset()
                else:
                    os.close(self._view.fd)
                    self._view = None
        except LogCorruptError:
            if not out:
                raise
        return out

    def _open(self, first: int) -> None:
        fd = os.open(segment_path(self.directory, first), os.O_RDONLY)
        self._view, self._segment, self._offset, self._sealed = View(fd), first, 0, False

    def _open_next(self) -> bool:
        names = list_segments(self.directory)
        if self._segment < 0:
            below = [n for n in names if n <= self._start]
            if names and not below:
                raise ValueError(f"start_record {self._start} precedes the oldest retained record {names[0]}")
            if below:
                self._open(below[-1])
                self._expected = below[-1]
            return bool(below)
        later = [n for n in names if n > self._segment]
        if later and later[0] != self._expected:
            reason = f"segment starts at record {later[0]}, expected {self._expected} (lost, or deleted by retention)"
            raise LogCorruptError(segment_path(self.directory, later[0]), 0, reason)
        if later:
            self._open(later[0])
        return bool(later)

    def close(self) -> None:
        if self._view is not None:
            os.close(self._view.fd)
            self._view = None
        self._closed = True

    def __enter__(self) -> SegmentLogReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
