"""Durable append-only record log in segment files: feature log, feedback log, delta stream.

Layout (one directory per stream; a segment is named after the index of its first record)::

    00000000000000000000.seg    records 0 .. 999       sealed: complete, never written again
    00000000000000001000.seg    records 1000 ..        newest: appended to
    .writer.lock                flock held by the one open writer

    record = magic "MRT1" | length u32 | crc u32 | index u64 | payload     (little-endian header, 20 bytes)
    crc    = zlib.crc32 over  length u32 | index u64 | payload

Invariants: lexical order of names is log order; indices run 0, 1, 2, ... with
no gap or repeat, across segments too; a segment is fsynced before the next one
is created (unless fsync="never"); only the newest segment can end torn.

Torn versus corrupt. A record is written by one ``os.writev``, so a crash leaves
at most a prefix of the last record. At the end of the newest segment, an
incomplete header, a payload running past end of file, a checksum failure on a
record ending exactly at end of file, or only zero bytes (size updated, data
not) is a torn tail: the writer truncates it on open, a reader treats it as not
yet written. All else raises ``LogCorruptError``: a bad record with data after
it, anything bad in a sealed segment, an index out of sequence, a declared
length above ``max_payload_bytes``, a segment not starting where the previous
ended, and a "torn" tail that contains a valid next record (a damaged length
field), so no valid record is ever dropped.

Durability (``fsync=``): "always" fsyncs each append; "batch" fsyncs on
``sync()`` (``BackgroundAppender`` calls it once per batch: group commit);
"never" leaves it to the OS. Writes are unbuffered, so once ``append`` returns,
readers see the record and only power loss (before the next sync) can lose it.

``Position(segment, offset, record)``: record ``record`` starts at byte
``offset`` of segment ``segment``; a reader started from one seeks there. From
a record index, a reader opens the segment with the largest first index not
above it and skips the records before.

Concurrency: one writer per directory (flock, across processes), its methods
serialised on one lock; any number of readers, in any process, tail alongside
it, each reader object used by one thread; ``BackgroundAppender.submit`` from
any number of threads.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from server.durable import fsync_path

__all__ = ["BackgroundAppender", "LogCorruptError", "Position", "SegmentLogReader", "SegmentLogWriter",
           "delete_sealed_segments", "segment_bytes_from_env"]

log = logging.getLogger(__name__)

_MAGIC = b"MRT1"
_HEADER = struct.Struct("<4sIIQ")
_CRC_PREFIX = struct.Struct("<IQ")
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")
_FSYNC_POLICIES = ("always", "batch", "never")
_CHUNK_BYTES = 1 << 20
_OK, _END, _TAIL, _BAD = range(4)


class LogCorruptError(Exception):
    """An invalid record that cannot be a torn tail; nothing at or after it is returned."""

    def __init__(self, segment: Path, offset: int, reason: str):
        super().__init__(f"segment {segment} offset {offset}: {reason}")
        self.segment, self.offset, self.reason = Path(segment), offset, reason


@dataclass(frozen=True, order=True)
class Position:
    """Record ``record`` starts at byte ``offset`` of the segment whose first record is ``segment``."""

    segment: int
    offset: int
    record: int


def _crc(length: int, index: int, payload) -> int:
    return zlib.crc32(payload, zlib.crc32(_CRC_PREFIX.pack(length, index)))


def _segment_path(directory: Path, first: int) -> Path:
    return directory / f"{first:020d}.seg"


def _list_segments(directory: Path) -> list[int]:
    return sorted(int(m.group(1)) for name in os.listdir(directory) if (m := _SEGMENT_NAME.match(name)))


def _check_max_payload(n: int) -> None:
    if not 0 < n < 1 << 32:
        raise ValueError(f"max_payload_bytes requires 0 < n < 2**32, got {n}")


class _View:
    """Reads one segment through a pread-filled window; ``reset`` drops bytes that may be stale."""

    def __init__(self, fd: int):
        self.fd, self._start, self._buf = fd, 0, b""

    def reset(self) -> None:
        self._start, self._buf = 0, b""

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def get(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset``; fewer only at end of file."""
        rel = offset - self._start
        if rel < 0 or rel + n > len(self._buf):
            parts, pos, want = [], offset, max(n, _CHUNK_BYTES)
            while want > 0 and (part := os.pread(self.fd, want, pos)):
                parts.append(part)
                pos, want = pos + len(part), want - len(part)
            self._start, self._buf, rel = offset, b"".join(parts), 0
        return self._buf[rel : rel + n]


