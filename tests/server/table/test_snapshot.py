"""Table snapshots: exact round trip; any corruption or truncation is refused."""

import os

import numpy as np
import pytest

from server.table import EmbeddingTable, SnapshotError


@pytest.fixture
def table(rng):
    t = EmbeddingTable(5, capacity=16)
    fids = np.unique(rng.integers(0, 2**63, 3000, dtype=np.int64)).view(np.uint64)
    t.upsert(fids, rng.standard_normal((len(fids), 5), dtype=np.float32), now=10.0)
    t.upsert(fids[:100], rng.standard_normal((100, 5), dtype=np.float32), now=20.0)
    t.delete(fids[-50:])
    return t


def entries(table):
    out = {}
    for fids, rows, stamps in table.items():
        for k, r, s in zip(fids.tolist(), rows, stamps):
            out[k] = (r.tobytes(), s)
    return out


def test_round_trip_is_exact(table, tmp_path):
    path = tmp_path / "table.snap"
    table.save(path)
    loaded = EmbeddingTable.load(path)
    assert loaded.dim == table.dim and len(loaded) == len(table)
    assert entries(loaded) == entries(table)
    assert loaded.newest_stamp == table.newest_stamp == 20.0
    assert not list(tmp_path.glob(".*tmp*")), "temp file left behind"


def test_empty_table_round_trip(tmp_path):
    EmbeddingTable(3).save(tmp_path / "empty.snap")
    loaded = EmbeddingTable.load(tmp_path / "empty.snap")
    assert len(loaded) == 0 and loaded.dim == 3


def test_every_flipped_byte_is_detected(table, tmp_path, rng):
    path = tmp_path / "table.snap"
    table.save(path)
    data = path.read_bytes()
    offsets = set(range(64)) | set(rng.integers(0, len(data), 300).tolist()) | {len(data) - 1}
    for offset in sorted(offsets):
        corrupt = bytearray(data)
        corrupt[offset] ^= 1 << int(rng.integers(0, 8))
        bad = tmp_path / "bad.snap"
        bad.write_bytes(bytes(corrupt))
        with pytest.raises(SnapshotError):
            EmbeddingTable.load(bad)


def test_every_truncation_is_detected(tmp_path, rng):
    t = EmbeddingTable(2)
    t.upsert(np.arange(1, 11, dtype=np.uint64), rng.standard_normal((10, 2), dtype=np.float32), now=1.0)
    path = tmp_path / "small.snap"
    t.save(path)
    data = path.read_bytes()
    for size in range(len(data)):
        bad = tmp_path / "cut.snap"
        bad.write_bytes(data[:size])
        with pytest.raises(SnapshotError, match="truncated"):
            EmbeddingTable.load(bad)


def test_not_a_snapshot_is_named(tmp_path):
    path = tmp_path / "other.bin"
    path.write_bytes(b"x" * 200)
    with pytest.raises(SnapshotError, match="not a table snapshot"):
        EmbeddingTable.load(path)


def test_failed_save_keeps_previous_snapshot(table, tmp_path, monkeypatch):
    path = tmp_path / "table.snap"
    table.save(path)
    before = path.read_bytes()
    table.upsert(np.array([7], np.uint64), np.ones((1, 5), np.float32), now=30.0)

    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        table.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*tmp*")), "temp file left behind"
    assert len(EmbeddingTable.load(path)) == len(table) - 1
