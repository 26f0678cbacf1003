"""The bus connection's machinery shared by every JetStream module: the names on the bus, the
event loop thread the client runs on, and the retry rules for a failover.

Concurrency: one event loop thread per ``JetStreamStreams`` runs the nats client; the other
modules' methods are called from other threads and wait on it (``Loop.run``).
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
import zlib

import nats
import nats.js.errors

from server.streams.names import DELTAS, FEATURES, FEEDBACK
from server.streams.bus import BusError

STREAM_NAMES = {FEATURES: "MONOLITH_FEATURES", FEEDBACK: "MONOLITH_FEEDBACK", DELTAS: "MONOLITH_DELTAS"}
SUBJECT_PREFIX = {FEATURES: "monolith.features", FEEDBACK: "monolith.feedback"}
DELTA_SUBJECT = "monolith.deltas"
SNAPSHOT_BUCKET = "monolith_snapshots"
POINTER_BUCKET = "monolith_pointers"
POINTER_KEY = "snapshot"
LEASE_BUCKET = "monolith_lease"  # key-value, entries expire LEASE_TTL_S after their last write
LEASE_KEY = "trainer"
LEASE_TTL_S = 10.0
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed Nats-Expected-Last-Sequence
FRAME = struct.Struct("<I")
HEADER_SLACK = 512  # bytes of headers and subject kept free below the server's max payload
PUBLISH_TIMEOUT_S = 5.0  # one publish's wait for its acknowledgement
LOG_PUBLISH_BUDGET_S = 10.0  # a log record unacknowledged this long is reported failed (feedback: not acked)
DELTA_PUBLISH_BUDGET_S = 60.0  # the trainer waits out a failover (a reconnect, a leader election) rather than stop
RETRY_PAUSE_S = 0.25
PING_INTERVAL_S = 2.0
STALL_S = 3.0  # a follower silent this long while its stream has more is replaced


class Loop:
    """An asyncio loop on a daemon thread; ``run`` waits for a coroutine from any other thread."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro, timeout_s: float | None = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)


TRANSIENT = (asyncio.TimeoutError, nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError,
             nats.js.errors.ServiceUnavailableError)  # a failover or an election under way


async def retrying(call, budget_s: float = 20.0):
    """``await call()``, again after a transient failure, for up to ``budget_s`` (idempotent reads only)."""
    deadline = time.monotonic() + budget_s
    while True:
        try:
            return await call()
        except TRANSIENT:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(RETRY_PAUSE_S)


async def raising(exc: Exception):
    """An awaitable that raises ``exc`` (stands for a publish that was not even sent)."""
    raise exc


def crc(data: bytes) -> str:
    """The ``Mrt-Crc`` header: CRC-32 of a payload, 8 hex digits."""
    return f"{zlib.crc32(data):08x}"


async def wait_leader(js, stream: str, timeout_s: float = 20.0) -> None:
    """Returns once ``stream`` (or a bucket's stream) has a leader; BusError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = await js.stream_info(stream)
        if info.cluster is None or info.cluster.leader:
            return
        if time.monotonic() > deadline:
            raise BusError(f"stream {stream} has no leader after {timeout_s:.0f} s")
        await asyncio.sleep(0.05)
