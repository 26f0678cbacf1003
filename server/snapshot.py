"""Serving snapshots: embedding table + dense weights + the delta sequence they include.

    <data_dir>/snapshots/<delta_seq:020d>/
        table.snap    EmbeddingTable.save format (CRC-checked)
        dense.bin     server.tensor_io format (CRC-checked)
        meta.json     {"delta_seq", "created_s", "rows", "dim"}

A snapshot is built in a hidden temp directory, every file fsynced, then the
directory renamed into place and its parent fsynced: a crash at any moment
leaves either the whole snapshot or none. A new or restarted server loads the
newest snapshot that reads back cleanly (falling back to older ones, loudly)
and then replays deltas after its ``delta_seq``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from server.table import EmbeddingTable, SnapshotError
from server.tensor_io import decode_tensors, encode_tensors

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    table: EmbeddingTable
    dense_state: dict[str, torch.Tensor]
    delta_seq: int
    path: Path


def snapshot_root(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "snapshots"


def write_snapshot(data_dir, table: EmbeddingTable, dense_state, delta_seq: int) -> Path:
    """Writes a complete snapshot atomically and returns its directory."""
    root = snapshot_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{int(delta_seq):020d}"
    tmp = root / f".tmp-{int(delta_seq):020d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        table.save(tmp / "table.snap")
        _write_synced(tmp / "dense.bin", encode_tensors(dense_state))
        meta = {"delta_seq": int(delta_seq), "created_s": time.time(), "rows": len(table), "dim": table.dim}
        _write_synced(tmp / "meta.json", json.dumps(meta).encode())
        _fsync_path(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_snapshots(data_dir) -> list[Path]:
    """Complete snapshot directories, oldest first."""
    root = snapshot_root(data_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.isdigit() and (p / "meta.json").is_file())


def load_latest_snapshot(data_dir) -> Snapshot | None:
    """The newest snapshot that reads back cleanly, or None if there is none."""
    for path in reversed(list_snapshots(data_dir)):
        try:
            meta = json.loads((path / "meta.json").read_text())
            table = EmbeddingTable.load(path / "table.snap")
            dense = decode_tensors((path / "dense.bin").read_bytes())
            return Snapshot(table=table, dense_state=dense, delta_seq=int(meta["delta_seq"]), path=path)
        except (OSError, ValueError, KeyError, SnapshotError) as exc:
            log.error("snapshot %s is unreadable (%s); trying an older one", path, exc)
    return None


def prune_snapshots(data_dir, keep: int = 2) -> list[Path]:
    """Deletes all but the newest ``keep`` snapshots; returns what it deleted."""
    doomed = list_snapshots(data_dir)[:-keep] if keep > 0 else list_snapshots(data_dir)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
