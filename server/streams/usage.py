"""Disk used by each stream of a data directory, and what is left on its file system.

For the metrics port (``serve`` appends ``exposition`` to Triton's metrics at
every scrape): an operator sees which stream grows and is paged before the
disk fills (the "disk near full" alert of ``server/ops``). Bytes are the
allocated blocks of the regular files under each stream's directory
(``st_blocks * 512``, what the file system loses, sparse files counted as
allocated), summed without following links; a file that disappears during
the walk (retention deleting a segment) is skipped, not an error.
"""

from __future__ import annotations

import os
from pathlib import Path

from server.streams.names import CHECKPOINTS, DELTAS, FEATURES, FEEDBACK, SNAPSHOTS

_STREAMS = (FEATURES, FEEDBACK, DELTAS, SNAPSHOTS, CHECKPOINTS)


def _tree_bytes(root: Path) -> int:
    total = 0
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:  # gone, or not a directory
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue
    return total


def stream_bytes(data_dir: str | Path) -> dict[str, int]:
    """stream name -> bytes its directory holds (0 for a stream with no directory yet)."""
    return {stream: _tree_bytes(Path(data_dir) / stream) for stream in _STREAMS}


def exposition(data_dir: str | Path) -> bytes:
    """``monolith_stream_disk_bytes{stream}``, ``monolith_data_dir_free_bytes`` and
    ``monolith_data_dir_size_bytes`` (of the file system holding ``data_dir``) as Prometheus text."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    used = Gauge("monolith_stream_disk_bytes", "Bytes on disk under each stream of the data directory", ["stream"],
                 registry=registry)
    for stream, size in stream_bytes(data_dir).items():
        used.labels(stream=stream).set(size)
    fs = os.statvfs(data_dir)
    Gauge("monolith_data_dir_free_bytes", "Bytes available to the server on the data directory's file system",
          registry=registry).set(fs.f_bavail * fs.f_frsize)
    Gauge("monolith_data_dir_size_bytes", "Size of the data directory's file system",
          registry=registry).set(fs.f_blocks * fs.f_frsize)
    return generate_latest(registry)
