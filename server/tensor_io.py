"""A safe, checksummed byte format for named numpy arrays (dense weights, no pickle).

    magic "MRTTENS1" | manifest_len u32 | manifest JSON | data | crc32 u32

The manifest lists, in order, {"name", "dtype", "shape"}; data holds each
tensor's C-order bytes back to back. The CRC-32 covers everything before it.
Decoding checks the magic, the CRC, the dtypes (a fixed allow-list) and that
the sizes add up, so a torn or corrupt blob raises ValueError, never loads.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Mapping

import numpy as np

_MAGIC = b"MRTTENS1"
_LEN = struct.Struct("<I")
_DTYPES = {"float32", "float64", "float16", "int64", "int32", "uint8", "bool"}


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    manifest, chunks = [], []
    for name, value in tensors.items():
        array = np.asarray(value, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if array.dtype.name not in _DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} not in {sorted(_DTYPES)}")
        manifest.append({"name": name, "dtype": array.dtype.name, "shape": list(array.shape)})
        chunks.append(array.tobytes())
    head = json.dumps(manifest, separators=(",", ":")).encode()
    body = _MAGIC + _LEN.pack(len(head)) + head + b"".join(chunks)
    return body + _LEN.pack(zlib.crc32(body))


def decode_tensors(blob: bytes) -> dict[str, np.ndarray]:
    """Name -> a writable array of its own (a copy out of ``blob``), in the blob's order."""
    blob = memoryview(blob)
    if len(blob) < len(_MAGIC) + 2 * _LEN.size or bytes(blob[: len(_MAGIC)]) != _MAGIC:
        raise ValueError("tensor blob: bad magic or too short")
    (crc,) = _LEN.unpack_from(blob, len(blob) - _LEN.size)
    if zlib.crc32(blob[: len(blob) - _LEN.size]) != crc:
        raise ValueError("tensor blob: checksum mismatch")
    (head_len,) = _LEN.unpack_from(blob, len(_MAGIC))
    at = len(_MAGIC) + _LEN.size
    try:
        manifest = json.loads(bytes(blob[at : at + head_len]))
    except ValueError as exc:
        raise ValueError(f"tensor blob: bad manifest: {exc}") from exc
    at += head_len
    end = len(blob) - _LEN.size
    out = {}
    for entry in manifest:
        dtype = entry["dtype"]
        if dtype not in _DTYPES:
            raise ValueError(f"tensor blob: dtype {dtype!r} not allowed")
        shape = tuple(int(d) for d in entry["shape"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if at + nbytes > end:
            raise ValueError(f"tensor blob: tensor {entry['name']!r} runs past the data")
        out[entry["name"]] = np.frombuffer(blob[at : at + nbytes], dtype=dtype).reshape(shape).copy()
        at += nbytes
    if at != end:
        raise ValueError(f"tensor blob: {end - at} bytes left over after the last tensor")
    return out


def nonfinite(tensors: Mapping[str, np.ndarray]) -> list[str]:
    """The names of the floating-point tensors that hold NaN or Inf."""
    return [name for name, value in tensors.items()
            if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.isfinite(value).all()]
