"""The streams the system is made of, and where they live.

    ranker ──▶ FEATURES (one log per ranker instance) ──┐
    feedback ▶ FEEDBACK (one log per feedback instance) ┴▶ trainer ──▶ DELTAS ──▶ updater ──▶ table
                                                              └──────▶ SNAPSHOTS (+ checkpoints) ─▶ a (re)starting server

Each name in server.streams.names is the one place a stream is named;
everything else asks ``Streams`` for it. The local backend
(server.streams.local) keeps every stream as segment logs (server.streams.log)
in one data directory::

    <data_dir>/feature_log/<instance>/   FEATURES   FeatureRecord per scored request
    <data_dir>/feedback_log/<instance>/  FEEDBACK   FeedbackRecord per action
    <data_dir>/deltas/                   DELTAS     DeltaRecord (server.streams.deltas) in a segment log
                                                    (server.streams.delta_log), one writer: the trainer
    <data_dir>/snapshots/<seq>/          SNAPSHOTS  serving snapshots (server.streams.snapshots)
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
from server.streams.bus import BusConfig
from server.streams.local import Streams
from server.streams.log import LogCorruptError, Position, SegmentLogReader, SegmentLogWriter
from server.streams.names import CHECKPOINTS, DELTAS, FEATURES, FEEDBACK, LOGS, SNAPSHOTS
from server.streams.records import FeatureRecord, FeedbackRecord
from server.streams.segments import delete_sealed_segments, segment_bytes_from_env

__all__ = ["CHECKPOINTS", "DELTAS", "FEATURES", "FEEDBACK", "LOGS", "SNAPSHOTS", "BackgroundAppender",
           "FeatureRecord", "FeedbackRecord", "LogCorruptError", "Position", "SegmentLogReader", "SegmentLogWriter",
           "Streams", "delete_sealed_segments", "open_streams", "segment_bytes_from_env"]


def open_streams(data_dir: str | Path, bus=None) -> Streams:
    """The streams of ``data_dir`` on the configured bus (``bus``: a BusConfig; default: from the
    environment, ``local`` when unset)."""
    bus = BusConfig.from_env() if bus is None else bus
    if bus.local:
        return Streams(data_dir)
    from server.streams.jetstream import JetStreamStreams  # the NATS client, only when it is used

    return JetStreamStreams(data_dir, bus)
