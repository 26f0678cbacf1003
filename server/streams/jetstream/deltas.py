"""The delta stream on JetStream: one writer (the trainer, fenced), every replica a reader.

One record = one or more consecutive messages: a record larger than the server's max payload is
split into parts. Headers::

    Nats-Msg-Id                 <writer id>.<seq>.<part>   (a retry is dropped as a duplicate)
    Nats-Expected-Last-Sequence the stream sequence this writer last wrote (or found at start)
    Mrt-Seq / Mrt-Part / Mrt-Parts / Mrt-Crc
                                delta seq, part index, part count, CRC-32 of the whole record

Two fences keep the trainer the only writer: the lease (server.streams.jetstream.lease), and the
expected last sequence on every publish: when another writer has published since (a zombie
whose lease expired while it was paused), the stream refuses the publish (JetStream error 10071)
and the writer raises ``FencedError`` and writes nothing more, so records never interleave. A
reader reassembles parts in stream order and checks the part numbering, the record CRC and then
the record's own CRC (DeltaRecord.decode), and that seqs follow each other without a gap; a
record already seen (seq at or below the last one) is counted in ``duplicates`` and skipped;
anything else raises DeltaError, which halts the updater (nothing of the bad record is applied)
until a snapshot past it is loaded. ``position_of`` maps a delta seq to a stream sequence
(binary search over the retained messages).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import TYPE_CHECKING

import nats
from nats.js.errors import APIError, NotFoundError

from server.streams.names import DELTAS
from server.streams.bus import BusError, FencedError
from server.streams.deltas import DeltaError, DeltaRecord
from server.streams.jetstream.client import (DELTA_PUBLISH_BUDGET_S, DELTA_SUBJECT, HEADER_SLACK, LEASE_TTL_S,
                                             POINTER_BUCKET, POINTER_KEY, PUBLISH_TIMEOUT_S, RETRY_PAUSE_S, STALL_S,
                                             STREAM_NAMES, WRONG_LAST_SEQUENCE, crc, retrying)
from server.streams.jetstream.lease import TrainerLease
from server.streams.jetstream.logs import Follower

if TYPE_CHECKING:
    from server.streams.jetstream.streams import JetStreamStreams

log = logging.getLogger(__name__)


async def message_at(streams: JetStreamStreams, stream_seq: int):
    """The first DELTAS message at or after ``stream_seq`` (None: none yet)."""
    try:
        return await retrying(lambda: streams.js._jsm.get_msg(STREAM_NAMES[DELTAS], seq=stream_seq,
                                                             subject=DELTA_SUBJECT, next=True))
    except NotFoundError:
        return None
    except APIError as exc:
        if exc.err_code == 10037:  # no message found
            return None
        raise


async def position_of(streams: JetStreamStreams, seq: int) -> tuple[int, int | None]:
    """(stream sequence of the first message of the first record with delta seq >= ``seq``, its seq);
    (last + 1, None) when there is none yet. Binary search over the stream's retained messages."""
    info = await retrying(lambda: streams.js.stream_info(STREAM_NAMES[DELTAS]))
    first, last = info.state.first_seq, info.state.last_seq
    if info.state.messages == 0:
        return last + 1, None
    lo, hi = first, last + 1  # invariant: messages before lo carry seq < `seq`; hi is a candidate
    while lo < hi:
        mid = (lo + hi) // 2
        msg = await message_at(streams, mid)
        if msg is None or int(msg.headers["Mrt-Seq"]) >= seq:
            hi = mid
        else:
            lo = msg.seq + 1
    msg = await message_at(streams, lo) if lo <= last else None
    if msg is None:
        return last + 1, None
    # Step back to the record's first part (a record starts at part 0).
    part = int(msg.headers.get("Mrt-Part", "0"))
    return msg.seq - part, int(msg.headers["Mrt-Seq"])


def delta_head(streams: JetStreamStreams) -> tuple[int, float]:
    """(seq of the newest record in the delta stream, its publish time as Unix seconds); (0, 0) if empty."""
    async def head():
        try:
            msg = await streams.js._jsm.get_last_msg(STREAM_NAMES[DELTAS], DELTA_SUBJECT)
        except (NotFoundError, APIError):
            return 0, 0.0
        return int(msg.headers["Mrt-Seq"]), msg.time.timestamp() if msg.time else 0.0
    return streams.run(head(), 10.0)


def delta_lag(streams: JetStreamStreams, applied_seq: int) -> tuple[int, float]:
    """(records behind the stream head, seconds since the oldest unapplied record was published)."""
    head_seq, _ = delta_head(streams)
    if head_seq <= applied_seq:
        return 0, 0.0

    async def oldest():
        position, seq = await position_of(streams, applied_seq + 1)
        msg = await message_at(streams, position) if seq is not None else None
        return msg.time.timestamp() if msg is not None and msg.time else time.time()
    return head_seq - applied_seq, max(0.0, time.time() - streams.run(oldest(), 10.0))


