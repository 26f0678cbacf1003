"""Retention: what the trainer deletes so that disk stays bounded.

Run after every snapshot + checkpoint (``trainer.online.publish``):

    delta stream         segments whose records all precede the oldest
                         retained serving snapshot or trainer checkpoint:
                         every server starts from a snapshot and replays
                         only what follows it, and a restarted trainer
                         reconciles only what follows its checkpoint. A
                         running server that has fallen behind this point
                         finds its next segment gone, halts and heals from
                         the newest snapshot (updater.applier).
    feature and feedback sealed segments whose records all precede the read
    logs                 positions of the *oldest* retained checkpoint (so a
                         fallback to it still finds its records) and that
                         were last written at least ``log_retention_s`` ago
                         (kept that long for inspection and replays).

Deletion is by whole sealed segments (``MONOLITH_SEGMENT_BYTES``, default
64 MiB), oldest first, never the newest segment of a log.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from server.streams import delete_sealed_segments
from server.streams.snapshots import list_snapshots
from trainer.checkpoint import list_checkpoints
from server.streams.delta_log import FileDeltaWriter

log = logging.getLogger(__name__)


def apply_retention(data_dir: str | Path, deltas: FileDeltaWriter, log_retention_s: float) -> dict[str, int]:
    """Deletes what no retained snapshot or checkpoint needs; returns segments deleted per stream."""
    data_dir = Path(data_dir)
    checkpoints = list_checkpoints(data_dir)
    oldest = min((int(p.name) for p in list_snapshots(data_dir) + checkpoints), default=0)
    deleted = {"deltas": len(deltas.delete_before(oldest + 1))}
    if checkpoints:
        try:
            positions = json.loads((checkpoints[0] / "meta.json").read_text()).get("positions", {})
        except (OSError, ValueError) as exc:
            log.error("retention: checkpoint %s unreadable (%s): no log segment deleted", checkpoints[0], exc)
            positions = {}
        for key, position in positions.items():
            kind = key.split("/", 1)[0]
            directory = data_dir / key
            if directory.is_dir():
                gone = delete_sealed_segments(directory, int(position), min_age_s=log_retention_s)
                deleted[kind] = deleted.get(kind, 0) + len(gone)
    if any(deleted.values()):
        log.info("retention: deleted segments %s", deleted)
    return deleted
