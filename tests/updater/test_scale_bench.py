"""updater.scale_bench: the cost curve reports every figure per size, and skips what does not fit."""

import dataclasses

import orjson
import pytest

from server.features import shipped_schema
from updater import scale_bench
from updater.scale_bench import ScaleConfig, bench_scale

SCHEMA = shipped_schema()
KEYS = ("rows", "lookup_mkeys_per_s", "insert_mkeys_per_s", "reader_stall_max_ms", "apply_stall_max_ms",
        "snapshot_write_s", "snapshot_load_s", "recovery_s", "resident_bytes_per_row")
SMALL = ScaleConfig(batch=1024, record_rows=512, lookups=20_000)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "private"])
def test_every_size_reports_every_figure(shared):
    sizes = [20_000, 40_000] if shared else [20_000]
    result = bench_scale(SCHEMA, sizes, dataclasses.replace(SMALL, shared=shared))
    orjson.dumps(result)  # what --json prints
    assert result["table"] == ("shared" if shared else "private") and result["dim"] == 16
    assert [size["rows"] for size in result["rows"]] == sizes
    for size in result["rows"]:
        assert all(size[key] is not None for key in KEYS), size
        assert size["growths"] == 1 and size["growth_rows_copied"] >= size["rows"]
        assert size["snapshot_rows"] > size["growth_rows_copied"]
        assert size["table_slots"] * 0.98 >= size["rows"] and size["recovered_table_slots"] >= size["rows"]
        # the applier's longest apply is the one that grew the table: the copy plus an ordinary apply
        assert size["apply_stall_max_ms"] >= size["growth_copy_ms"] > 0
        assert 0 < size["resident_bytes_per_row"] and 0 < size["recovered_resident_bytes_per_row"]
        readers = size["reader_stall_by_reader"]
        assert set(readers) == ({"thread", "process"} if shared else {"thread"})
        assert size["reader_stall_max_ms"] == max(reader["ms"] for reader in readers.values())
        assert all(reader["cpu_ms"] >= 0 and reader["minor_faults"] >= 0 for reader in readers.values())
        assert set(size["reader_calls_during_growth"]) == set(readers)
    if shared:
        assert set(result["per_row_cost_ratio"]) == set(scale_bench._PER_ROW)


def test_a_size_that_does_not_fit_in_memory_is_skipped_saying_so(monkeypatch):
    monkeypatch.setattr(scale_bench, "memory_available_bytes", lambda: 2 << 30)
    result = bench_scale(SCHEMA, [64_000_000], SMALL)
    (big,) = result["rows"]
    assert big["rows"] == 64_000_000 and big["skipped"].startswith("needs ~") and "2.1 GB available" in big["skipped"]
    assert result["per_row_cost_ratio"] == {}
