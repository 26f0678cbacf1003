"""Delta records: what the trainer sends serving, as self-checking bytes.

The same bytes travel in a file segment log or in a message stream. Each
carries absolute values, never increments, so applying a record twice leaves
the same state as applying it once.

    header  "<4sHBBqdIII"  magic "MRTD" | format u16 | kind u8 | table_id u8
                           | seq i64 | created_s f64 | dim u32 | rows u32 | evicted u32
    sparse  fids uint64[rows] | values float32[rows, dim] | evicted uint64[evicted]
    dense   a server.tensor_io blob of the whole dense state (server.dense; dim = rows = evicted = 0)
    trailer CRC-32 u32 over header and payload

``seq`` starts at 1 and grows by exactly 1 per record; a snapshot at seq S
holds every record with seq <= S.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from server.tensor_io import decode_tensors, encode_tensors, nonfinite

MAGIC = b"MRTD"
FORMAT_VERSION = 1
SPARSE = 1
DENSE = 2
KIND_NAMES = {SPARSE: "sparse", DENSE: "dense"}
_HEADER = struct.Struct("<4sHBBqdIII")
_CRC = struct.Struct("<I")


class DeltaError(ValueError):
    """A record that fails its checksum, or whose fields do not add up."""


@dataclass
class DeltaRecord:
    seq: int
    created_s: float
    kind: int
    table_id: int = 0
    fids: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    values: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.float32))
    evicted: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    dense_state: dict[str, np.ndarray] | None = None

    @classmethod
    def sparse(cls, seq: int, created_s: float, fids, values, evicted=(), table_id: int = 0) -> "DeltaRecord":
        fids = np.ascontiguousarray(fids, dtype=np.uint64)
        values = np.ascontiguousarray(values, dtype=np.float32)
        if values.ndim != 2 or values.shape[0] != fids.shape[0]:
            raise ValueError(f"values requires shape ({fids.shape[0]}, dim), got {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError(f"values requires finite numbers, got {int((~np.isfinite(values)).sum())} NaN/Inf")
        return cls(seq, created_s, SPARSE, table_id, fids, values, np.ascontiguousarray(evicted, dtype=np.uint64))

    @classmethod
    def dense(cls, seq: int, created_s: float, state: dict[str, np.ndarray]) -> "DeltaRecord":
        bad = nonfinite(state)
        if bad:
            raise ValueError(f"dense state requires finite numbers, got NaN/Inf in {bad}")
        return cls(seq, created_s, DENSE, dense_state=dict(state))

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, str(self.kind))

    @property
    def dim(self) -> int:
        return self.values.shape[1] if self.kind == SPARSE else 0

    def encode(self) -> bytes:
        if self.kind == SPARSE:
            payload = self.fids.astype("<u8").tobytes() + self.values.astype("<f4").tobytes() + \
                self.evicted.astype("<u8").tobytes()
            header = _HEADER.pack(MAGIC, FORMAT_VERSION, SPARSE, self.table_id, self.seq, self.created_s,
                                  self.dim, self.fids.shape[0], self.evicted.shape[0])
        elif self.kind == DENSE:
            payload = encode_tensors(self.dense_state or {})
            header = _HEADER.pack(MAGIC, FORMAT_VERSION, DENSE, 0, self.seq, self.created_s, 0, 0, 0)
        else:
            raise ValueError(f"kind requires SPARSE or DENSE, got {self.kind}")
        body = header + payload
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def decode(cls, data: bytes) -> "DeltaRecord":
        if len(data) < _HEADER.size + _CRC.size:
            raise DeltaError(f"delta record: {len(data)} bytes, shorter than a header")
        (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
        if zlib.crc32(memoryview(data)[: len(data) - _CRC.size]) != crc:
            raise DeltaError("delta record: checksum mismatch")
        magic, version, kind, table_id, seq, created, dim, rows, evicted = _HEADER.unpack_from(data)
        if magic != MAGIC or version != FORMAT_VERSION:
            raise DeltaError(f"delta record: magic {magic!r} version {version}, expected {MAGIC!r} {FORMAT_VERSION}")
        payload = memoryview(data)[_HEADER.size : len(data) - _CRC.size]
        if kind == DENSE:
            return cls(seq, created, DENSE, dense_state=decode_tensors(bytes(payload)))  # the applier checks it
        if kind != SPARSE:
            raise DeltaError(f"delta record seq {seq}: unknown kind {kind}")
        expected = 8 * rows + 4 * rows * dim + 8 * evicted
        if len(payload) != expected:
            raise DeltaError(f"delta record seq {seq}: payload {len(payload)} bytes, header implies {expected}")
        fids = np.frombuffer(payload, "<u8", rows, 0)
        values = np.frombuffer(payload, "<f4", rows * dim, 8 * rows).reshape(rows, dim)
        gone = np.frombuffer(payload, "<u8", evicted, 8 * rows + 4 * rows * dim)
        return cls(seq, created, SPARSE, table_id, fids, values, gone)
