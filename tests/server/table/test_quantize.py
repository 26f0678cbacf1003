"""Row types: the error bounds and stability that server/table/quantize.py states, as properties."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from server.table.quantize import ROW_DTYPES, bytes_per_row, dequantize_rows, quantize_rows, quantized

_FP16_MAX = 65504.0
_values = st.floats(-_FP16_MAX, _FP16_MAX, allow_nan=False, allow_infinity=False, width=32)
_rows = hnp.arrays(np.float32, st.tuples(st.integers(0, 6), st.integers(1, 24)), elements=_values)


@settings(max_examples=100, deadline=None)
@given(rows=_rows)
def test_fp16_error_is_relative_in_the_normal_range_and_tiny_below_it(rows):
    values, scales = quantize_rows(rows, "fp16")
    assert values.dtype == np.float16 and values.shape == rows.shape and scales is None
    error = np.abs(dequantize_rows(values, None, "fp16").astype(np.float64) - rows)
    normal = np.abs(rows) >= 2.0**-14
    assert (error[normal] <= 2.0**-11 * np.abs(rows[normal].astype(np.float64))).all()
    assert (error[~normal] <= 2.0**-25).all()


@settings(max_examples=100, deadline=None)
@given(rows=_rows)
def test_int8_error_is_at_most_half_a_step_of_the_row_scale(rows):
    values, scales = quantize_rows(rows, "int8")
    assert values.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (rows.shape[0],)
    assert (np.abs(values.astype(np.int64)) <= 127).all()
    scale = scales.astype(np.float64)[:, None]
    error = np.abs(dequantize_rows(values, scales, "int8").astype(np.float64) - rows)
    rounding = np.abs(values.astype(np.float64)) * scale * 2.0**-24 + 2.0**-150  # of the float32 product
    assert (error <= scale / 2 + rounding).all()
    # the row's largest magnitude maps to +-127 (the whole int8 range is used) while the scale is a
    # normal float32; among subnormals the scale is coarser and only the bound above holds
    normal = np.abs(rows).max(axis=1, initial=0) >= 127 * np.finfo(np.float32).tiny
    assert (np.abs(values[normal]).max(axis=1, initial=0) == 127).all()


@settings(max_examples=100, deadline=None)
@given(rows=_rows, row_dtype=st.sampled_from(ROW_DTYPES))
def test_quantizing_is_deterministic_and_stable(rows, row_dtype):
    first = quantize_rows(rows, row_dtype)
    again = quantize_rows(rows.copy(), row_dtype)
    assert first[0].tobytes() == again[0].tobytes()
    served = quantized(rows, row_dtype)
    assert served.dtype == np.float32 and served.shape == rows.shape
    np.testing.assert_array_equal(quantized(served, row_dtype), served)  # what serving holds quantizes to itself
    if row_dtype == "fp32":
        np.testing.assert_array_equal(served, rows)


def test_zero_rows_have_scale_zero_and_stay_zero():
    values, scales = quantize_rows(np.zeros((3, 4), np.float32), "int8")
    assert (values == 0).all() and (scales == 0).all()
    assert (dequantize_rows(values, scales, "int8") == 0).all()


def test_bytes_per_row_at_dim_16():
    assert [bytes_per_row(16, t) for t in ROW_DTYPES] == [64, 32, 20]


def test_refusals_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"requires one of \('fp32', 'fp16', 'int8'\).*got 'bf16'"):
        quantize_rows(np.zeros((1, 2), np.float32), "bf16")
    with pytest.raises(ValueError, match="finite values, got nan at row 1, column 0"):
        quantize_rows(np.array([[1.0, 2.0], [np.nan, 0.0]], np.float32), "int8")
    with pytest.raises(ValueError, match="fp16 rows require .*got 70000.0 at row 0, column 1.*--row-dtype int8"):
        quantize_rows(np.array([[1.0, 70000.0]], np.float32), "fp16")
    with pytest.raises(ValueError, match="one scale per row"):
        dequantize_rows(np.zeros((2, 3), np.int8), np.zeros(3, np.float32), "int8")
