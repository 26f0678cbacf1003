"""Segment files: the on-disk format under every stream (feature log, feedback log, delta stream).

Layout (one directory per log; a segment is named after the index of its first record)::

    00000000000000000000.seg    records 0 .. 999       sealed: complete, never written again
    00000000000000001000.seg    records 1000 ..        newest: appended to
    .writer.lock                flock held by the one open writer

    record = magic "MRT1" | length u32 | crc u32 | index u64 | payload     (little-endian header, 20 bytes)
    crc    = zlib.crc32 over  length u32 | index u64 | payload

Torn versus corrupt. A record is written by one ``os.writev``, so a crash leaves
at most a prefix of the last record. At the end of the newest segment, an
incomplete header, a payload running past end of file, a checksum failure on a
record ending exactly at end of file, or only zero bytes (size updated, data
not) is a torn tail: the writer truncates it on open, a reader treats it as not
yet written. All else raises ``LogCorruptError``: a bad record with data after
it, anything bad in a sealed segment, an index out of sequence, a declared
length above ``max_payload_bytes``, a segment not starting where the previous
ended, and a "torn" tail that contains a valid next record (a damaged length
field), so no valid record is ever dropped. ``read_record`` returns a status
for each case; only server.streams.log raises.
"""

from __future__ import annotations

import os
import re
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from server.durable import fsync_path

MAGIC = b"MRT1"
HEADER = struct.Struct("<4sIIQ")
_CRC_PREFIX = struct.Struct("<IQ")
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")
FSYNC_POLICIES = ("always", "batch", "never")
CHUNK_BYTES = 1 << 20
RECORD_OK, RECORD_END, RECORD_TAIL, RECORD_BAD = range(4)


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


def record_crc(length: int, index: int, payload) -> int:
    return zlib.crc32(payload, zlib.crc32(_CRC_PREFIX.pack(length, index)))


def segment_path(directory: Path, first: int) -> Path:
    return directory / f"{first:020d}.seg"


def list_segments(directory: Path) -> list[int]:
    return sorted(int(m.group(1)) for name in os.listdir(directory) if (m := _SEGMENT_NAME.match(name)))


def check_max_payload(n: int) -> None:
    if not 0 < n < 1 << 32:
        raise ValueError(f"max_payload_bytes requires 0 < n < 2**32, got {n}")


class View:
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
            parts, pos, want = [], offset, max(n, CHUNK_BYTES)
            while want > 0 and (part := os.pread(self.fd, want, pos)):
                parts.append(part)
                pos, want = pos + len(part), want - len(part)
            self._start, self._buf, rel = offset, b"".join(parts), 0
        return self._buf[rel : rel + n]


def read_record(view: View, offset: int, expected: int, max_payload: int) -> tuple[int, object, int]:
    """Classify the bytes at ``offset`` as (status, payload or reason, end offset).

    RECORD_OK: a valid record numbered ``expected``. RECORD_END: no bytes at all.
    RECORD_TAIL: a torn last record (module docstring). RECORD_BAD: corruption.
    """
    header = view.get(offset, HEADER.size)
    if not header:
        return RECORD_END, None, offset
    if len(header) < HEADER.size:
        return RECORD_TAIL, f"incomplete header, {len(header)} of {HEADER.size} bytes (record {expected})", offset
    magic, length, crc, index = HEADER.unpack(header)
    if magic != MAGIC:
        status = RECORD_TAIL if zeros_to_end(view, offset) else RECORD_BAD
        return status, f"bad magic {magic!r}, expected {MAGIC!r} (record {expected})", offset
    if length > max_payload:
        return RECORD_BAD, f"declared length {length} exceeds max_payload_bytes={max_payload} (record {expected})", offset
    payload = view.get(offset + HEADER.size, length)
    end = offset + HEADER.size + length
    if len(payload) < length:
        reason = f"payload of {length} bytes runs past end of file, {len(payload)} present (record {expected})"
        return tail_unless_followed(view, offset, expected, max_payload, reason)
    if record_crc(length, index, payload) != crc:
        reason = f"checksum mismatch (record {expected})"
        if end < view.size():
            return RECORD_BAD, reason, offset
        return tail_unless_followed(view, offset, expected, max_payload, reason)
    if index != expected:
        return RECORD_BAD, f"record index {index}, expected {expected}", offset
    return RECORD_OK, payload, end


def zeros_to_end(view: View, offset: int) -> bool:
    size = view.size()
    while offset < size:
        chunk = view.get(offset, min(CHUNK_BYTES, size - offset))
        if not chunk or chunk.strip(b"\0"):
            return not chunk
        offset += len(chunk)
    return True


def tail_unless_followed(view: View, offset: int, expected: int, max_payload: int, reason: str):
    """A bad last record is torn unless a valid record ``expected + 1`` lies within
    the bytes it claims: then its length field was damaged, not cut short."""
    data = view.get(offset, view.size() - offset)
    rest = memoryview(data)
    pos = data.find(MAGIC, 1)
    while pos >= 0 and pos + HEADER.size <= len(data):
        _, length, crc, index = HEADER.unpack_from(data, pos)
        body = rest[pos + HEADER.size : pos + HEADER.size + length]
        if index == expected + 1 and length == len(body) <= max_payload and record_crc(length, index, body) == crc:
            return RECORD_BAD, f"{reason}, yet record {index} follows at offset {offset + pos}", offset
        pos = data.find(MAGIC, pos + 1)
    return RECORD_TAIL, reason, offset


def delete_sealed_segments(directory, before_record: int, min_age_s: float = 0.0, fsync: bool = True) -> list[Path]:
    """Retention: deletes the sealed segments (never the newest) all of whose
    records have index < ``before_record`` and that were last written at
    least ``min_age_s`` ago, oldest first, stopping at the first that must
    stay (so the log keeps no hole). Safe beside the one writer (it never
    touches a sealed segment) and beside readers (an open segment stays
    readable; a reader that must open a deleted one fails with ValueError)."""
    directory = Path(directory)
    names = list_segments(directory)
    horizon = time.time() - min_age_s
    deleted = []
    for first, following in zip(names, names[1:]):
        path = segment_path(directory, first)
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
