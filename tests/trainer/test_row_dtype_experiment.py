"""experiment row-dtype on a slice of MovieLens-100K: real serving tables of each row type, their lookups and
the ranker's scoring. (The lookup kernel's decoders are tested in tests/server/table/test_row_dtypes.py.)"""

from server.features import shipped_schema
from trainer.data import load_dataset
from trainer.row_dtype_experiment import format_row_dtype, run_row_dtype

SCHEMA = shipped_schema()


def test_row_types_score_like_fp32_on_one_model():
    examples = load_dataset("ml-100k", SCHEMA).slice(0, 5_000)
    result = run_row_dtype(SCHEMA, seeds=1, quick=False, examples=examples, lookup_rows=20_000)
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["fp32", "fp16", "int8"] and result["test_examples"] == 1_000
    assert rows["fp32"]["auc_loss_mean"] == 0 and rows["fp32"]["score_max_abs_diff"] == 0
    assert abs(rows["fp16"]["auc_loss_mean"]) <= 0.001 and abs(rows["int8"]["auc_loss_mean"]) <= 0.003
    assert 0 < rows["fp16"]["score_max_abs_diff"] < 0.01 and 0 < rows["int8"]["score_max_abs_diff"] < 0.05
    assert [(r["row_bytes"], r["slot_bytes"]) for r in rows.values()] == [(64, 80), (32, 48), (20, 36)]
    # the tables' own arrays over their rows: 20,000 rows in 32,768 slots, and a seqlock word per bucket of 8
    assert [r["table_bytes_per_row"] for r in rows.values()] == [
        round(32_768 * (slot + 1) / result["lookup_rows"], 1) for slot in (80, 48, 36)]
    assert all(r["lookup_mkeys_per_s"] > 0 and r["ranker_cpu_us_per_request"] > 0 for r in rows.values())
    assert result["gather_mrows_per_s"] > 0 and rows["fp32"]["lookup_vs_fp32"] == 1.0
    assert "int8" in format_row_dtype(result)
