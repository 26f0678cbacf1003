"""experiment row-dtype on a slice of MovieLens-100K, and its decoding kernels against numpy."""

import numpy as np
import pytest

from server.features import shipped_schema
from server.table.quantize import quantize_rows
from trainer.data import load_dataset
from trainer.row_dtype_experiment import _gather_fp16, _gather_int8, format_row_dtype, pack_int8, run_row_dtype

SCHEMA = shipped_schema()


def test_fp16_decode_is_exact_for_every_finite_half():
    bits = np.arange(2**16, dtype=np.uint16)
    bits = bits[np.isfinite(bits.view(np.float16))].reshape(-1, 8)
    out = np.empty(bits.shape, dtype=np.float32)
    _gather_fp16(bits, np.arange(bits.shape[0]), out)
    np.testing.assert_array_equal(out.view(np.uint32), bits.view(np.float16).astype(np.float32).view(np.uint32))


def test_packed_int8_rows_decode_to_values_times_scale(rng):
    rows = rng.standard_normal((50, 16)).astype(np.float32)
    values, scales = quantize_rows(rows, "int8")
    packed = pack_int8(values, scales)
    positions = rng.integers(0, 50, 200)
    out = np.empty((200, 16), dtype=np.float32)
    _gather_int8(packed, packed.view(np.float32), positions, out)
    np.testing.assert_array_equal(out, values[positions].astype(np.float32) * scales[positions, None])
    with pytest.raises(ValueError, match="multiple of 4, got 6"):
        pack_int8(values[:, :6], scales)


def test_row_types_score_like_fp32_on_one_model():
    examples = load_dataset("ml-100k", SCHEMA).slice(0, 5_000)
    result = run_row_dtype(SCHEMA, seeds=1, quick=False, examples=examples, gather_rows=20_000)
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["fp32", "fp16", "int8"] and result["test_examples"] == 1_000
    assert rows["fp32"]["auc_loss_mean"] == 0 and rows["fp32"]["score_max_abs_diff"] == 0
    assert abs(rows["fp16"]["auc_loss_mean"]) <= 0.001 and abs(rows["int8"]["auc_loss_mean"]) <= 0.003
    assert 0 < rows["fp16"]["score_max_abs_diff"] < 0.01 and 0 < rows["int8"]["score_max_abs_diff"] < 0.05
    assert [(r["row_bytes"], r["slot_bytes"]) for r in rows.values()] == [(64, 80), (32, 48), (20, 36)]
    assert all(r["gather_mrows_per_s"] > 0 for r in rows.values())
    assert "int8" in format_row_dtype(result)
