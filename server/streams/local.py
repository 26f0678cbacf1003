"""The local backend of the streams: every stream as segment logs in one data directory
(the layout is drawn in server.streams' docstring). One host, no external service."""

from __future__ import annotations

from pathlib import Path

from server.streams.delta_log import FileDeltaReader, FileDeltaWriter
from server.streams.log import SegmentLogReader, SegmentLogWriter
from server.streams.segments import list_segments
from server.streams.names import CHECKPOINTS, DELTAS, FEATURES, FEEDBACK, LOGS, SNAPSHOTS
from server.streams.watch import LogsWatch

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

    def watch_logs(self) -> LogsWatch:
        """Wakes its ``wait`` when any feature or feedback log gains a record (server.streams.watch)."""
        return LogsWatch([self.data_dir / stream for stream in LOGS])

    # The bus interface beside the directories (JetStreamStreams answers the same).

    def open_delta_writer(self, **options) -> FileDeltaWriter:
        """The delta stream's writer (``options`` of FileDeltaWriter)."""
        return FileDeltaWriter(self.path(DELTAS), **options)

    def open_delta_reader(self, after_seq: int = 0) -> FileDeltaReader:
        """A reader of the delta stream after delta seq ``after_seq``."""
        return FileDeltaReader(self.path(DELTAS), after_seq)

    def delta_first(self) -> int | None:
        """The delta seq the oldest retained segment starts at (None: no segment)."""
        directory = self.path(DELTAS)
        firsts = list_segments(directory) if directory.is_dir() else []
        return firsts[0] + 1 if firsts else None

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
