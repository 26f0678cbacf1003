"""Row types of a serving table: fp32, fp16, or int8 with a per-row scale.

The trainer keeps fp32 master rows; a serving table may store each row in a
narrower row type, chosen per deployment. What serving reads is then the
trainer's row *as quantized*, ``dequantize_rows(*quantize_rows(rows, t), t)``,
and the byte-exact checks compare against that, never against the fp32 row.

Layout of N rows of dim D per row type (what one row costs beside its key)::

    fp32   values float32[N, D]                         4 D bytes
    fp16   values float16[N, D]                         2 D bytes
    int8   values int8[N, D]  + scales float32[N]       D + 4 bytes

fp16 rounds to nearest (ties to even); a value beyond fp16's range
(|x| > 65504) is refused rather than stored as inf. int8 is symmetric per
row: ``scale = max|row| / 127`` (computed in float64, stored as float32; an
all-zero row has scale 0) and ``q = round(x / scale)`` to nearest, ties to
even, in [-127, 127]; ``x ~ q * scale``.

Error bounds (tested as properties), per element:
    fp16   |x' - x| <= 2**-11 |x|  for |x| >= 2**-14 (normal range), <= 2**-25 below it
    int8   |x' - x| <= scale / 2   (plus float32 rounding of the product q * scale)
    fp32   x' == x
Quantizing is deterministic (same bytes for the same fp32 row on every host)
and stable: quantizing a dequantized row gives back the same values.

Non-finite values are refused: the trainer never emits them, so one here is
a bug upstream, not something to round.

Storage: how a table keeps the rows, one row of ``storage_layout`` per slot, so
that a lookup touches one row and nothing beside it::

    fp32   float32[N, D]        the values
    fp16   uint16[N, D]         each value's fp16 bits (numba has no float16 type)
    int8   int8[N, D + 4]       the D values, then the scale's 4 float32 bytes, little-endian

``encode_rows`` turns fp32 rows into storage (quantizing them) and
``decode_rows`` reads storage back as float32, exactly as ``dequantize_rows``
and the table's lookup kernel (server.table.cuckoo) do.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FP16_MAX", "ROW_DTYPES", "bytes_per_row", "decode_rows", "dequantize_rows", "encode_rows", "quantize_rows",
           "quantized", "row_dtype_code", "row_dtype_of_code", "storage_layout"]

ROW_DTYPES = ("fp32", "fp16", "int8")
_STORAGE_DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.uint16), "int8": np.dtype(np.int8)}
_SCALE_BYTES = 4
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
_INT8_MAX = 127


def _check_row_dtype(row_dtype: str) -> None:
    if row_dtype not in ROW_DTYPES:
        raise ValueError(f"row dtype requires one of {ROW_DTYPES} (serve --row-dtype), got {row_dtype!r}")


def row_dtype_code(row_dtype: str) -> int:
    """The number that names ``row_dtype`` in snapshot headers and shared-table control blocks (fp32 is 0)."""
    _check_row_dtype(row_dtype)
    return ROW_DTYPES.index(row_dtype)


def row_dtype_of_code(code: int) -> str:
    """The row type ``row_dtype_code`` gave ``code``; ValueError for a number it never gives."""
    if not 0 <= code < len(ROW_DTYPES):
        raise ValueError(f"row dtype code requires 0 to {len(ROW_DTYPES) - 1} ({', '.join(ROW_DTYPES)}), got {code}")
    return ROW_DTYPES[code]


def storage_layout(dim: int, row_dtype: str) -> tuple[np.dtype, int]:
    """(dtype, width) of one stored row of ``dim`` values: its bytes are width * dtype.itemsize."""
    _check_row_dtype(row_dtype)
    return _STORAGE_DTYPES[row_dtype], dim + (_SCALE_BYTES if row_dtype == "int8" else 0)


def encode_rows(rows: np.ndarray, row_dtype: str) -> np.ndarray:
    """[N, D] float32 rows -> their storage [N, width] (see the module doc): quantized, in a new array.
    Raises ValueError as ``quantize_rows`` does."""
    values, scales = quantize_rows(rows, row_dtype)
    if row_dtype == "fp32":
        return values
    if row_dtype == "fp16":
        return values.view(np.uint16)
    storage = np.empty((values.shape[0], values.shape[1] + _SCALE_BYTES), dtype=np.int8)
    storage[:, :values.shape[1]] = values
    storage[:, values.shape[1]:] = scales.astype("<f4").view(np.int8).reshape(-1, _SCALE_BYTES)
    return storage


def decode_rows(storage: np.ndarray, row_dtype: str) -> np.ndarray:
    """Storage [N, width] of ``row_dtype`` -> the float32 rows [N, D] it stands for (a new array)."""
    dtype, _ = storage_layout(0, row_dtype)
    if storage.ndim != 2 or storage.dtype != dtype:
        raise ValueError(f"{row_dtype} storage requires a 2-D {dtype} array, got {storage.dtype} {storage.shape}")
    if row_dtype == "fp32":
        return storage.copy()
    if row_dtype == "fp16":
        return storage.view(np.float16).astype(np.float32)
    dim = storage.shape[1] - _SCALE_BYTES
    if dim < 0:
        raise ValueError(f"int8 storage requires rows of D + {_SCALE_BYTES} bytes, got {storage.shape[1]}")
    scales = np.ascontiguousarray(storage[:, dim:]).view("<f4").reshape(-1)
    return dequantize_rows(storage[:, :dim], scales, "int8")


def bytes_per_row(dim: int, row_dtype: str) -> int:
    """Bytes one row of ``dim`` values takes in ``row_dtype`` (values plus its scale for int8; no key)."""
    dtype, width = storage_layout(dim, row_dtype)
    return width * dtype.itemsize


def quantize_rows(rows: np.ndarray, row_dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """[N, D] float32 rows -> (values [N, D] of the row type, float32 scales [N] for int8 else None).

    Raises ValueError on a non-finite value, or an fp16 value beyond +-65504, naming the first one."""
    _check_row_dtype(row_dtype)
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"quantize_rows requires rows of shape [N, D], got shape {rows.shape}")
    bad = ~np.isfinite(rows)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"quantize_rows requires finite values, got {rows[r, c]} at row {r}, column {c}")
    if row_dtype == "fp32":
        return rows.copy(), None
    if row_dtype == "fp16":
        over = np.abs(rows) > FP16_MAX
        if over.any():
            r, c = np.argwhere(over)[0]
            raise ValueError(f"fp16 rows require |value| <= {FP16_MAX:g}, got {rows[r, c]} at row {r}, column {c}; "
                             f"serve with --row-dtype int8 or fp32")
        return rows.astype(np.float16), None
    peak = np.abs(rows).max(axis=1, initial=0.0).astype(np.float64)
    scales = (peak / _INT8_MAX).astype(np.float32)
    # Among subnormals float32 rounding can leave peak / scale past 127.5, or scale 0 for a
    # non-zero row: one step up keeps every |x| / scale <= 127, so the error bound holds there too.
    low = (peak > 0) & ((scales == 0) | (peak > (_INT8_MAX + 0.5) * scales.astype(np.float64)))
    scales[low] = np.nextafter(scales[low], np.float32(np.inf))
    safe = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float64)
    values = np.clip(np.rint(rows / safe[:, None]), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return values, scales


def dequantize_rows(values: np.ndarray, scales: np.ndarray | None, row_dtype: str) -> np.ndarray:
    """The float32 rows that ``quantize_rows`` output stands for: [N, D] float32 (a new array)."""
    _check_row_dtype(row_dtype)
    if row_dtype == "int8":
        if scales is None or scales.shape != values.shape[:1]:
            raise ValueError(f"int8 rows require one scale per row ({values.shape[:1]}), got "
                             f"{None if scales is None else scales.shape}")
        return values.astype(np.float32) * np.asarray(scales, dtype=np.float32)[:, None]
    return values.astype(np.float32)


def quantized(rows: np.ndarray, row_dtype: str) -> np.ndarray:
    """The rows as a table of ``row_dtype`` serves them: quantized, then back to float32."""
    return dequantize_rows(*quantize_rows(rows, row_dtype), row_dtype)
