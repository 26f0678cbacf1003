"""EmbeddingTable: the collisionless FID -> row map the whole system uses.

A thin owner of the arrays that the kernels in ``server.table.cuckoo`` work on (see
that module for the layout, the invariants and the seqlock protocol). This
class fixes dtypes and layout, grows the table, keeps the admission sketch,
writes and reads snapshots, and is the only place that raises.

Concurrency contract:
    * Readers (``lookup``, ``contains``, ``__len__``) take no lock and may run
      on any number of threads, concurrently with a writer; the kernels drop
      the GIL, so they really do run in parallel.
    * Writers (``upsert``, ``delete``, ``evict_expired``, ``save``, ``items``)
      serialise among themselves on one lock. Growth copies into new arrays
      and swaps them in with one reference assignment.

Keys: full 64-bit FIDs, compared exactly. ``EMPTY_KEY`` (2**64 - 1) is
reserved to mark free slots; ``upsert`` rejects it, lookups report it missing.

Expiry: every row carries the time of its last update on the caller's clock.
``evict_expired(ttl_s)`` measures age against the newest update the table has
seen (Monolith's rule, robust to replaying old logs), or against ``now``.

Row type: a table stores its rows as fp32, fp16 or int8 with a per-row scale
(``row_dtype``, server.table.quantize). Callers always pass and get float32:
``upsert`` quantizes, ``lookup`` and ``items`` return the rows as quantized
(``quantized(rows, row_dtype)``, exactly). The trainer's tables are fp32.

Admission: ``upsert(..., min_count=k)`` writes a FID that is not in the
table only once a count-min sketch has seen it k times (conservative update,
so counts never under-estimate); FIDs already present are always updated.

Snapshot file (little-endian)::

    header  magic "MRTTABL1" | format u32 | dim u32 | count u64 | newest f64
            | [format 2: row_dtype u32] | keys_crc u32 | rows_crc u32 | stamps_crc u32 | header_crc u32
    keys    uint64[count]
    rows    [count, width] stored rows (format 1: float32[count, dim])
    stamps  float64[count]

An fp32 table writes format 1 (which every earlier build reads); fp16 and int8
tables write format 2, whose row_dtype (0 fp32, 1 fp16, 2 int8) says how the
rows section is stored (server.table.quantize.storage_layout). ``load`` converts a
snapshot to the row type asked for (a trainer's fp32 snapshot into an int8 serving table).

CRC-32 of each section and of the header; the file is written to a temp name,
fsynced and renamed, so a crash mid-save leaves the previous snapshot whole.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from server.table import cuckoo
from server.table.cuckoo import EMPTY_KEY, SLOTS
from server.table.quantize import (bytes_per_row, decode_rows, encode_rows, row_dtype_code, row_dtype_of_code,
                                   storage_layout)
from server.durable import fsync_path
from server.features import SIGNATURE_BITS, SLOT_IDS

__all__ = ["EMPTY_KEY", "EmbeddingTable", "SnapshotData", "SnapshotError"]

_MAGIC = b"MRTTABL1"
_FP32_FORMAT = 1
_ROW_DTYPE_FORMAT = 2
_HEADERS = {_FP32_FORMAT: struct.Struct("<8sIIQdIII"), _ROW_DTYPE_FORMAT: struct.Struct("<8sIIQdIIII")}
_HEADER_CRC = struct.Struct("<I")
_PREFIX = struct.Struct("<8sI")  # magic and format: which header follows
_COPY_CHUNK_BYTES = 1 << 24
_CONVERT_CHUNK_ROWS = 1 << 14  # rows converted between row types at a time (1 MiB of fp32 at dim 16)
_HUGE_PAGE_BYTES = 1 << 21


class SnapshotError(ValueError):
    """A snapshot file is corrupt, truncated or of another format."""


class TableArrays:
    """One generation of the table's storage; replaced whole on growth."""

    __slots__ = ("keys", "rows", "stamps", "versions", "max_count", "generation")

    def __init__(self, keys, rows, stamps, versions, max_load_factor: float, generation: int = 0):
        self.keys, self.rows, self.stamps, self.versions = keys, rows, stamps, versions
        self.max_count = int(keys.shape[0] * max_load_factor)
        self.generation = generation

    @classmethod
    def anonymous(cls, n_buckets: int, dim: int, max_load_factor: float, stripes: int,
                  row_dtype: str = "fp32") -> "TableArrays":
        capacity = n_buckets * SLOTS
        keys = _zeros_on_huge_pages((capacity,), np.uint64)
        keys.fill(EMPTY_KEY)
        dtype, width = storage_layout(dim, row_dtype)
        return cls(keys, _zeros_on_huge_pages((capacity, width), dtype),
                   _zeros_on_huge_pages((capacity,), np.float64),
                   np.zeros(min(stripes, n_buckets), dtype=np.uint64), max_load_factor)