def _read_record(view: _View, offset: int, expected: int, max_payload: int) -> tuple[int, object, int]:
    """Classify the bytes at ``offset`` as (status, payload or reason, end offset).

    _OK: a valid record numbered ``expected``. _END: no bytes at all.
    _TAIL: a torn last record (module docstring). _BAD: corruption.
    """
    header = view.get(offset, _HEADER.size)
    if not header:
        return _END, None, offset
    if len(header) < _HEADER.size:
        return _TAIL, f"incomplete header, {len(header)} of {_HEADER.size} bytes (record {expected})", offset
    magic, length, crc, index = _HEADER.unpack(header)
    if magic != _MAGIC:
        status = _TAIL if _zeros_to_end(view, offset) else _BAD
        return status, f"bad magic {magic!r}, expected {_MAGIC!r} (record {expected})", offset
    if length > max_payload:
        return _BAD, f"declared length {length} exceeds max_payload_bytes={max_payload} (record {expected})", offset
    payload = view.get(offset + _HEADER.size, length)
    end = offset + _HEADER.size + length
    if len(payload) < length:
        reason = f"payload of {length} bytes runs past end of file, {len(payload)} present (record {expected})"
        return _tail_unless_followed(view, offset, expected, max_payload, reason)
    if _crc(length, index, payload) != crc:
        reason = f"checksum mismatch (record {expected})"
        if end < view.size():
            return _BAD, reason, offset
        return _tail_unless_followed(view, offset, expected, max_payload, reason)
    if index != expected:
        return _BAD, f"record index {index}, expected {expected}", offset
    return _OK, payload, end


def _zeros_to_end(view: _View, offset: int) -> bool:
    size = view.size()
    while offset < size:
        chunk = view.get(offset, min(_CHUNK_BYTES, size - offset))
        if not chunk or chunk.strip(b"\0"):
            return not chunk
        offset += len(chunk)
    return True


def _tail_unless_followed(view: _View, offset: int, expected: int, max_payload: int, reason: str):
    """A bad last record is torn unless a valid record ``expected + 1`` lies within
    the bytes it claims: then its length field was damaged, not cut short."""
    data = view.get(offset, view.size() - offset)
    rest = memoryview(data)
    pos = data.find(_MAGIC, 1)
    while pos >= 0 and pos + _HEADER.size <= len(data):
        _, length, crc, index = _HEADER.unpack_from(data, pos)
        body = rest[pos + _HEADER.size : pos + _HEADER.size + length]
        if index == expected + 1 and length == len(body) <= max_payload and _crc(length, index, body) == crc:
            return _BAD, f"{reason}, yet record {index} follows at offset {offset + pos}", offset
        pos = data.find(_MAGIC, pos + 1)
    return _TAIL, reason, offset


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
        if fsync not in _FSYNC_POLICIES:
            raise ValueError(f"fsync requires one of {_FSYNC_POLICIES}, got {fsync!r}")
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes requires >= 1, got {segment_bytes}")
        _check_max_payload(max_payload_bytes)
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
        names = _list_segments(self.directory)
        if not names:
            self._next_index = 0
            return self._create_segment()
        self._segment = names[-1]
        path = _segment_path(self.directory, self._segment)
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        try:
            view, offset, expected = _View(fd), 0, self._segment
            while (found := _read_record(view, offset, expected, self.max_payload_bytes))[0] == _OK:
                offset, expected = found[2], expected + 1
            if found[0] == _BAD:
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
        path = _segment_path(self.directory, self._next_index)
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
            total = _HEADER.size + n
            if self._fd < 0 or (self._size > 0 and self._size + total > self.segment_bytes):
                if self._fd >= 0:
                    if self._fsync != "never":
                        os.fsync(self._fd)
                    os.close(self._fd)
                    self._fd = -1
                self._create_segment()
            index = self._next_index
            header = _HEADER.pack(_MAGIC, n, _crc(n, index, payload), index)
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


