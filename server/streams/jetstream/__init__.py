"""The NATS JetStream backend of the streams: many serving replicas, one trainer, across hosts.

``JetStreamStreams`` (configured by server.streams.bus.BusConfig) has the interface of the local ``Streams`` (server.streams): the ranker,
feedback model, updater and trainer call the same methods whichever backend ``open_streams``
gave them. The record bytes are those of the local backend (updater.delta, server.streams.records).

    local name  JetStream                    subjects                              writers
    FEATURES    stream MONOLITH_FEATURES     monolith.features.<replica>.<instance> every replica
    FEEDBACK    stream MONOLITH_FEEDBACK     monolith.feedback.<replica>.<instance> every replica
    DELTAS      stream MONOLITH_DELTAS       monolith.deltas                        the trainer only
    SNAPSHOTS   object store monolith_snapshots ("snapshot-<seq:020d>": a tar of the
                snapshot directory) + key-value monolith_pointers["snapshot"] -> the newest
                {"seq", "object", "sha256", "bytes", "position"}  (position: the stream sequence
                of the first DELTAS message after the snapshot)
    CHECKPOINTS stay local: the trainer is one process (trainer.checkpoint)

Logs (FEATURES, FEEDBACK). A writer has the segment writer's interface, so the
BackgroundAppender (group commit, shedding) drives it unchanged: ``append`` buffers, ``sync``
publishes everything buffered, framed (u32 length + record, as many per message as the max
payload allows: one acknowledgement per group, not per record, keeps the client's event loop
from competing with the ranker's thread for the GIL per request), and waits for every
acknowledgement, retrying unacknowledged messages with the same ``Nats-Msg-Id`` (the stream drops the copy if the first try landed,
within its duplicate window). Each message carries ``Mrt-Crc`` (CRC-32 of the payload). A log
reader is an ordered consumer of one instance's subject, started at a stream sequence (the
trainer's checkpoint keeps those per log, as it keeps segment-log indices locally); a message
whose CRC does not match, or whose message id was already read, is counted (``corrupt``,
``duplicates``), logged and skipped: never decoded.

Deltas. One record = one or more consecutive messages: a record larger than the server's max
payload is split into parts. Headers::

    Nats-Msg-Id                 <writer id>.<seq>.<part>   (a retry is dropped as a duplicate)
    Nats-Expected-Last-Sequence the stream sequence this writer last wrote (or found at start)
    Mrt-Seq / Mrt-Part / Mrt-Parts / Mrt-Crc
                                delta seq, part index, part count, CRC-32 of the whole record

Two fences keep the trainer the only writer. A lease: the writer creates a key-value entry
(``monolith_lease``/trainer) that expires LEASE_TTL_S after its last refresh, and refreshes it
with an expected revision; a second trainer finds it held and refuses to start (after waiting a
TTL for a dead holder's entry to expire). And the expected last sequence on every publish: when
another writer has published since (a zombie whose lease expired while it was paused), the
stream refuses the publish (JetStream error 10071) and the writer raises ``FencedError`` and
writes nothing more, so records never interleave. A reader reassembles parts in stream order and checks the part numbering, the
record CRC and then the record's own CRC (DeltaRecord.decode), and that seqs follow each other
without a gap; a record already seen (seq at or below the last one) is counted in
``duplicates`` and skipped; anything else raises DeltaError, which halts the updater (nothing of
the bad record is applied) until a snapshot past it is loaded.

Durability. Streams are created with ``num_replicas`` (3 on a cluster): a publish is
acknowledged once a quorum (2 of 3) has it; that survives kill -9 of any one server. JetStream
fsyncs in the background (``sync_interval``, default 2 minutes) unless a server runs with
``sync_interval: always``; without it, acknowledged messages written in the last interval can be
lost if a quorum of hosts loses power (or its page cache) at once. See the README's section on
scale-out for what each deployment relies on.

Concurrency: one event loop thread per ``JetStreamStreams`` runs the client; the methods here
are called from other threads and wait on it (``_Loop.run``).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import struct
import tarfile
import threading
import time
import zlib
from collections import OrderedDict, deque
from pathlib import Path

import nats
import nats.js.errors
from nats.js import api
from nats.js.errors import APIError, NotFoundError

from server.streams import DELTAS, FEATURES, FEEDBACK, LOGS, Streams
from server.streams.bus import NAME as _NAME, BusConfig, BusError, FencedError  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

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
_FRAME = struct.Struct("<I")
HEADER_SLACK = 512  # bytes of headers and subject kept free below the server's max payload
PUBLISH_TIMEOUT_S = 5.0  # one publish's wait for its acknowledgement
LOG_PUBLISH_BUDGET_S = 10.0  # a log record unacknowledged this long is reported failed (feedback: not acked)
DELTA_PUBLISH_BUDGET_S = 60.0  # the trainer waits out a failover (a reconnect, a leader election) rather than stop
RETRY_PAUSE_S = 0.25
PING_INTERVAL_S = 2.0
STALL_S = 3.0  # a follower silent this long while its stream has more is replaced


class _Loop:
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


_TRANSIENT = (asyncio.TimeoutError, nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError,
              nats.js.errors.ServiceUnavailableError)  # a failover or an election under way


async def _retrying(call, budget_s: float = 20.0):
    """``await call()``, again after a transient failure, for up to ``budget_s`` (idempotent reads only)."""
    deadline = time.monotonic() + budget_s
    while True:
        try:
            return await call()
        except _TRANSIENT:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(RETRY_PAUSE_S)


async def _failed(exc: Exception):
    raise exc


def _crc(data: bytes) -> str:
    return f"{zlib.crc32(data):08x}"


async def _wait_leader(js, stream: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        info = await js.stream_info(stream)
        if info.cluster is None or info.cluster.leader:
            return
        if time.monotonic() > deadline:
            raise BusError(f"stream {stream} has no leader after {timeout_s:.0f} s")
        await asyncio.sleep(0.05)


class JetStreamStreams(Streams):
    """The streams on NATS JetStream (see the module docstring); snapshots and checkpoints also
    stay in ``data_dir`` as local files (a replica fetches the newest snapshot into it)."""

    def __init__(self, data_dir, config: BusConfig, connect_timeout_s: float = 10.0):
        super().__init__(data_dir)
        if config.local:
            raise ValueError("JetStreamStreams requires a nats:// bus, got 'local'")
        self.config, self.replica = config, config.replica
        self.reconnects = self.disconnects = 0
        self.errors: deque[str] = deque(maxlen=100)
        self._loop = _Loop(f"nats-{config.replica}")
        self._instances_cache: dict[str, tuple[float, list[str]]] = {}
        self._writers: list = []
        self._uploaded: list[str] = []  # snapshot objects this process wrote (and older ones it found), oldest first
        try:
            self.nc = self._loop.run(self._connect(connect_timeout_s), connect_timeout_s + 5)
        except Exception as exc:
            self._loop.stop()
            raise BusError(f"cannot connect to the bus {config.url}: {exc!r}") from exc
        self.js = self.nc.jetstream(timeout=PUBLISH_TIMEOUT_S)
        self.max_payload = self.nc.max_payload

    async def _connect(self, timeout_s: float):
        async def reconnected():
            self.reconnects += 1
            log.warning("bus: reconnected to %s", self.nc.connected_url.netloc if self.nc.connected_url else "?")

        async def disconnected():
            self.disconnects += 1

        async def error(exc):
            self.errors.append(str(exc))  # e.g. 'nats: permissions violation for publish to "..."'
            log.warning("bus: %r", exc)

        return await nats.connect(self.config.servers, name=f"monolith-{self.config.replica}",
                                  connect_timeout=timeout_s, max_reconnect_attempts=-1, reconnect_time_wait=0.25,
                                  allow_reconnect=True, reconnected_cb=reconnected, disconnected_cb=disconnected,
                                  # a silent link (a partition, not a reset) is noticed within ~6 s, not 4 min
                                  ping_interval=PING_INTERVAL_S, max_outstanding_pings=2,
                                  error_cb=error, **self.config.connect_options())

    def run(self, coro, timeout_s: float | None = 30.0):
        return self._loop.run(coro, timeout_s)

    # ------------------------------------------------------------------ setup

    def ensure_streams(self, replicas: int | None = None, log_max_age_s: float = 0.0,
                       duplicate_window_s: float = 120.0) -> None:
        """Creates (or updates) the three streams and the two buckets; requires the trainer's rights.
        ``replicas``: copies of each (default 3 when the bus names 3 or more servers, else 1).
        ``log_max_age_s`` > 0 bounds FEATURES and FEEDBACK by age (the delta stream is trimmed by the
        trainer after each snapshot, trainer.retention)."""
        replicas = replicas or (3 if len(self.config.servers) >= 3 else 1)
        self.run(self._ensure(replicas, log_max_age_s, duplicate_window_s), 60.0)

    async def _ensure(self, replicas: int, log_max_age_s: float, duplicate_window_s: float) -> None:
        js = self.js
        for stream, subjects, max_age in ((FEATURES, [f"{SUBJECT_PREFIX[FEATURES]}.>"], log_max_age_s),
                                          (FEEDBACK, [f"{SUBJECT_PREFIX[FEEDBACK]}.>"], log_max_age_s),
                                          (DELTAS, [DELTA_SUBJECT], 0.0)):
            config = api.StreamConfig(name=STREAM_NAMES[stream], subjects=subjects, num_replicas=replicas,
                                      storage=api.StorageType.FILE, max_age=max_age or None,
                                      duplicate_window=duplicate_window_s, max_msg_size=self.max_payload)
            try:
                await js.add_stream(config)
            except APIError as exc:
                if "already in use" not in str(exc.description):
                    raise
                await js.update_stream(config)
            await _wait_leader(js, STREAM_NAMES[stream])
        await js.create_object_store(SNAPSHOT_BUCKET, api.ObjectStoreConfig(bucket=SNAPSHOT_BUCKET,
                                                                           replicas=replicas))
        await js.create_key_value(api.KeyValueConfig(bucket=POINTER_BUCKET, replicas=replicas, history=5))
        await js.create_key_value(api.KeyValueConfig(bucket=LEASE_BUCKET, replicas=replicas, ttl=LEASE_TTL_S))
        for bucket in (f"OBJ_{SNAPSHOT_BUCKET}", f"KV_{POINTER_BUCKET}", f"KV_{LEASE_BUCKET}"):
            await _wait_leader(js, bucket)

    # ------------------------------------------------------------------ logs

    def subject(self, stream: str, instance: str) -> str:
        if stream not in LOGS:
            raise ValueError(f"stream requires one of {LOGS}, got {stream!r}")
        return f"{SUBJECT_PREFIX[stream]}.{instance}"

    def path(self, stream: str, instance: str | None = None) -> Path:
        if stream in LOGS or stream == DELTAS:
            raise ValueError(f"stream {stream!r} lives in JetStream ({self.config.url}), not in a directory")
        return super().path(stream, instance)

    def open_writer(self, stream: str, instance: str | None = None, **options) -> "JetStreamLogWriter":
        """A writer for this replica's log of ``instance`` (``options`` of the segment writer are ignored)."""
        if not instance or not _NAME.match(instance):
            raise ValueError(f"instance requires 1-64 of [A-Za-z0-9_-], got {instance!r}")
        return JetStreamLogWriter(self, stream, f"{self.config.replica}.{instance}")

    def instances(self, stream: str) -> list[str]:
        """The "<replica>.<instance>" logs of ``stream`` that hold messages (cached for a second)."""
        if stream not in LOGS:
            raise ValueError(f"stream requires one of {LOGS}, got {stream!r}")
        cached = self._instances_cache.get(stream)
        if cached is not None and time.monotonic() - cached[0] < 1.0:
            return cached[1]
        info = self.run(_retrying(lambda: self.js.stream_info(STREAM_NAMES[stream], subjects_filter=">")))
        prefix = SUBJECT_PREFIX[stream] + "."
        found = sorted(s[len(prefix):] for s in (info.state.subjects or {}) if s.startswith(prefix))
        self._instances_cache[stream] = (time.monotonic(), found)
        return found

    def open_reader(self, stream: str, instance: str | None = None, start_record: int = 0,
                    **options) -> "JetStreamLogReader":
        return JetStreamLogReader(self, stream, instance, start_record)

    # ------------------------------------------------------------------ deltas

    def open_delta_writer(self, lease_wait_s: float = LEASE_TTL_S + 2, **options) -> "JetStreamDeltaWriter":
        """The delta stream's writer, once it holds the trainer lease (waits up to ``lease_wait_s`` for
        a previous holder's lease to expire; raises FencedError if another trainer still holds it)."""
        writer = JetStreamDeltaWriter(self, lease_wait_s)
        self._writers.append(writer)
        return writer

    def open_delta_reader(self, after_seq: int = 0) -> "JetStreamDeltaReader":
        return JetStreamDeltaReader(self, after_seq)

    async def _message(self, stream_seq: int):
        """The first DELTAS message at or after ``stream_seq`` (None: none yet)."""
        try:
            return await _retrying(lambda: self.js._jsm.get_msg(STREAM_NAMES[DELTAS], seq=stream_seq,
                                                                 subject=DELTA_SUBJECT, next=True))
        except NotFoundError:
            return None
        except APIError as exc:
            if exc.err_code == 10037:  # no message found
                return None
            raise

    async def _position(self, seq: int) -> tuple[int, int | None]:
        """(stream sequence of the first message of the first record with delta seq >= ``seq``, its seq);
        (last + 1, None) when there is none yet. Binary search over the stream's retained messages."""
        info = await _retrying(lambda: self.js.stream_info(STREAM_NAMES[DELTAS]))
        first, last = info.state.first_seq, info.state.last_seq
        if info.state.messages == 0:
            return last + 1, None
        lo, hi = first, last + 1  # invariant: messages before lo carry seq < `seq`; hi is a candidate
        while lo < hi:
            mid = (lo + hi) // 2
            msg = await self._message(mid)
            if msg is None or int(msg.headers["Mrt-Seq"]) >= seq:
                hi = mid
            else:
                lo = msg.seq + 1
        msg = await self._message(lo) if lo <= last else None
        if msg is None:
            return last + 1, None
        # Step back to the record's first part (a record starts at part 0).
        part = int(msg.headers.get("Mrt-Part", "0"))
        return msg.seq - part, int(msg.headers["Mrt-Seq"])

    def delta_head(self) -> tuple[int, float]:
        """(seq of the newest record in the delta stream, its publish time as Unix seconds); (0, 0) if empty."""
        async def head():
            try:
                msg = await self.js._jsm.get_last_msg(STREAM_NAMES[DELTAS], DELTA_SUBJECT)
            except (NotFoundError, APIError):
                return 0, 0.0
            return int(msg.headers["Mrt-Seq"]), msg.time.timestamp() if msg.time else 0.0
        return self.run(head(), 10.0)

    def delta_lag(self, applied_seq: int) -> tuple[int, float]:
        """(records behind the stream head, seconds since the oldest unapplied record was published)."""
        head_seq, _ = self.delta_head()
        if head_seq <= applied_seq:
            return 0, 0.0

        async def oldest():
            position, seq = await self._position(applied_seq + 1)
            msg = await self._message(position) if seq is not None else None
            return msg.time.timestamp() if msg is not None and msg.time else time.time()
        return head_seq - applied_seq, max(0.0, time.time() - self.run(oldest(), 10.0))

    # ------------------------------------------------------------------ snapshots

    def publish_snapshot(self, directory: Path, seq: int, keep: int = 2) -> dict:
        """Uploads a snapshot directory to the object store, then points the key-value entry at it;
        older objects beyond ``keep`` are deleted. Returns the pointer."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for child in sorted(Path(directory).iterdir()):
                tar.add(child, arcname=child.name)
        data = buffer.getvalue()
        name = f"snapshot-{int(seq):020d}"

        async def upload():
            store = await self.js.object_store(SNAPSHOT_BUCKET)
            await store.put(name, data)
            position, _ = await self._position(seq + 1)
            pointer = {"seq": int(seq), "object": name, "sha256": hashlib.sha256(data).hexdigest(),
                       "bytes": len(data), "position": position}
            kv = await self.js.key_value(POINTER_BUCKET)
            if not self._uploaded:  # the newest before this process's first upload
                previous = await self._read_pointer(kv)
                self._uploaded += [previous["object"]] if previous else []
            await kv.put(POINTER_KEY, json.dumps(pointer).encode())
            self._uploaded.append(name)
            while len(self._uploaded) > max(keep, 1):
                try:
                    await store.delete(self._uploaded[0])
                except Exception as exc:  # gone already: nothing to keep track of
                    log.warning("snapshot store: deleting %s: %r", self._uploaded[0], exc)
                del self._uploaded[0]
            return pointer
        return self.run(upload(), 120.0)

    @staticmethod
    async def _read_pointer(kv) -> dict | None:
        try:
            entry = await kv.get(POINTER_KEY)
        except nats.js.errors.KeyNotFoundError:
            return None
        return json.loads(entry.value)

    def snapshot_pointer(self) -> dict | None:
        async def read():
            return await self._read_pointer(await self.js.key_value(POINTER_BUCKET))
        return self.run(read(), 20.0)

    def fetch_snapshot(self) -> Path | None:
        """Downloads the newest snapshot named by the pointer into ``data_dir``/snapshots/<seq>, unless
        a local snapshot is at least as new; returns the directory written, or None. A download whose
        SHA-256 differs from the pointer's, or a tar holding anything but plain files, is refused."""
        from server.snapshot import atomic_directory, list_snapshots, snapshot_root

        pointer = self.snapshot_pointer()
        if pointer is None:
            return None
        local = list_snapshots(self.data_dir)
        if local and int(local[-1].name) >= pointer["seq"]:
            return None

        async def download():
            store = await self.js.object_store(SNAPSHOT_BUCKET)
            return (await store.get(pointer["object"])).data
        data = self.run(download(), 120.0)
        digest = hashlib.sha256(data).hexdigest()
        if digest != pointer["sha256"]:
            raise BusError(f"snapshot {pointer['object']}: SHA-256 {digest}, the pointer requires "
                           f"{pointer['sha256']}: not loaded")
        final = snapshot_root(self.data_dir) / f"{int(pointer['seq']):020d}"
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = tar.getmembers()
            bad = [m.name for m in members if not m.isfile() or "/" in m.name or m.name.startswith(".")]
            if bad:
                raise BusError(f"snapshot {pointer['object']} holds entries that are not plain files: {bad}")
            try:
                with atomic_directory(final) as tmp:
                    for member in members:
                        (tmp / member.name).write_bytes(tar.extractfile(member).read())
            except OSError:
                if not final.is_dir():  # else another instance of this server fetched it meanwhile
                    raise
        log.info("fetched snapshot %s (seq %d, %d bytes) from the bus", pointer["object"], pointer["seq"], len(data))
        return final

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        try:
            self.run(self.nc.drain(), 10.0)
        except Exception as exc:
            log.warning("bus: closing the connection: %r", exc)
        self._loop.stop()


