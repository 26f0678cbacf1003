"""updater.apply_bench: the apply benchmark reports both sides of its comparison."""

from server.features import shipped_schema

SCHEMA = shipped_schema()


def test_bench_apply_reports_both_sides():
    from updater.apply_bench import bench_apply

    result = bench_apply(SCHEMA, rows=20_000, dim=8, rows_per_record=5_000)
    assert result["records"] == 4 and 0 < result["table_rows"] <= 20_000
    assert result["rows_per_s"] > 0 and result["encode_rows_per_s"] > 0
