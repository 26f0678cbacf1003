"""``JetStreamStreams``: the streams facade on NATS JetStream, with the interface of the local
``Streams`` (server.streams): the ranker, feedback model, updater and trainer call the same methods
whichever backend ``open_streams`` gave them. It owns the connection (and its event loop thread),
creates the streams and buckets, and hands out the writers and readers of each concept's module.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

import nats
from nats.js import api
from nats.js.errors import APIError

from server.streams.local import Streams
from server.streams.names import DELTAS, FEATURES, FEEDBACK, LOGS
from server.streams.bus import NAME as REPLICA_NAME, BusConfig, BusError
from server.streams.jetstream.client import (DELTA_SUBJECT, LEASE_BUCKET, LEASE_TTL_S, PING_INTERVAL_S,
                                             POINTER_BUCKET, PUBLISH_TIMEOUT_S, SNAPSHOT_BUCKET, STREAM_NAMES,
                                             SUBJECT_PREFIX, Loop, retrying, wait_leader)
from server.streams.jetstream.deltas import (JetStreamDeltaReader, JetStreamDeltaWriter, delta_head, delta_lag,
                                             position_of)
from server.streams.jetstream.logs import JetStreamLogReader, JetStreamLogWriter
from server.streams.jetstream.snapshots import SnapshotStore

log = logging.getLogger(__name__)
_SETUP_BUDGET_S = 12.0  # per stream or bucket: ensure_streams as a whole waits 60 s

INSTANCES_CACHE_S = 0.1  # the list of replicas' logs: one stream-info request per this, at most


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
        self._loop = Loop(f"nats-{config.replica}")
        self._instances_cache: dict[str, tuple[float, list[str]]] = {}
        self._writers: list = []
        self.snapshots = SnapshotStore(self)
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
            await retrying(lambda: self._add_or_update(config), _SETUP_BUDGET_S)  # an election may be under way
            await wait_leader(js, STREAM_NAMES[stream])
        await retrying(lambda: js.create_object_store(
            SNAPSHOT_BUCKET, api.ObjectStoreConfig(bucket=SNAPSHOT_BUCKET, replicas=replicas)), _SETUP_BUDGET_S)
        await retrying(lambda: js.create_key_value(
            api.KeyValueConfig(bucket=POINTER_BUCKET, replicas=replicas, history=5)), _SETUP_BUDGET_S)
        await retrying(lambda: js.create_key_value(
            api.KeyValueConfig(bucket=LEASE_BUCKET, replicas=replicas, ttl=LEASE_TTL_S)), _SETUP_BUDGET_S)
        for bucket in (f"OBJ_{SNAPSHOT_BUCKET}", f"KV_{POINTER_BUCKET}", f"KV_{LEASE_BUCKET}"):
            await wait_leader(js, bucket)

    async def _add_or_update(self, config) -> None:
        """Creates a stream, or updates it where it exists (also when a timed-out try created it)."""
        try:
            await self.js.add_stream(config)
        except APIError as exc:
            if "already in use" not in str(exc.description):
                raise
            await self.js.update_stream(config)

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
        if not instance or not REPLICA_NAME.match(instance):
            raise ValueError(f"instance requires 1-64 of [A-Za-z0-9_-], got {instance!r}")
        return JetStreamLogWriter(self, stream, f"{self.config.replica}.{instance}")

    def instances(self, stream: str) -> list[str]:
        """The "<replica>.<instance>" logs of ``stream`` that hold messages (cached for INSTANCES_CACHE_S:
        a new replica's first click waits that long at most to be found)."""
        if stream not in LOGS:
            raise ValueError(f"stream requires one of {LOGS}, got {stream!r}")
        cached = self._instances_cache.get(stream)
        if cached is not None and time.monotonic() - cached[0] < INSTANCES_CACHE_S:
            return cached[1]
        info = self.run(retrying(lambda: self.js.stream_info(STREAM_NAMES[stream], subjects_filter=">")))
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

    def delta_head(self) -> tuple[int, float]:
        """(seq of the newest record in the delta stream, its publish time as Unix seconds); (0, 0) if empty."""
        return delta_head(self)

    def delta_first(self) -> int | None:
        """The delta seq of the oldest record the stream retains (None: it holds none)."""
        return self.run(position_of(self, 1), 20.0)[1]

    def delta_lag(self, applied_seq: int) -> tuple[int, float]:
        """(records behind the stream head, seconds since the oldest unapplied record was published)."""
        return delta_lag(self, applied_seq)

    # ------------------------------------------------------------------ snapshots

    def publish_snapshot(self, directory: Path, seq: int, keep: int = 2) -> dict:
        """Uploads a snapshot directory and points the newest-snapshot entry at it (SnapshotStore.publish)."""
        lease = self._writers[-1].lease if self._writers else None  # the holder's fence (SnapshotStore.publish)
        return self.snapshots.publish(directory, seq, keep, lease)

    def snapshot_pointer(self) -> dict | None:
        return self.snapshots.pointer()

    def fetch_snapshot(self) -> Path | None:
        """The newest snapshot on the bus into ``data_dir``/snapshots, unless a local one is as new."""
        return self.snapshots.fetch()

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        try:
            self.run(self.nc.drain(), 10.0)
        except Exception as exc:
            log.warning("bus: closing the connection: %r", exc)
        self._loop.stop()
