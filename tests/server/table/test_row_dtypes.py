"""Tables of every row type serve exactly the trainer's rows as quantized: through upserts, growth, the lookup
kernel's decoder, snapshots (and conversions between row types) and the shared table."""

import struct

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from server.table import EmbeddingTable, SharedEmbeddingTable, SnapshotError, read_snapshot
from server.table.cuckoo import half_bits_to_f32
from server.table.quantize import FP16_MAX, ROW_DTYPES, bytes_per_row, encode_rows, quantized

_values = st.floats(-FP16_MAX, FP16_MAX, allow_nan=False, allow_infinity=False, width=32)
_rows = hnp.arrays(np.float32, st.tuples(st.integers(1, 200), st.integers(1, 20)), elements=_values)


def bits(array):
    """Bit patterns, so that -0.0 != 0.0 and the comparison is byte-exact."""
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


def served(table, fids):
    rows, found = table.lookup_found(fids)
    assert found.all()
    return rows


def entries(table):
    return {int(f): (r.tobytes(), s) for fids, rows, stamps in table.items() for f, r, s in zip(fids, rows, stamps)}


@pytest.mark.parametrize("row_dtype", ROW_DTYPES)
@settings(max_examples=40, deadline=None)
@given(rows=_rows)
def test_lookups_and_items_give_the_rows_as_quantized_through_growth(row_dtype, rows):
    n, dim = rows.shape
    fids = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    table = EmbeddingTable(dim, capacity=16, row_dtype=row_dtype)  # grows several times on the way
    table.upsert(fids, rows, now=1.0)
    expected = quantized(rows, row_dtype)
    assert (bits(served(table, fids)) == bits(expected)).all()
    assert entries(table) == {int(f): (r.tobytes(), 1.0) for f, r in zip(fids, expected)}
    assert table.bytes_per_row == bytes_per_row(dim, row_dtype)