class JetStreamDeltaWriter:
    """The delta stream's one writer: it holds the trainer lease (server.streams.jetstream.lease) and
    every publish is fenced by the expected last sequence (module docstring). The lease keeps a
    second trainer from starting while one runs; the expected sequence keeps records from
    interleaving even when a paused holder (a zombie) lost its lease without knowing."""

    def __init__(self, streams: JetStreamStreams, lease_wait_s: float = LEASE_TTL_S + 2):
        self._streams = streams
        self.writer_id = f"w{os.getpid()}-{time.time_ns()}"
        self.part_bytes = streams.max_payload - HEADER_SLACK
        self.lease = TrainerLease(streams, self.writer_id, lease_wait_s)

        async def start():
            info = await streams.js.stream_info(STREAM_NAMES[DELTAS])
            last = info.state.last_seq
            if info.state.messages:
                msg = await streams.js._jsm.get_last_msg(STREAM_NAMES[DELTAS], DELTA_SUBJECT)
                seq = int(msg.headers["Mrt-Seq"])
                whole = int(msg.headers["Mrt-Part"]) + 1 == int(msg.headers["Mrt-Parts"])
                return last, seq + 1 if whole else seq  # a record cut short is written again whole
            return last, None
        self._last_position, next_seq = streams.run(start())
        if next_seq is None:  # empty (or wholly trimmed): continue after the newest snapshot
            pointer = streams.snapshot_pointer()
            next_seq = (pointer["seq"] if pointer else 0) + 1
        self.next_seq = next_seq

    def append(self, record) -> int:
        if self.fenced:
            raise FencedError(self.fenced)
        if record.seq != self.next_seq:
            raise ValueError(f"delta seq requires {self.next_seq} (next in the stream), got {record.seq}")
        data = record.encode()
        parts = [data[i:i + self.part_bytes] for i in range(0, len(data), self.part_bytes)] or [b""]
        checksum = crc(data)
        for index, part in enumerate(parts):
            headers = {"Nats-Msg-Id": f"{self.writer_id}.{record.seq}.{index}",
                       "Nats-Expected-Last-Sequence": str(self._last_position),
                       "Mrt-Seq": str(record.seq), "Mrt-Part": str(index), "Mrt-Parts": str(len(parts)),
                       "Mrt-Crc": checksum}
            self._last_position = self._streams.run(self._publish(part, headers, record.seq),
                                                    DELTA_PUBLISH_BUDGET_S + PUBLISH_TIMEOUT_S + 5)
        self.next_seq = record.seq + 1
        return record.seq

    @property
    def fenced(self) -> str | None:
        """Why this writer must write nothing more (its lease was taken, or another writer published)."""
        return self.lease.fenced

    async def _publish(self, part: bytes, headers: dict, seq: int) -> int:
        error, deadline = None, time.monotonic() + DELTA_PUBLISH_BUDGET_S
        while time.monotonic() < deadline:
            try:
                ack = await self._streams.js.publish(DELTA_SUBJECT, part, timeout=PUBLISH_TIMEOUT_S,
                                                     headers=dict(headers))
                return ack.seq
            except APIError as exc:
                if exc.err_code == WRONG_LAST_SEQUENCE:
                    self.lease.fenced = (f"delta stream {STREAM_NAMES[DELTAS]}: another writer published after stream "
                                         f"seq {headers['Nats-Expected-Last-Sequence']} (JetStream: "
                                         f"{exc.description}); this trainer ({self.writer_id}) is fenced at delta "
                                         f"seq {seq} and stops")
                    raise FencedError(self.fenced) from exc
                error = exc
            except (asyncio.TimeoutError, nats.errors.Error) as exc:
                error = exc  # the same message id again: JetStream drops it if the first try landed
            await asyncio.sleep(RETRY_PAUSE_S)
        raise BusError(f"delta seq {seq}: not acknowledged within {DELTA_PUBLISH_BUDGET_S:.0f} s: {error!r}")

    def delete_before(self, seq: int) -> list:
        """Retention: purges the messages of records with delta seq < ``seq``, never past the snapshot
        pointer (records after it stay) and only while this writer holds the lease (TrainerLease.confirm:
        a writer paused past it purges nothing); returns [purged count]."""
        async def purge():
            await self.lease.confirm()
            until = seq
            try:
                entry = await (await self._streams.js.key_value(POINTER_BUCKET)).get(POINTER_KEY)
                until = min(seq, json.loads(entry.value)["seq"] + 1) if entry.value else until
            except nats.js.errors.KeyNotFoundError:
                until = 1  # no snapshot on the bus: every record is needed
            position, _ = await position_of(self._streams, until)
            info = await self._streams.js.stream_info(STREAM_NAMES[DELTAS])
            if position <= info.state.first_seq:
                return 0
            await self._streams.js.purge_stream(STREAM_NAMES[DELTAS], seq=position)
            return position - info.state.first_seq
        purged = self._streams.run(purge(), 30.0)
        return [purged] if purged else []

    def close(self) -> None:
        """Gives the lease up (a successor need not wait for it to expire)."""
        self.lease.release()


