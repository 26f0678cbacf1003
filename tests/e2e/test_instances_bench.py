"""``bench instances`` on a tiny table: the figures issue 24 asks of it are there and add up."""

from loadtest.instances_bench import bench_instances, format_instances_report
from server.features import shipped_schema


def test_bench_instances_reports_ready_time_and_stub_memory_beside_the_table():
    result = bench_instances(shipped_schema(), [1], rows=2000, candidates=10, concurrency=2, window_s=0.5, rounds=1,
                             row_dtypes=("int8",))
    (row,) = result["rows"]
    assert row["ready_s"] > 0 and row["row_dtype"] == "int8"
    slots = row["table_bytes"] // 37  # per slot: key 8, int8 row of dim 16 with its scale 20, stamp 8, seqlock 1
    assert slots * 37 == row["table_bytes"] and slots & (slots - 1) == 0
    (rss,), (without,), (pss,) = row["stub_rss_bytes"], row["stub_rss_minus_table_bytes"], \
        row["stub_pss_minus_table_bytes"]
    assert 0 < pss <= without < rss  # the stub read table pages; Pss splits the libraries it shares
    assert "without the table" in format_instances_report(result)
