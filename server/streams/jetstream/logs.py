"""The logs on JetStream (FEATURES, FEEDBACK): many writers (every replica's instances), one reader
per log (the trainer's joiner).

A writer has the segment writer's interface, so the BackgroundAppender (group commit, shedding)
drives it unchanged: ``append`` buffers, ``sync`` publishes everything buffered, framed (u32
length + record, as many per message as the max payload allows: one acknowledgement per group,
not per record, keeps the client's event loop from competing with the ranker's thread for the
GIL per request), and waits for every acknowledgement, retrying unacknowledged messages with the
same ``Nats-Msg-Id`` (the stream drops the copy if the first try landed, within its duplicate
window). Each message carries ``Mrt-Crc`` (CRC-32 of the payload). A reader is an ordered
consumer of one instance's subject, started at a stream sequence (the trainer's checkpoint keeps
those per log, as it keeps segment-log indices locally); a message whose CRC does not match, or
whose message id was already read, is counted (``corrupt``, ``duplicates``), logged and skipped:
never decoded. ``Follower`` (the push consumer with its stall watchdog) serves the delta reader
too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

from nats.js import api

from server.streams.bus import BusError
from server.streams.jetstream.client import (FRAME, HEADER_SLACK, LOG_PUBLISH_BUDGET_S, PUBLISH_TIMEOUT_S,
                                             RETRY_PAUSE_S, STALL_S, STREAM_NAMES, crc, raising, retrying)

if TYPE_CHECKING:
    from server.streams.jetstream.streams import JetStreamStreams

log = logging.getLogger(__name__)


def frame_records(records: list[bytes]) -> bytes:
    """One log message's payload: each record as u32 length (little-endian) + bytes."""
    return b"".join(FRAME.pack(len(r)) + r for r in records)


def unframe_records(data: bytes) -> list[bytes] | None:
    """Inverse of ``frame_records``; None when the lengths do not add up exactly."""
    out, at = [], 0
    while at < len(data):
        if at + FRAME.size > len(data):
            return None
        (n,) = FRAME.unpack_from(data, at)
        at += FRAME.size
        if at + n > len(data):
            return None
        out.append(data[at:at + n])
        at += n
    return out


class JetStreamLogWriter:
    """Publishes one instance's log records (see the module docstring: append buffers, sync publishes
    the buffered records framed into as few messages as the max payload allows)."""

    def __init__(self, streams: JetStreamStreams, stream: str, instance: str):
        self._streams, self._subject = streams, streams.subject(stream, instance)
        self.max_payload_bytes = streams.max_payload - HEADER_SLACK - FRAME.size
        self._prefix = f"{instance}.{os.getpid()}.{time.time_ns()}"  # message ids unique across restarts
        self._count = 0
        self._buffer: list[bytes] = []

    def append(self, payload: bytes) -> int:
        if len(payload) > self.max_payload_bytes:
            raise ValueError(f"payload of {len(payload)} bytes exceeds the bus's max payload "
                             f"({self.max_payload_bytes} bytes for a log record)")
        self._buffer.append(bytes(payload))
        return len(self._buffer)

    def sync(self) -> None:
        """Publishes the buffered records and returns once JetStream acknowledged every message; raises
        BusError when some stay unacknowledged for LOG_PUBLISH_BUDGET_S (they may still land)."""
        records, self._buffer = self._buffer, []
        messages, part, size = [], [], 0
        for record in records:
            if part and size + FRAME.size + len(record) > self.max_payload_bytes + FRAME.size:
                messages.append(part)
                part, size = [], 0
            part.append(record)
            size += FRAME.size + len(record)
        if part:
            messages.append(part)
        batch = []
        for part in messages:
            self._count += 1
            batch.append((f"{self._prefix}.{self._count}", frame_records(part)))
        if batch:
            self._streams.run(self._publish(batch), LOG_PUBLISH_BUDGET_S + PUBLISH_TIMEOUT_S + 5)

    async def _publish(self, batch: list[tuple[str, bytes]]) -> None:
        js = self._streams.js
        pending, error = batch, None
        deadline = time.monotonic() + LOG_PUBLISH_BUDGET_S
        while True:
            futures = []
            for msg_id, payload in pending:
                try:
                    futures.append(asyncio.wait_for(await js.publish_async(
                        self._subject, payload, headers={"Nats-Msg-Id": msg_id, "Mrt-Crc": crc(payload)}),
                        PUBLISH_TIMEOUT_S))
                except Exception as exc:  # not even sent (a reconnect under way): tried again below
                    futures.append(raising(exc))
            done = await asyncio.gather(*futures, return_exceptions=True)
            failed = [(item, outcome) for item, outcome in zip(pending, done) if isinstance(outcome, BaseException)]
            if not failed:
                return
            pending, error = [item for item, _ in failed], failed[0][1]
            if time.monotonic() >= deadline:
                raise BusError(f"{len(pending)} of {len(batch)} records to {self._subject} not acknowledged "
                               f"within {LOG_PUBLISH_BUDGET_S:.0f} s: {error!r}")
            await asyncio.sleep(RETRY_PAUSE_S)

    def close(self) -> None:
        self.sync()