def _zeros_on_huge_pages(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array in its own anonymous mapping, advised onto transparent
    huge pages: random lookups in a large table otherwise miss the TLB on
    nearly every access (measured: 12 -> 32 M rows/s gathered, see bench)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes < _HUGE_PAGE_BYTES:
        return np.zeros(shape, dtype=dtype)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buffer.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # kernel without THP: plain pages still work
    # Fault the pages in now, in order: faulting them from a random-access
    # kernel later was measured 4x slower (rehash of 4M rows: 1.5 s vs 0.36 s).
    np.frombuffer(buffer, dtype=np.uint8)[::4096] = 0
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def pow2_at_least(n: int) -> int:
    return 1 << max(1, (int(n) - 1).bit_length())


class EmbeddingTable:
    """Collisionless map from uint64 FIDs to rows of length ``dim``, read and written as float32.

    Args:
        dim: row length D.
        row_dtype: how rows are stored: "fp32", "fp16" or "int8" (server.table.quantize).
        capacity: initial number of slots (rounded up to a power of two); the
            table doubles whenever it must.
        max_load_factor: grow before the table is fuller than this.
        sketch_width: counters per row of the admission sketch (power of two).
        sketch_depth: rows (hash functions) of the admission sketch.
        stripes: seqlock version counters (power of two); more means fewer
            reader retries under heavy writes.
    """

    def __init__(
        self,
        dim: int,
        capacity: int = 1024,
        max_load_factor: float = 0.98,
        sketch_width: int = 1 << 20,
        sketch_depth: int = 4,
        stripes: int = 1 << 14,
        row_dtype: str = "fp32",
    ):
        self._configure(dim, max_load_factor, sketch_width, sketch_depth, stripes, row_dtype)
        n_buckets = max(2, pow2_at_least(-(-int(capacity) // SLOTS)))
        self._state = self._allocate(n_buckets)
        self._count = 0
        self._newest_stamp = -np.inf

    def _configure(self, dim, max_load_factor, sketch_width, sketch_depth, stripes, row_dtype) -> None:
        """Validates the settings and sets up everything but the storage."""
        if int(dim) < 1:
            raise ValueError(f"dim requires >= 1, got {dim}")
        self._storage_dtype, self._storage_width = storage_layout(int(dim), row_dtype)
        self.row_dtype = row_dtype
        if not 0.1 <= max_load_factor <= 1.0:
            raise ValueError(f"max_load_factor requires 0.1 <= x <= 1.0, got {max_load_factor}")
        for name, value in (("sketch_width", sketch_width), ("stripes", stripes)):
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} requires a power of two, got {value}")
        if sketch_depth < 1:
            raise ValueError(f"sketch_depth requires >= 1, got {sketch_depth}")
        self.dim = int(dim)
        self.max_load_factor = float(max_load_factor)
        self._stripes = int(stripes)
        self._sketch = np.zeros((sketch_depth, sketch_width), dtype=np.uint16)
        self._write_lock = threading.Lock()
        self._queue = tuple(np.empty(cuckoo.BFS_QUEUE_LEN, dtype=np.int64) for _ in range(4))
        self.growths = 0
        self.first_growth_load_factor: float | None = None

    def _allocate(self, n_buckets: int) -> TableArrays:
        """Empty storage for n_buckets buckets (not visible to readers yet)."""
        return TableArrays.anonymous(n_buckets, self.dim, self.max_load_factor, self._stripes, self.row_dtype)

    def _release(self, arrays: TableArrays) -> None:
        """Storage from _allocate that will never be published."""

    # ----------------------------------------------------------------- readers

    def __len__(self) -> int:
        return self._count

    @property
    def capacity(self) -> int:
        return self._state.keys.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the current storage (keys, rows, stamps, seqlock versions), free slots included."""
        state = self._state
        return state.keys.nbytes + state.rows.nbytes + state.stamps.nbytes + state.versions.nbytes

    @property
    def bytes_per_row(self) -> int:
        """Bytes one slot's row takes in this table's row type (its key and stamp not counted)."""
        return bytes_per_row(self.dim, self.row_dtype)

    @property
    def load_factor(self) -> float:
        return self._count / self.capacity

    @property
    def newest_stamp(self) -> float:
        """The newest update time written so far (-inf for an empty table)."""
        return self._newest_stamp

    def lookup(self, fids, init_scale: float = 0.0, out: np.ndarray | None = None) -> np.ndarray:
        """Rows of ``fids``: float32 (n, D). A missing FID gives zeros, or,
        with ``init_scale > 0``, a deterministic row in [-init_scale, init_scale)
        that depends on the FID alone."""
        rows, _ = self.lookup_found(fids, init_scale, out)
        return rows

    def lookup_found(self, fids, init_scale: float = 0.0, out: np.ndarray | None = None):
        """Like ``lookup``, also returning bool (n,) of which FIDs were present."""
        fids = _as_fids(fids)
        n = fids.shape[0]
        if out is None:
            out = np.empty((n, self.dim), dtype=np.float32)
        elif out.shape != (n, self.dim) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(
                f"out requires a C-contiguous float32 array of shape {(n, self.dim)}, "
                f"got {out.dtype} {out.shape}"
            )
        found = np.empty(n, dtype=np.bool_)
        while True:
            state = self._state
            if cuckoo.lookup_batch(state.keys, state.rows, state.versions, fids, out, found,
                                   float(init_scale)) != cuckoo.STUCK:
                return out, found
            self._on_stuck()

    def contains(self, fids) -> np.ndarray:
        """bool (n,): which of ``fids`` are in the table."""
        fids = _as_fids(fids)
        found = np.empty(fids.shape[0], dtype=np.bool_)
        while True:
            state = self._state
            if cuckoo.contains_batch(state.keys, state.versions, fids, found) != cuckoo.STUCK:
                return found
            self._on_stuck()

    def _on_stuck(self) -> None:
        """A read gave up on a stripe a writer held for MAX_SPINS re-reads: in
        one process the writer is alive (just descheduled), so read again."""

    def frequency(self, fids) -> np.ndarray:
        """Sightings of each FID as the admission sketch estimates them (never fewer)."""
        fids = _as_fids(fids)
        counts = np.empty(fids.shape[0], dtype=np.uint16)
        cuckoo.sketch_estimate(self._sketch, fids, counts)
        return counts

    # ----------------------------------------------------------------- writers

    def upsert(self, fids, rows, now, min_count=1) -> np.ndarray:
        """Sets the row of each FID (float32 values, stored in the table's row type) and stamps
        it ``now`` (a time, or one per row); returns bool (n,) of the FIDs written. With
        ``min_count > 1`` (an int, or one per FID), a FID not yet in the table counts one
        sighting and is written only once it has been seen ``min_count`` times.
        Repeated FIDs: the last row wins. Raises ValueError for a value the row type cannot
        hold (non-finite, or beyond fp16's range: server.table.quantize)."""
        fids = _as_fids(fids)
        n = fids.shape[0]
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.shape != (n, self.dim):
            raise ValueError(f"rows requires shape {(n, self.dim)} to match fids, got {rows.shape}")
        if self.row_dtype != "fp32":
            rows = encode_rows(rows, self.row_dtype)
        if np.any(fids == EMPTY_KEY):
            raise ValueError(f"fids must not contain the reserved empty key {int(EMPTY_KEY):#x}")
        stamps = np.ascontiguousarray(np.broadcast_to(np.asarray(now, dtype=np.float64), (n,)))
        if not np.all(np.isfinite(stamps)):
            raise ValueError(f"now requires finite times, got {now}")
        with self._write_lock:
            admit = self._admit(fids, min_count)
            self._write(fids, rows, stamps, admit)
            if n:
                self._newest_stamp = max(self._newest_stamp, float(stamps.max()))
            elif np.ndim(now) == 0:
                self._newest_stamp = max(self._newest_stamp, float(now))
        return admit

    def delete(self, fids) -> np.ndarray:
        """Removes ``fids``; returns bool (n,) of the ones that were present."""
        fids = _as_fids(fids)
        deleted = np.empty(fids.shape[0], dtype=np.bool_)
        with self._write_lock:
            state = self._state
            self._count -= cuckoo.delete_batch(state.keys, state.versions, fids, deleted)
        return deleted

    def evict_expired(self, ttl_s: float, now: float | None = None) -> np.ndarray:
        """Removes rows last updated more than ``ttl_s`` before ``now``
        (default: the newest update seen) and returns their FIDs, uint64."""
        if not ttl_s >= 0:
            raise ValueError(f"ttl_s requires >= 0, got {ttl_s}")
        return self._evict(np.full(SLOT_IDS, -float(ttl_s)), now)

    def evict_expired_by_slot(self, ttl_s_by_slot: dict[int, float], now: float | None = None) -> np.ndarray:
        """Like ``evict_expired`` with a TTL per slot (``server.features.slot_of``);
        FIDs of slots not listed never expire. Returns the evicted FIDs."""
        return self._evict(self._slot_offsets(ttl_s_by_slot), now)

    def count_expired_by_slot(self, ttl_s_by_slot: dict[int, float], now: float | None = None) -> int:
        """How many rows ``evict_expired_by_slot`` with the same arguments would remove; removes none."""
        offsets = self._slot_offsets(ttl_s_by_slot)
        with self._write_lock:
            reference = self._newest_stamp if now is None else float(now)
            state = self._state
            return int(cuckoo.count_expired_by_slot(state.keys, state.stamps, reference + offsets,
                                                    np.uint64(SIGNATURE_BITS)))

    @staticmethod
    def _slot_offsets(ttl_s_by_slot: dict[int, float]) -> np.ndarray:
        offsets = np.full(SLOT_IDS, -np.inf)  # indexed by slot: every 64-bit key has one
        for slot, ttl in ttl_s_by_slot.items():
            offsets[slot] = -float(ttl)
        return offsets

    def _evict(self, cutoff_offsets: np.ndarray, now: float | None) -> np.ndarray:
        """Evicts keys with stamp < reference + cutoff_offsets[slot of key]."""
        with self._write_lock:
            reference = self._newest_stamp if now is None else float(now)
            state = self._state
            evicted = np.empty(self._count, dtype=np.uint64)
            n = cuckoo.evict_by_slot(state.keys, state.stamps, state.versions, reference + cutoff_offsets,
                                     np.uint64(SIGNATURE_BITS), evicted)
            self._count -= n
        return evicted[:n].copy()

    def items(self, chunk_rows: int = 1 << 16) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yields (fids uint64[k], rows float32[k, D], stamps float64[k]) chunks
        of at most ``chunk_rows`` entries, each a fresh copy; rows as served (decoded
        from the row type). Holds the writer
        lock between chunks only, so a writer in between can make an entry
        appear twice or not at all; use it where no writer runs (or ``save``)."""
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows requires >= 1, got {chunk_rows}")
        start = 0
        while True:
            with self._write_lock:
                state = self._state
                if start >= state.keys.shape[0]:
                    return
                out_fids = np.empty(chunk_rows, dtype=np.uint64)
                out_rows = np.empty((chunk_rows, self._storage_width), dtype=self._storage_dtype)
                out_stamps = np.empty(chunk_rows, dtype=np.float64)
                start, n = cuckoo.export_chunk(state.keys, state.rows, state.stamps, start,
                                               out_fids, out_rows, out_stamps)
            if n:
                rows = out_rows[:n] if self.row_dtype == "fp32" else decode_rows(out_rows[:n], self.row_dtype)
                yield out_fids[:n], rows, out_stamps[:n]

    # --------------------------------------------------------------- snapshot

    def save(self, path: str | os.PathLike) -> None:
        """Writes the whole table to ``path`` atomically (temp file, fsync, rename), rows as stored."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        version = _FP32_FORMAT if self.row_dtype == "fp32" else _ROW_DTYPE_FORMAT
        header_struct = _HEADERS[version]
        row_bytes = self.bytes_per_row
        with self._write_lock:
            state = self._state
            count = self._count
            keys_at = header_struct.size + _HEADER_CRC.size
            rows_at = keys_at + 8 * count
            stamps_at = rows_at + row_bytes * count
            crcs = [0, 0, 0]
            offsets = [keys_at, rows_at, stamps_at]
            chunk = max(1, _COPY_CHUNK_BYTES // row_bytes)
            out_fids = np.empty(chunk, dtype=np.uint64)
            out_rows = np.empty((chunk, self._storage_width), dtype=self._storage_dtype)
            out_stamps = np.empty(chunk, dtype=np.float64)
            try:
                with open(tmp, "wb") as f:
                    f.truncate(stamps_at + 8 * count)
                    start, written = 0, 0
                    while start < state.keys.shape[0]:
                        start, n = cuckoo.export_chunk(state.keys, state.rows, state.stamps, start,
                                                       out_fids, out_rows, out_stamps)
                        for k, part in enumerate((out_fids[:n], out_rows[:n], out_stamps[:n])):
                            data = part.tobytes()
                            f.seek(offsets[k])
                            f.write(data)
                            offsets[k] += len(data)
                            crcs[k] = zlib.crc32(data, crcs[k])
                        written += n
                    assert written == count, (written, count)
                    fields = (self.dim, count, self._newest_stamp)
                    if version == _ROW_DTYPE_FORMAT:
                        fields += (row_dtype_code(self.row_dtype),)
                    header = header_struct.pack(_MAGIC, version, *fields, *crcs)
                    f.seek(0)
                    f.write(header + _HEADER_CRC.pack(zlib.crc32(header)))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        fsync_path(path.parent)

    @classmethod
    def load(cls, path: str | os.PathLike, row_dtype: str | None = None, **table_args) -> "EmbeddingTable":
        """Reads a snapshot written by ``save`` into a table of ``row_dtype`` (default: the snapshot's).
        Raises SnapshotError, naming the file and what is wrong, if it is truncated, corrupt or of
        another format, or holds a value ``row_dtype`` cannot (fp16's range)."""
        data = read_snapshot(path)
        table_args.setdefault("capacity", int(data.keys.shape[0] / 0.9) + SLOTS)
        table = cls(data.dim, row_dtype=row_dtype or data.row_dtype, **table_args)
        table.fill_from_snapshot(path, data)
        return table

    def fill_from_snapshot(self, path, data: "SnapshotData") -> None:
        """Writes what ``read_snapshot(path)`` returned into this (empty) table, converting its rows
        to this table's row type where they differ."""
        n = data.keys.shape[0]
        # Converted a chunk at a time: whole-table temporaries would stay in the heap as resident memory
        # (measured: 25 MB more in a ranker stub that created an int8 table from a 2M-row fp32 snapshot).
        step = n if data.row_dtype == self.row_dtype else _CONVERT_CHUNK_ROWS
        with self._write_lock:
            for start in range(0, n, max(step, 1)):
                rows = data.rows[start:start + step]
                if data.row_dtype != self.row_dtype:
                    try:
                        rows = encode_rows(decode_rows(rows, data.row_dtype), self.row_dtype)
                    except ValueError as exc:
                        raise SnapshotError(f"{path}: its {data.row_dtype} rows do not fit a {self.row_dtype} "
                                            f"table: {exc}") from None
                self._write(data.keys[start:start + step], rows, data.stamps[start:start + step],
                            np.ones(rows.shape[0], dtype=np.bool_))
            self._newest_stamp = float(data.newest)
        if len(self) != data.keys.shape[0]:
            raise SnapshotError(f"{path}: holds duplicate keys ({data.keys.shape[0]} entries, {len(self)} distinct)")

    @property
    def sketch(self) -> np.ndarray:
        """The admission sketch, uint16[depth, width] (a copy)."""
        with self._write_lock:
            return self._sketch.copy()

    def restore_sketch(self, sketch: np.ndarray) -> None:
        """Replaces the admission sketch with one taken from ``sketch`` (same shape)."""
        sketch = np.asarray(sketch)
        if sketch.shape != self._sketch.shape or sketch.dtype != np.uint16:
            raise ValueError(f"sketch requires uint16{list(self._sketch.shape)}, got {sketch.dtype}{list(sketch.shape)}")
        with self._write_lock:
            self._sketch = np.ascontiguousarray(sketch).copy()

    # ---------------------------------------------------------------- private

    def admit(self, fids, min_counts) -> np.ndarray:
        """bool (n,): FIDs that are present, or that reach their admission
        threshold with this sighting. Counts one sighting of each absent FID
        (repeats within a call count again). ``min_counts``: int or int (n,)."""
        fids = _as_fids(fids)
        with self._write_lock:
            return self._admit(fids, min_counts)

    def _admit(self, fids: np.ndarray, min_counts) -> np.ndarray:
        thresholds = np.broadcast_to(np.asarray(min_counts, dtype=np.int64), fids.shape)
        if not np.any(thresholds > 1):
            return np.ones(fids.shape[0], dtype=np.bool_)
        admit = self.contains(fids)
        new = ~admit
        if np.any(new):
            counts = np.empty(int(new.sum()), dtype=np.uint16)
            cuckoo.sketch_count(self._sketch, fids[new], counts)
            admit[new] = counts >= np.minimum(thresholds[new], 0xFFFF)
        return admit

    def _write(self, fids: np.ndarray, rows: np.ndarray, stamps: np.ndarray, admit: np.ndarray) -> None:
        """Writer lock held. Upserts, growing as often as the kernel asks."""
        start = 0
        while True:
            state = self._state
            status, start, self._count = cuckoo.upsert_batch(
                state.keys, state.rows, state.stamps, state.versions, fids, rows, stamps, admit,
                start, state.max_count, self._count, *self._queue,
            )
            if status == cuckoo.OK:
                return
            self._grow()

    def _grow(self) -> None:
        """Writer lock held. Doubles the bucket count (again if a rehash fails)."""
        old = self._state
        if self.first_growth_load_factor is None:
            self.first_growth_load_factor = self._count / old.keys.shape[0]
        self._state = self._rehashed(old, old.keys.shape[0] // SLOTS * 2)
        self.growths += 1

    def _rehashed(self, old: TableArrays, n_buckets: int, dedupe: bool = False) -> TableArrays:
        """Writer lock held. A copy of ``old`` in new storage of at least
        n_buckets buckets (doubling until it fits); ``dedupe``: one entry per key
        even where ``old`` holds a key twice (see server.table.cuckoo)."""
        while True:
            new = self._allocate(n_buckets)
            status = cuckoo.rehash_into(old.keys, old.rows, old.stamps, new.keys, new.rows, new.stamps,
                                        new.versions, *self._queue, dedupe)
            if status == cuckoo.OK:
                return new
            self._release(new)
            n_buckets *= 2


class SnapshotData(NamedTuple):
    """A snapshot file's contents: rows as stored, in ``row_dtype`` (server.table.quantize)."""

    dim: int
    keys: np.ndarray
    rows: np.ndarray
    stamps: np.ndarray
    newest: float
    row_dtype: str


def read_snapshot(path: str | os.PathLike) -> SnapshotData:
    """What a snapshot file written by ``EmbeddingTable.save`` holds; raises SnapshotError naming the fault."""
    path = Path(path)
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise SnapshotError(f"{path}: truncated header: {len(prefix)} bytes")
        magic, version = _PREFIX.unpack(prefix)
        if magic != _MAGIC:
            raise SnapshotError(f"{path}: not a table snapshot (magic {magic!r}, expected {_MAGIC!r})")
        header_struct = _HEADERS.get(version)
        if header_struct is None:
            raise SnapshotError(f"{path}: format version {version}, this build reads {sorted(_HEADERS)}")
        header_bytes = header_struct.size + _HEADER_CRC.size
        raw_header = prefix + f.read(header_bytes - _PREFIX.size)
        if len(raw_header) < header_bytes:
            raise SnapshotError(f"{path}: truncated header: {len(raw_header)} of {header_bytes} bytes")
        (header_crc,) = _HEADER_CRC.unpack_from(raw_header, header_struct.size)
        if zlib.crc32(raw_header[: header_struct.size]) != header_crc:
            raise SnapshotError(f"{path}: header checksum mismatch")
        _, _, dim, count, newest, *rest = header_struct.unpack_from(raw_header)
        try:
            row_dtype = row_dtype_of_code(rest.pop(0)) if version == _ROW_DTYPE_FORMAT else "fp32"
        except ValueError as exc:
            raise SnapshotError(f"{path}: {exc}") from None
        crcs = rest
        if dim < 1:
            raise SnapshotError(f"{path}: dim {dim}, requires >= 1")
        dtype, width = storage_layout(dim, row_dtype)
        expected = header_bytes + count * (8 + width * dtype.itemsize + 8)
        actual = os.fstat(f.fileno()).st_size
        if actual != expected:
            raise SnapshotError(f"{path}: truncated or padded: {actual} bytes, header says {expected}")
        keys = np.fromfile(f, dtype=np.uint64, count=count)
        rows = np.fromfile(f, dtype=dtype, count=count * width).reshape(count, width)
        stamps = np.fromfile(f, dtype=np.float64, count=count)
    for name, part, crc in zip(("keys", "rows", "stamps"), (keys, rows, stamps), crcs):
        if zlib.crc32(part) != crc:
            raise SnapshotError(f"{path}: {name} section checksum mismatch")
    if np.any(keys == EMPTY_KEY):
        raise SnapshotError(f"{path}: holds the reserved empty key")
    return SnapshotData(dim, keys, rows, stamps, newest, row_dtype)


def _as_fids(fids) -> np.ndarray:
    fids = np.asarray(fids)
    if fids.ndim != 1:
        raise ValueError(f"fids requires a 1-D array, got shape {fids.shape}")
    if fids.dtype == np.int64:
        fids = fids.view(np.uint64)
    elif fids.dtype != np.uint64:
        if fids.size == 0:
            return np.empty(0, dtype=np.uint64)
        raise TypeError(f"fids requires dtype uint64 (or int64), got {fids.dtype}")
    return np.ascontiguousarray(fids)

