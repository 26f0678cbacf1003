"""bench rollback on the local bus, small: the figures it prints are consistent with the stream it wrote
(the nats leg runs in `monolith-rt bench rollback`; tests/e2e/test_guard_bus.py covers the bus path)."""

from server.features import shipped_schema
from updater.rollback_bench import bench_rollback


def test_bench_rollback_reports_the_plan_it_timed():
    out = bench_rollback(shipped_schema(), ["local"], records=8, rows_per_record=50, pool=300)
    local = out["local"]
    assert local["base_seq"] < local["to_seq"] < local["last_seq"]
    assert local["records_replayed"] == local["last_seq"] - local["base_seq"]
    assert local["rows_changed_since_s"] == local["rows_restored"] + local["rows_deleted"] > 0
    assert local["plan_s"] >= 0 and local["apply_s"] >= 0 and local["rollback_records"] >= 2