class Follower:
    """An ordered push consumer from a stream sequence; messages land in ``queue`` on the loop thread.
    ``stalled`` is the readers' watchdog: the client resets an ordered consumer by itself after missed
    heartbeats, but a reset attempted during a leader election can fail for good, and then nothing
    arrives ever again while the stream grows; the reader then starts a new follower."""

    def __init__(self, streams: JetStreamStreams, stream: str, subject: str, start_seq: int):
        self._streams = streams
        self.queue: deque = deque()
        self.last_activity = self._last_check = time.monotonic()
        policy = {"deliver_policy": api.DeliverPolicy.ALL} if start_seq <= 0 else {
            "deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE, "config": api.ConsumerConfig(opt_start_seq=start_seq)}

        async def on_message(msg):
            self.queue.append(msg)
            self.last_activity = time.monotonic()

        async def subscribe():  # a lost try leaves at most an ephemeral consumer that the server drops
            return await retrying(lambda: streams.js.subscribe(subject, stream=STREAM_NAMES[stream], cb=on_message,
                                                                ordered_consumer=True, idle_heartbeat=1.0, **policy))
        self._sub = streams.run(subscribe(), 40.0)

    def stalled(self, behind) -> bool:
        """True when nothing arrived for STALL_S and ``behind()`` (asked at most every STALL_S) says the
        stream holds more than was delivered."""
        now = time.monotonic()
        if self.queue or now - self.last_activity < STALL_S or now - self._last_check < STALL_S:
            return False
        self._last_check = now
        try:
            return bool(behind())
        except Exception as exc:  # the bus unreachable: nothing to conclude yet
            log.debug("bus: stall check: %r", exc)
            return False

    def take(self, limit: int) -> list:
        out = []
        while self.queue and len(out) < limit:
            out.append(self.queue.popleft())
        return out

    def close(self) -> None:
        try:
            self._streams.run(self._sub.unsubscribe(), 5.0)
        except Exception as exc:
            log.debug("bus: unsubscribe: %r", exc)


class JetStreamLogReader:
    """Reads one log (``instance`` = "<replica>.<instance>") from stream sequence ``start_record``
    (0: the beginning); ``read`` returns [(stream sequence of its message, record)] for up to
    ``max_records`` messages (each whole, so a position never falls inside one), ``next_record``
    the next message's sequence."""

    def __init__(self, streams: JetStreamStreams, stream: str, instance: str, start_record: int = 0,
                 remember_ids: int = 100_000):
        self.name = f"{stream}/{instance}"
        self.next_record = int(start_record)
        self.corrupt = self.duplicates = self.refollows = 0
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remember = remember_ids
        self._streams, self._stream, self._subject = streams, stream, streams.subject(stream, instance)
        self._follower = Follower(streams, stream, self._subject, self.next_record)

    def _behind(self) -> bool:
        last = self._streams.run(retrying(lambda: self._streams.js._jsm.get_last_msg(
            STREAM_NAMES[self._stream], self._subject), 5.0), 10.0)
        return last.seq >= self.next_record

    def read(self, max_records: int | None = None) -> list[tuple[int, bytes]]:
        if self._follower.stalled(self._behind):
            self.refollows += 1
            log.warning("%s: no message for %.0f s while the stream has more: following again from stream seq %d",
                        self.name, STALL_S, self.next_record)
            self._follower.close()
            self._follower = Follower(self._streams, self._stream, self._subject, self.next_record)
        out = []
        for msg in self._follower.take(max_records or 1 << 30):
            seq = msg.metadata.sequence.stream
            if seq < self.next_record:
                continue  # redelivered by a reset ordered consumer
            self.next_record = seq + 1
            headers = msg.headers or {}
            msg_id = headers.get("Nats-Msg-Id")
            if headers.get("Mrt-Crc") != crc(msg.data):
                self.corrupt += 1
                log.error("%s: message at stream seq %d fails its checksum (Mrt-Crc %s, computed %s): skipped",
                          self.name, seq, headers.get("Mrt-Crc"), crc(msg.data))
                continue
            records = unframe_records(msg.data)
            if records is None:
                self.corrupt += 1
                log.error("%s: message at stream seq %d does not frame whole records: skipped", self.name, seq)
                continue
            if msg_id is not None:
                if msg_id in self._seen:
                    self.duplicates += 1
                    log.warning("%s: message id %s at stream seq %d was already read: skipped", self.name, msg_id,
                                seq)
                    continue
                self._seen[msg_id] = None
                if len(self._seen) > self._remember:
                    self._seen.popitem(last=False)
            out += [(seq, record) for record in records]
        return out

    def close(self) -> None:
        self._follower.close()