class JetStreamDeltaReader:
    """Follows the delta stream after delta seq ``after_seq`` (module docstring: reassembly, checks).
    Like FileDeltaReader, ``read`` returns the good records before a bad one and then raises, and
    the error is sticky."""

    def __init__(self, streams: JetStreamStreams, after_seq: int = 0):
        self.last_seq = after_seq
        self.duplicates = 0
        self._parts: list = []
        self._error: Exception | None = None
        position, first = streams.run(position_of(streams, after_seq + 1))
        if first is not None and first > after_seq + 1:
            self._error = DeltaError(f"delta stream {STREAM_NAMES[DELTAS]} starts at seq {first}, after seq "
                                     f"{after_seq + 1} that this server needs next (retention dropped it): "
                                     "a newer snapshot is required")
        self._streams, self.refollows = streams, 0
        self._follower = Follower(streams, DELTAS, DELTA_SUBJECT, position)

    def read(self, max_records: int | None = None):
        if self._error is not None:
            raise self._error
        if self._follower.stalled(lambda: delta_head(self._streams)[0] > self.last_seq):
            self.refollows += 1
            position, _ = self._streams.run(position_of(self._streams, self.last_seq + 1))
            log.warning("delta stream: no message for %.0f s while the stream has more: following again from "
                        "seq %d (stream seq %d)", STALL_S, self.last_seq + 1, position)
            self._follower.close()
            self._parts = []  # the record's parts come again from its first
            self._follower = Follower(self._streams, DELTAS, DELTA_SUBJECT, position)
        out = []
        limit = max_records or 1 << 30
        while len(out) < limit and self._follower.queue:
            msg = self._follower.queue.popleft()
            try:
                data = self._assemble(msg)
                if data is None:
                    continue
                record = DeltaRecord.decode(data)
                if record.seq != int(msg.headers["Mrt-Seq"]):
                    raise DeltaError(f"record carries seq {record.seq}, its headers say {msg.headers['Mrt-Seq']}")
                if record.seq <= self.last_seq:
                    self.duplicates += 1
                    log.warning("delta stream: seq %d at stream seq %d is at or below seq %d already read: skipped",
                                record.seq, msg.metadata.sequence.stream, self.last_seq)
                    continue
                if record.seq != self.last_seq + 1:
                    raise DeltaError(f"gap: seq {record.seq} follows seq {self.last_seq}")
            except (DeltaError, KeyError, ValueError) as exc:
                self._error = DeltaError(f"delta stream {STREAM_NAMES[DELTAS]} at stream seq "
                                               f"{msg.metadata.sequence.stream}: {exc}")
                if not out:
                    raise self._error from exc
                break
            self.last_seq = record.seq
            out.append(record)
        return out

    def _assemble(self, msg) -> bytes | None:
        """The whole record once its last part arrived, else None; raises DeltaError on a bad part."""
        headers = msg.headers or {}
        part, parts = int(headers["Mrt-Part"]), int(headers["Mrt-Parts"])
        if not 0 <= part < parts:
            raise DeltaError(f"part {part} of {parts}")
        if part != len(self._parts) or (self._parts and headers["Mrt-Seq"] != self._parts[0].headers["Mrt-Seq"]):
            if part == 0:  # a record cut short (its writer was fenced or died mid-record): never complete
                log.error("delta stream: record seq %s ended after %d of its parts; dropped",
                          self._parts[0].headers["Mrt-Seq"], len(self._parts))
                self._parts = []
            else:
                raise DeltaError(f"part {part} of seq {headers['Mrt-Seq']} out of order")
        self._parts.append(msg)
        if part + 1 < parts:
            return None
        data = b"".join(m.data for m in self._parts)
        self._parts = []
        if crc(data) != headers["Mrt-Crc"]:
            raise DeltaError(f"seq {headers['Mrt-Seq']}: record checksum {crc(data)}, header says "
                                   f"{headers['Mrt-Crc']}")
        return data

    def close(self) -> None:
        self._follower.close()