def delete_sealed_segments(directory, before_record: int, min_age_s: float = 0.0, fsync: bool = True) -> list[Path]:
    """Retention: deletes the sealed segments (never the newest) all of whose
    records have index < ``before_record`` and that were last written at
    least ``min_age_s`` ago, oldest first, stopping at the first that must
    stay (so the log keeps no hole). Safe beside the one writer (it never
    touches a sealed segment) and beside readers (an open segment stays
    readable; a reader that must open a deleted one fails with ValueError)."""
    directory = Path(directory)
    names = _list_segments(directory)
    horizon = time.time() - min_age_s
    deleted = []
    for first, following in zip(names, names[1:]):
        path = _segment_path(directory, first)
        if following > before_record or path.stat().st_mtime > horizon:
            break
        path.unlink()
        deleted.append(path)
    if deleted and fsync:
        fsync_path(directory)
    return deleted


def segment_bytes_from_env(default: int = 64 << 20) -> int:
    """Segment size of the server's and trainer's logs: $MONOLITH_SEGMENT_BYTES, else ``default``.
    Smaller segments let retention free disk sooner (it deletes whole sealed segments)."""
    text = os.environ.get("MONOLITH_SEGMENT_BYTES")
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 4096:
        raise ValueError(f"MONOLITH_SEGMENT_BYTES requires an integer >= 4096, got {text!r}")
    return value


class SegmentLogReader:
    """Reads, and tails, the log in ``directory`` (which may hold no segment yet) without blocking.

    ``start_record``: the first record to return, as a global index or as a
    ``Position`` (from ``position``) to seek to. ValueError if it precedes the
    oldest retained record, or the Position's segment is gone or too short.
    """

    def __init__(self, directory, *, start_record: int | Position = 0, max_payload_bytes: int = 64 << 20):
        _check_max_payload(max_payload_bytes)
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"log directory {self.directory} does not exist")
        self.max_payload_bytes = max_payload_bytes
        self._view: _View | None = None
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
                status, value, end = _read_record(self._view, self._offset, self._expected, self.max_payload_bytes)
                if status == _BAD and not self._sealed:
                    # An append in flight can be seen half written by one read and whole
                    # (with the next record after it) by the next: look again before judging.
                    self._view.reset()
                    status, value, end = _read_record(self._view, self._offset, self._expected,
                                                      self.max_payload_bytes)
                if status == _OK:
                    if self._expected >= self._start:
                        out.append((self._expected, value))
                    self._offset, self._expected = end, self._expected + 1
                elif status == _BAD or (status == _TAIL and self._sealed):
                    reason = value if status == _BAD else f"{value} in a sealed segment"
                    raise LogCorruptError(_segment_path(self.directory, self._segment), self._offset, reason)
                elif not self._sealed:
                    # A newer segment means this one is complete, but the writer may have
                    # appended to it after the read above: read it once more.
                    self._sealed = any(n > self._segment for n in _list_segments(self.directory))
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
        fd = os.open(_segment_path(self.directory, first), os.O_RDONLY)
        self._view, self._segment, self._offset, self._sealed = _View(fd), first, 0, False

    def _open_next(self) -> bool:
        names = _list_segments(self.directory)
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
            raise LogCorruptError(_segment_path(self.directory, later[0]), 0, reason)
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