def test_the_fp16_decoder_reads_every_finite_half_exactly():  # F16C's where the CPU has it (the lookup's)
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    halves = halves[np.isfinite(halves)]  # 63,488 patterns: both zeros, every subnormal and normal
    rows = halves[: halves.shape[0] // 16 * 16].astype(np.float32).reshape(-1, 16)
    table = EmbeddingTable(16, row_dtype="fp16")
    fids = np.arange(1, rows.shape[0] + 1, dtype=np.uint64)
    table.upsert(fids, rows, now=1.0)
    assert (bits(served(table, fids)) == bits(rows)).all()


def test_an_int8_row_of_zeros_and_one_of_subnormals_are_served_as_quantized():
    rows = np.zeros((3, 4), np.float32)
    rows[1] = [1e-45, -3e-45, 0.0, 2e-44]
    rows[2] = [-1.0, 0.5, 0.25, 1.0]
    table = EmbeddingTable(4, row_dtype="int8")
    fids = np.array([1, 2, 3], np.uint64)
    table.upsert(fids, rows, now=1.0)
    assert (bits(served(table, fids)) == bits(quantized(rows, "int8"))).all()


def test_a_value_the_row_type_cannot_hold_is_refused_and_nothing_is_written():
    table = EmbeddingTable(2, row_dtype="fp16")
    with pytest.raises(ValueError, match="65504"):
        table.upsert(np.array([1, 2], np.uint64), np.array([[1.0, 2.0], [7e4, 0.0]], np.float32), now=1.0)
    assert len(table) == 0
    with pytest.raises(ValueError, match="finite"):
        EmbeddingTable(2, row_dtype="int8").upsert(np.array([1], np.uint64), np.array([[np.nan, 0]], np.float32), 1.0)
    with pytest.raises(ValueError, match="fp32, fp16, int8|'fp32', 'fp16', 'int8'"):
        EmbeddingTable(2, row_dtype="bf16")


@pytest.fixture
def trainer_rows(rng):
    fids = np.unique(rng.integers(1, 2**63, 3000, dtype=np.int64)).view(np.uint64)
    return fids, rng.normal(0, 0.3, (fids.shape[0], 16)).astype(np.float32)


@pytest.mark.parametrize("row_dtype", ROW_DTYPES)
def test_a_snapshot_keeps_the_stored_rows_and_its_size_follows_the_row_type(row_dtype, trainer_rows, tmp_path):
    fids, rows = trainer_rows
    table = EmbeddingTable(16, row_dtype=row_dtype)
    table.upsert(fids, rows, now=5.0)
    path = tmp_path / "table.snap"
    table.save(path)
    version = struct.unpack_from("<I", path.read_bytes(), 8)[0]
    assert version == (1 if row_dtype == "fp32" else 2)  # an fp32 table's snapshot stays readable by older builds
    header = 48 if row_dtype == "fp32" else 52
    assert path.stat().st_size == header + fids.shape[0] * (8 + bytes_per_row(16, row_dtype) + 8)
    loaded = EmbeddingTable.load(path)
    assert loaded.row_dtype == row_dtype and entries(loaded) == entries(table)
    data = read_snapshot(path)
    assert data.row_dtype == row_dtype and data.rows.tobytes() == encode_rows(
        np.concatenate([r for _, r, _ in table.items()]), row_dtype).tobytes()


@pytest.mark.parametrize("source", ROW_DTYPES)
@pytest.mark.parametrize("target", ROW_DTYPES)
def test_loading_a_snapshot_into_another_row_type_serves_it_as_that_type_quantizes_it(source, target, trainer_rows,
                                                                                     tmp_path):
    fids, rows = trainer_rows
    table = EmbeddingTable(16, row_dtype=source)
    table.upsert(fids, rows, now=5.0)
    table.save(tmp_path / "table.snap")
    loaded = EmbeddingTable.load(tmp_path / "table.snap", row_dtype=target)
    assert loaded.row_dtype == target and len(loaded) == fids.shape[0] and loaded.newest_stamp == 5.0
    assert (bits(served(loaded, fids)) == bits(quantized(quantized(rows, source), target))).all()


def test_a_snapshot_value_beyond_fp16_names_the_file_when_loaded_as_fp16(tmp_path):
    table = EmbeddingTable(2)
    table.upsert(np.array([1], np.uint64), np.array([[1e5, 0.0]], np.float32), now=1.0)
    table.save(tmp_path / "big.snap")
    with pytest.raises(SnapshotError, match="big.snap.*fp16"):
        EmbeddingTable.load(tmp_path / "big.snap", row_dtype="fp16")


def test_a_snapshot_with_an_unknown_row_type_is_refused(trainer_rows, tmp_path):
    import zlib

    fids, rows = trainer_rows
    table = EmbeddingTable(16, row_dtype="int8")
    table.upsert(fids, rows, now=5.0)
    path = tmp_path / "table.snap"
    table.save(path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 32, 7)  # row_dtype, after magic, format, dim, count, newest
    struct.pack_into("<I", data, 48, zlib.crc32(bytes(data[:48])))  # a consistent header: only the code is wrong
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="row dtype code"):
        EmbeddingTable.load(path)


@pytest.mark.parametrize("row_dtype", ["fp16", "int8"])
def test_a_shared_table_stores_the_row_type_for_every_process_that_attaches(row_dtype, trainer_rows, tmp_path):
    fids, rows = trainer_rows
    writer = SharedEmbeddingTable.create(tmp_path / "shm", 16, capacity=64, row_dtype=row_dtype)
    try:
        writer.upsert(fids, rows, now=2.0)  # grows through several generations
        writer.mark_ready()
        reader = SharedEmbeddingTable.attach(tmp_path / "shm")
        expected = quantized(rows, row_dtype)
        assert reader.row_dtype == row_dtype
        assert (bits(served(reader, fids)) == bits(expected)).all()
        rows_file = sorted((tmp_path / "shm").glob("gen-*.rows"))[-1]
        assert rows_file.stat().st_size == writer.capacity * bytes_per_row(16, row_dtype)
        writer.save(tmp_path / "shared.snap")
        copy = SharedEmbeddingTable.create_from_snapshot(tmp_path / "copy", tmp_path / "shared.snap")
        assert copy.row_dtype == row_dtype and entries(copy) == entries(writer)
        copy.close()
        reader.close()
    finally:
        writer.close()


@numba.njit
def _decode_halves(bits, out):
    for k in range(bits.shape[0]):
        out[k] = half_bits_to_f32(bits[k])


def test_the_fp16_decoder_for_cpus_without_f16c_is_exact_too():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    bits = bits[np.isfinite(bits.view(np.float16))]
    out = np.empty(bits.shape[0], np.float32)
    _decode_halves(bits, out)
    assert (out.view(np.uint32) == bits.view(np.float16).astype(np.float32).view(np.uint32)).all()