def frame_records(records: list[bytes]) -> bytes:
    """One log message's payload: each record as u32 length (little-endian) + bytes."""
    return b"".join(_FRAME.pack(len(r)) + r for r in records)


def unframe_records(data: bytes) -> list[bytes] | None:
    """Inverse of ``frame_records``; None when the lengths do not add up exactly."""
    out, at = [], 0
    while at < len(data):
        if at + _FRAME.size > len(data):
            return None
        (n,) = _FRAME.unpack_from(data, at)
        at += _FRAME.size
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
        self.max_payload_bytes = streams.max_payload - HEADER_SLACK - _FRAME.size
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
            if part and size + _FRAME.size + len(record) > self.max_payload_bytes + _FRAME.size:
                messages.append(part)
                part, size = [], 0
            part.append(record)
            size += _FRAME.size + len(record)
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
                        self._subject, payload, headers={"Nats-Msg-Id": msg_id, "Mrt-Crc": _crc(payload)}),
                        PUBLISH_TIMEOUT_S))
                except Exception as exc:  # not even sent (a reconnect under way): tried again below
                    futures.append(_failed(exc))
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


class _Follower:
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
            return await _retrying(lambda: streams.js.subscribe(subject, stream=STREAM_NAMES[stream], cb=on_message,
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
        self._follower = _Follower(streams, stream, self._subject, self.next_record)

    def _behind(self) -> bool:
        last = self._streams.run(_retrying(lambda: self._streams.js._jsm.get_last_msg(
            STREAM_NAMES[self._stream], self._subject), 5.0), 10.0)
        return last.seq >= self.next_record

    def read(self, max_records: int | None = None) -> list[tuple[int, bytes]]:
        if self._follower.stalled(self._behind):
            self.refollows += 1
            log.warning("%s: no message for %.0f s while the stream has more: following again from stream seq %d",
                        self.name, STALL_S, self.next_record)
            self._follower.close()
            self._follower = _Follower(self._streams, self._stream, self._subject, self.next_record)
        out = []
        for msg in self._follower.take(max_records or 1 << 30):
            seq = msg.metadata.sequence.stream
            if seq < self.next_record:
                continue  # redelivered by a reset ordered consumer
            self.next_record = seq + 1
            headers = msg.headers or {}
            msg_id = headers.get("Nats-Msg-Id")
            if headers.get("Mrt-Crc") != _crc(msg.data):
                self.corrupt += 1
                log.error("%s: message at stream seq %d fails its checksum (Mrt-Crc %s, computed %s): skipped",
                          self.name, seq, headers.get("Mrt-Crc"), _crc(msg.data))
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


class JetStreamDeltaWriter:
    """The delta stream's one writer: it holds the trainer lease (a key-value entry it rewrites every
    LEASE_TTL_S / 4, which expires LEASE_TTL_S after the last rewrite) and every publish is fenced by
    the expected last sequence (module docstring). The lease keeps a second trainer from starting
    while one runs; the expected sequence keeps records from interleaving even when a paused
    holder (a zombie) lost its lease without knowing."""

    def __init__(self, streams: JetStreamStreams, lease_wait_s: float = LEASE_TTL_S + 2):
        self._streams = streams
        self.writer_id = f"w{os.getpid()}-{time.time_ns()}"
        self.fenced: str | None = None
        self.part_bytes = streams.max_payload - HEADER_SLACK
        self._heartbeat = None
        streams.run(self._acquire(lease_wait_s), lease_wait_s + 30)

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

    async def _acquire(self, wait_s: float) -> None:
        kv = await self._streams.js.key_value(LEASE_BUCKET)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                revision = await kv.create(LEASE_KEY, self.writer_id.encode())
                break
            except (asyncio.TimeoutError, nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError) as exc:
                if time.monotonic() >= deadline:  # the bus did not answer (a failover): not a verdict
                    raise BusError(f"trainer lease: no answer from the bus within {wait_s:.0f} s: {exc!r}") from exc
            except nats.js.errors.KeyWrongLastSequenceError:
                if time.monotonic() >= deadline:
                    try:
                        holder = (await kv.get(LEASE_KEY)).value.decode()
                    except Exception:
                        holder = "?"
                    raise FencedError(f"another trainer ({holder}) holds the lease on the delta stream "
                                      f"{STREAM_NAMES[DELTAS]}: refusing to write (a lease expires {LEASE_TTL_S:.0f} s "
                                      f"after its holder stops; waited {wait_s:.0f} s)") from None
                await asyncio.sleep(0.5)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat(kv, revision))

    async def _beat(self, kv, revision: int) -> None:
        while not self.fenced:
            await asyncio.sleep(LEASE_TTL_S / 4)
            try:
                revision = await kv.update(LEASE_KEY, self.writer_id.encode(), last=revision)
                continue
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            except Exception as exc:  # a transient bus failure: the next beat tries again
                log.warning("trainer lease refresh failed: %r", exc)
                continue
            try:  # it expired (refreshes lost in a failover) and nobody took it: take it again; the
                # expected last sequence on every publish still refuses us if another writer wrote since
                revision = await kv.create(LEASE_KEY, self.writer_id.encode())
                log.warning("trainer lease had expired (refreshes lost to the bus); taken again")
            except nats.js.errors.KeyWrongLastSequenceError:
                self.fenced = (f"the trainer lease on the delta stream {STREAM_NAMES[DELTAS]} was taken by another "
                               f"trainer after it expired (this trainer, {self.writer_id}, was paused or cut off past "
                               f"{LEASE_TTL_S:.0f} s): this trainer stops")
                log.error("%s", self.fenced)
            except Exception as exc:
                log.warning("trainer lease: taking it again failed: %r", exc)

    def append(self, record) -> int:
        if self.fenced:
            raise FencedError(self.fenced)
        if record.seq != self.next_seq:
            raise ValueError(f"delta seq requires {self.next_seq} (next in the stream), got {record.seq}")
        data = record.encode()
        parts = [data[i:i + self.part_bytes] for i in range(0, len(data), self.part_bytes)] or [b""]
        crc = _crc(data)
        for index, part in enumerate(parts):
            headers = {"Nats-Msg-Id": f"{self.writer_id}.{record.seq}.{index}",
                       "Nats-Expected-Last-Sequence": str(self._last_position),
                       "Mrt-Seq": str(record.seq), "Mrt-Part": str(index), "Mrt-Parts": str(len(parts)),
                       "Mrt-Crc": crc}
            self._last_position = self._streams.run(self._publish(part, headers, record.seq),
                                                    DELTA_PUBLISH_BUDGET_S + PUBLISH_TIMEOUT_S + 5)
        self.next_seq = record.seq + 1
        return record.seq

    async def _publish(self, part: bytes, headers: dict, seq: int) -> int:
        error, deadline = None, time.monotonic() + DELTA_PUBLISH_BUDGET_S
        while time.monotonic() < deadline:
            try:
                ack = await self._streams.js.publish(DELTA_SUBJECT, part, timeout=PUBLISH_TIMEOUT_S,
                                                     headers=dict(headers))
                return ack.seq
            except APIError as exc:
                if exc.err_code == WRONG_LAST_SEQUENCE:
                    self.fenced = (f"delta stream {STREAM_NAMES[DELTAS]}: another writer published after stream "
                                   f"seq {headers['Nats-Expected-Last-Sequence']} (JetStream: {exc.description}); "
                                   f"this trainer ({self.writer_id}) is fenced at delta seq {seq} and stops")
                    raise FencedError(self.fenced) from exc
                error = exc
            except (asyncio.TimeoutError, nats.errors.Error) as exc:
                error = exc  # the same message id again: JetStream drops it if the first try landed
            await asyncio.sleep(RETRY_PAUSE_S)
        raise BusError(f"delta seq {seq}: not acknowledged within {DELTA_PUBLISH_BUDGET_S:.0f} s: {error!r}")

    def delete_before(self, seq: int) -> list:
        """Retention: purges the messages of records with delta seq < ``seq``; returns [purged count]."""
        async def purge():
            position, _ = await self._streams._position(seq)
            info = await self._streams.js.stream_info(STREAM_NAMES[DELTAS])
            if position <= info.state.first_seq:
                return 0
            await self._streams.js.purge_stream(STREAM_NAMES[DELTAS], seq=position)
            return position - info.state.first_seq
        purged = self._streams.run(purge(), 30.0)
        return [purged] if purged else []

    def close(self) -> None:
        """Gives the lease up (a successor need not wait for it to expire)."""
        if self._heartbeat is None:
            return
        heartbeat, self._heartbeat = self._heartbeat, None

        async def release():
            heartbeat.cancel()
            if not self.fenced:
                kv = await self._streams.js.key_value(LEASE_BUCKET)
                entry = await kv.get(LEASE_KEY)
                if entry.value == self.writer_id.encode():
                    await kv.purge(LEASE_KEY)
        try:
            self._streams.run(release(), 10.0)
        except Exception as exc:
            log.warning("releasing the trainer lease: %r", exc)


class JetStreamDeltaReader:
    """Follows the delta stream after delta seq ``after_seq`` (module docstring: reassembly, checks).
    Like FileDeltaReader, ``read`` returns the good records before a bad one and then raises, and
    the error is sticky."""

    def __init__(self, streams: JetStreamStreams, after_seq: int = 0):
        from updater.delta import DeltaError

        self._DeltaError = DeltaError
        self.last_seq = after_seq
        self.duplicates = 0
        self._parts: list = []
        self._error: Exception | None = None
        position, first = streams.run(streams._position(after_seq + 1))
        if first is not None and first > after_seq + 1:
            self._error = DeltaError(f"delta stream {STREAM_NAMES[DELTAS]} starts at seq {first}, after seq "
                                     f"{after_seq + 1} that this server needs next (retention dropped it): "
                                     "a newer snapshot is required")
        self._streams, self.refollows = streams, 0
        self._follower = _Follower(streams, DELTAS, DELTA_SUBJECT, position)

    def read(self, max_records: int | None = None):
        from updater.delta import DeltaRecord

        if self._error is not None:
            raise self._error
        if self._follower.stalled(lambda: self._streams.delta_head()[0] > self.last_seq):
            self.refollows += 1
            position, _ = self._streams.run(self._streams._position(self.last_seq + 1))
            log.warning("delta stream: no message for %.0f s while the stream has more: following again from "
                        "seq %d (stream seq %d)", STALL_S, self.last_seq + 1, position)
            self._follower.close()
            self._parts = []  # the record's parts come again from its first
            self._follower = _Follower(self._streams, DELTAS, DELTA_SUBJECT, position)
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
                    raise self._DeltaError(f"record carries seq {record.seq}, its headers say {msg.headers['Mrt-Seq']}")
                if record.seq <= self.last_seq:
                    self.duplicates += 1
                    log.warning("delta stream: seq %d at stream seq %d is at or below seq %d already read: skipped",
                                record.seq, msg.metadata.sequence.stream, self.last_seq)
                    continue
                if record.seq != self.last_seq + 1:
                    raise self._DeltaError(f"gap: seq {record.seq} follows seq {self.last_seq}")
            except (self._DeltaError, KeyError, ValueError) as exc:
                self._error = self._DeltaError(f"delta stream {STREAM_NAMES[DELTAS]} at stream seq "
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
            raise self._DeltaError(f"part {part} of {parts}")
        if part != len(self._parts) or (self._parts and headers["Mrt-Seq"] != self._parts[0].headers["Mrt-Seq"]):
            if part == 0:  # a record cut short (its writer was fenced or died mid-record): never complete
                log.error("delta stream: record seq %s ended after %d of its parts; dropped",
                          self._parts[0].headers["Mrt-Seq"], len(self._parts))
                self._parts = []
            else:
                raise self._DeltaError(f"part {part} of seq {headers['Mrt-Seq']} out of order")
        self._parts.append(msg)
        if part + 1 < parts:
            return None
        data = b"".join(m.data for m in self._parts)
        self._parts = []
        if _crc(data) != headers["Mrt-Crc"]:
            raise self._DeltaError(f"seq {headers['Mrt-Seq']}: record checksum {_crc(data)}, header says "
                                   f"{headers['Mrt-Crc']}")
        return data

    def close(self) -> None:
        self._follower.close()