class BackgroundAppender:
    """A thread that owns ``writer``, so that request handlers never wait on disk.

    The thread takes everything queued, appends it, calls ``writer.sync()`` once,
    then releases that batch's ``wait=True`` submitters (group commit). At most
    ``max_queue`` records wait, plus one batch being written. Counters (plain
    ints): ``written`` (appended and synced), ``bytes_written`` (their payloads),
    ``shed`` (refused, queue full), ``failed`` (append or the sync after it
    raised; may or may not be in the log). Each accepted submit ends up in
    exactly one of ``written`` and ``failed``.

    ``linger_s`` > 0: the thread waits that long after the first queued record
    before writing, so one append run and one sync cover everything that came
    meanwhile (fewer syncs per record under load); a submitter that waits
    (``wait=True``, ``flush``) or ``close`` ends the wait at once.
    """

    def __init__(self, writer: SegmentLogWriter, *, max_queue: int = 10000, name: str = "log", linger_s: float = 0.0):
        if max_queue < 1:
            raise ValueError(f"max_queue requires >= 1, got {max_queue}")
        if linger_s < 0:
            raise ValueError(f"linger_s requires >= 0, got {linger_s}")
        self._linger_s, self._hurry = linger_s, threading.Event()
        self.name, self._writer, self._max_queue = name, writer, max_queue
        self.written = self.shed = self.failed = self.bytes_written = 0
        self._queue: deque[tuple[int, bytes, list | None]] = deque()  # (sequence, payload, [error] if waited on)
        self._lock = threading.Lock()
        self._nonempty, self._space, self._progress = (threading.Condition(self._lock) for _ in range(3))
        self._submitted = self._completed = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"segment-log-{name}", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Records waiting in the queue, not counting the batch being written."""
        return len(self._queue)

    def submit(self, payload: bytes, *, wait: bool = False, timeout_s: float | None = None) -> bool:
        """Queue one record. If the queue stays full for ``timeout_s`` (None: until
        space), count it in ``shed`` and return False. With ``wait=True``, return once
        the record is appended and synced, or raise the writer's exception."""
        if not wait:
            return self._enqueue(payload, None, timeout_s) is not None
        (outcome,) = self.submit_all([payload], timeout_s=timeout_s)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def submit_all(self, payloads: list[bytes], *, timeout_s: float | None = None) -> list[bool | Exception]:
        """Queues every record, then waits until all are appended and synced:
        one sync can cover them all (group commit across the caller's batch).
        Per record: True (durable), False (shed: the queue stayed full for
        ``timeout_s``) or the writer's exception."""
        tickets = [self._enqueue(payload, [None], timeout_s) for payload in payloads]
        last = max((t[0] for t in tickets if t is not None), default=0)
        with self._lock:
            self._progress.wait_for(lambda: self._completed >= last)
        return [False if t is None else (t[1][0] if t[1][0] is not None else True) for t in tickets]

    def _enqueue(self, payload: bytes, ticket: list | None, timeout_s: float | None) -> tuple[int, list | None] | None:
        """(sequence, ticket) of the queued record, or None if it was shed."""
        if (n := len(payload)) > (limit := self._writer.max_payload_bytes):
            raise ValueError(f"payload of {n} bytes exceeds max_payload_bytes={limit}")
        with self._lock:
            if not self._closed and len(self._queue) >= self._max_queue:
                self._space.wait_for(lambda: self._closed or len(self._queue) < self._max_queue, timeout_s)
            if self._closed:
                raise RuntimeError(f"BackgroundAppender {self.name!r} is closed")
            if len(self._queue) >= self._max_queue:
                self.shed += 1
                return None
            self._submitted += 1
            sequence = self._submitted
            self._queue.append((sequence, payload, ticket))
            self._nonempty.notify()
        if ticket is not None:
            self._hurry.set()
        return sequence, ticket

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything submitted so far is appended and synced; False on timeout."""
        self._hurry.set()
        with self._lock:
            target = self._submitted
            return self._progress.wait_for(lambda: self._completed >= target, timeout_s)

    def close(self) -> None:
        """Flush, stop the thread and close the writer; later submits raise RuntimeError."""
        with self._lock:
            already, self._closed = self._closed, True
            self._nonempty.notify_all()
            self._space.notify_all()
        self._hurry.set()
        self._thread.join()
        if not already:
            self._writer.close()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._nonempty.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
            if self._linger_s:
                self._hurry.wait(self._linger_s)
                self._hurry.clear()
            with self._lock:
                batch = list(self._queue)
                self._queue.clear()
                self._space.notify_all()
            try:
                self._write_batch(batch)
            except BaseException as exc:  # the thread must not die with submitters parked on it
                log.exception("log %r: unexpected error writing a batch of %d records", self.name, len(batch))
                self.failed += len(batch)
                for _, _, ticket in batch:
                    if ticket is not None and ticket[0] is None:
                        ticket[0] = exc
            finally:
                with self._lock:
                    self._completed = batch[-1][0]
                    self._progress.notify_all()

    def _write_batch(self, batch: list[tuple[int, bytes, list | None]]) -> None:
        appended, first_error = [], None
        for _, payload, ticket in batch:
            try:
                self._writer.append(payload)
            except Exception as exc:
                first_error = first_error or exc
                self.failed += 1
                if ticket is not None:
                    ticket[0] = exc
            else:
                appended.append((payload, ticket))
        if first_error is not None:
            failures = len(batch) - len(appended)
            log.error("log %r: %d of %d appends failed, first: %r", self.name, failures, len(batch), first_error)
        try:
            self._writer.sync()
        except Exception as exc:
            log.error("log %r: sync after %d appends failed: %r", self.name, len(appended), exc)
            self.failed += len(appended)
            for _, ticket in appended:
                if ticket is not None:
                    ticket[0] = exc
            return
        self.written += len(appended)
        self.bytes_written += sum(len(payload) for payload, _ in appended)
