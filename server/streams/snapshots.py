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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.durable import fsync_path
from server.table import EmbeddingTable, SnapshotError
from server.tensor_io import decode_tensors, encode_tensors
from server.streams.local import Streams
from server.streams.names import SNAPSHOTS

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    table: EmbeddingTable
    dense_state: dict[str, np.ndarray]
    delta_seq: int
    path: Path


def snapshot_root(data_dir: str | os.PathLike) -> Path:
    return Streams(data_dir).path(SNAPSHOTS)


@contextmanager
def atomic_directory(final: Path):
    """Yields a hidden temp directory beside ``final``; on a clean exit every
    file in it is fsynced, it is renamed to ``final`` (replacing an older one)
    and the parent fsynced. On an exception it is removed and ``final`` is
    untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.iterdir():
            fsync_path(child)
        fsync_path(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_snapshot(data_dir, table: EmbeddingTable, dense_state, delta_seq: int) -> Path:
    """Writes a complete snapshot atomically and returns its directory."""
    final = snapshot_root(data_dir) / f"{int(delta_seq):020d}"
    with atomic_directory(final) as tmp:
        table.save(tmp / "table.snap")
        (tmp / "dense.bin").write_bytes(encode_tensors(dense_state))
        meta = {"delta_seq": int(delta_seq), "created_s": time.time(), "rows": len(table), "dim": table.dim,
                "row_dtype": table.row_dtype}
        (tmp / "meta.json").write_text(json.dumps(meta))
    return final


def complete_dirs(root: Path) -> list[Path]:
    """Directories under root named by a sequence number and holding their
    meta.json (written last, so the directory is whole), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.isdigit() and (p / "meta.json").is_file())


def list_snapshots(data_dir) -> list[Path]:
    """Complete snapshot directories, oldest first."""
    return complete_dirs(snapshot_root(data_dir))


def load_latest_snapshot(data_dir, row_dtype: str | None = None) -> Snapshot | None:
    """The newest snapshot that reads back cleanly, or None if there is none; its table in
    ``row_dtype`` (server.table.quantize; default: as the snapshot stored it)."""
    for path in reversed(list_snapshots(data_dir)):
        try:
            return load_snapshot(path, row_dtype)
        except (OSError, ValueError, KeyError, SnapshotError) as exc:
            log.error("snapshot %s is unreadable (%s); trying an older one", path, exc)
    return None


def load_snapshot(path: Path, row_dtype: str | None = None) -> Snapshot:
    """One snapshot directory, its table in ``row_dtype`` (default: as stored); raises OSError,
    ValueError, KeyError or SnapshotError when it does not read back."""
    meta = json.loads((path / "meta.json").read_text())
    table = EmbeddingTable.load(path / "table.snap", row_dtype=row_dtype)
    dense = decode_tensors((path / "dense.bin").read_bytes())
    return Snapshot(table=table, dense_state=dense, delta_seq=int(meta["delta_seq"]), path=path)


def prune_snapshots(data_dir, keep: int = 2) -> list[Path]:
    """Deletes all but the newest ``keep`` snapshots; returns what it deleted."""
    doomed = list_snapshots(data_dir)[:-keep] if keep > 0 else list_snapshots(data_dir)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed

