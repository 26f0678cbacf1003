"""The streams the system is made of, and where they live.

    ranker ──▶ FEATURES (one log per ranker instance) ──┐
    feedback ▶ FEEDBACK (one log per feedback instance) ┴▶ trainer ──▶ DELTAS ──▶ updater ──▶ table
                                                              └──────▶ SNAPSHOTS (+ checkpoints) ─▶ a (re)starting server

Each name below is the one place a stream is named; everything else asks
``Streams`` for it. The local backend (this module) keeps every stream as
segment logs (server.streams.log) in one data directory::

    <data_dir>/feature_log/<instance>/   FEATURES   FeatureRecord per scored request
    <data_dir>/feedback_log/<instance>/  FEEDBACK   FeedbackRecord per action
    <data_dir>/deltas/                   DELTAS     DeltaRecord (updater.delta), one writer: the trainer
    <data_dir>/snapshots/<seq>/          SNAPSHOTS  serving snapshots (server.snapshot)
    <data_dir>/trainer/<seq>/            CHECKPOINTS trainer checkpoints (trainer.checkpoint)

Record bytes are the same whatever the backend. ``open_streams`` picks the
backend from the bus configuration (``--bus``, carried to Triton's model
processes in the environment: server.streams.jetstream.BusConfig): this one
for ``local``, ``JetStreamStreams`` (server.streams.jetstream) for NATS; both
answer the same methods, so the ranker, the feedback model, the updater and
the trainer never ask which one they have.
"""

from __future__ import annotations

from pathlib import Path

from server.streams.appender import BackgroundAppender
from server.streams.log import LogCorruptError, Position, SegmentLogReader, SegmentLogWriter
from server.streams.records import FeatureRecord, FeedbackRecord
from server.streams.segments import delete_sealed_segments, segment_bytes_from_env

__all__ = ["CHECKPOINTS", "DELTAS", "FEATURES", "FEEDBACK", "LOGS", "SNAPSHOTS", "BackgroundAppender",
           "FeatureRecord", "FeedbackRecord", "LogCorruptError", "Position", "SegmentLogReader", "SegmentLogWriter",
           "Streams", "delete_sealed_segments", "open_streams", "segment_bytes_from_env"]

FEATURES = "feature_log"
FEEDBACK = "feedback_log"
DELTAS = "deltas"
SNAPSHOTS = "snapshots"
CHECKPOINTS = "trainer"
LOGS = (FEATURES, FEEDBACK)  # the streams with one log per serving instance
_STREAMS = (FEATURES, FEEDBACK, DELTAS, SNAPSHOTS, CHECKPOINTS)


class Streams:
    """Where each stream of one data directory lives (the local, segment-file backend)."""

    replica = "local"  # this host's name on the bus
    reconnects = 0  # times the connection to the bus was re-established

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)

    def path(self, stream: str, instance: str | None = None) -> Path:
        """The directory of ``stream`` (of one instance, for FEATURES and FEEDBACK)."""
        if stream not in _STREAMS:
            raise ValueError(f"stream requires one of {_STREAMS}, got {stream!r}")
        if (instance is None) != (stream not in LOGS):
            raise ValueError(f"stream {stream!r} {'requires' if stream in LOGS else 'takes no'} instance")
        if instance is not None and (not instance or "/" in instance or instance in (".", "..")):
            raise ValueError(f"instance requires a plain directory name, got {instance!r}")
        return self.data_dir / stream if instance is None else self.data_dir / stream / instance

    def instances(self, stream: str) -> list[str]:
        """The instances that have a log of ``stream`` (FEATURES or FEEDBACK), sorted."""
        if stream not in LOGS:
            raise ValueError(f"stream requires one of {LOGS}, got {stream!r}")
        root = self.data_dir / stream
        return sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []

    def open_writer(self, stream: str, instance: str | None = None, **options) -> SegmentLogWriter:
        return SegmentLogWriter(self.path(stream, instance), **options)

    def open_reader(self, stream: str, instance: str | None = None, **options) -> SegmentLogReader:
        return SegmentLogReader(self.path(stream, instance), **options)

    # The bus interface beside the directories (JetStreamStreams answers the same).

    def open_delta_writer(self, **options):
        """The delta stream's writer (updater.stream.DeltaWriter; ``options`` of FileDeltaWriter)."""
        from updater.stream import FileDeltaWriter

        return FileDeltaWriter(self.path(DELTAS), **options)

    def open_delta_reader(self, after_seq: int = 0):
        """A reader of the delta stream after delta seq ``after_seq`` (updater.stream.DeltaReader)."""
        from updater.stream import FileDeltaReader

        return FileDeltaReader(self.path(DELTAS), after_seq)

    def ensure_streams(self, **options) -> None:
        """Creates what the streams need where they live: directories appear on first write here."""

    def publish_snapshot(self, directory: Path, seq: int) -> None:
        """Makes a written snapshot available to other hosts: nothing to do on one host."""

    def fetch_snapshot(self) -> Path | None:
        """Brings a newer snapshot from other hosts into the data directory: none on one host."""
        return None

    def delta_lag(self, applied_seq: int) -> tuple[int, float] | None:
        """(records behind the stream head, seconds behind it); None where not tracked (local)."""
        return None

    def close(self) -> None:
        pass


def open_streams(data_dir: str | Path, bus=None) -> Streams:
    """The streams of ``data_dir`` on the configured bus (``bus``: a BusConfig; default: from the
    environment, ``local`` when unset)."""
    from server.streams.bus import BusConfig

    bus = BusConfig.from_env() if bus is None else bus
    if bus.local:
        return Streams(data_dir)
    from server.streams.jetstream import JetStreamStreams  # the NATS client, only when it is used

    return JetStreamStreams(data_dir, bus)
