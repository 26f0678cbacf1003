"""Short runs of the load tests, the demo and the soak against spawned servers."""

import json


from loadtest.freshness import run_freshness
from loadtest.latency import LatencyConfig, run_latency, write_report
from server.features import shipped_schema

SCHEMA = shipped_schema()


def test_short_spawned_latency_run(tmp_path):
    result = run_latency(SCHEMA, LatencyConfig(rate=150.0, duration_s=3.0, warmup_s=0.5, candidates=20,
                                               with_updates=20_000, baseline=True, rounds=1))
    write_report(result, tmp_path)
    saved = json.loads((tmp_path / "latency.json").read_text())
    assert (tmp_path / "latency.png").stat().st_size > 1000
    for key in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "achieved_rps", "errors", "baseline_p50_ms",
                "p99_ratio_vs_no_updates"):
        assert key in saved
    assert saved["errors"] == 0
    assert 0 < saved["p50_ms"] <= saved["p90_ms"] <= saved["p99_ms"] <= saved["p999_ms"]
    assert saved["achieved_rps"] > 0
    assert saved["delta_seq_at_end"] > 0, "the updates never reached the ranker"
    assert saved["applied_rows_per_s"] > 0  # from the ranker's metrics, not the rate asked for
    assert saved["table_rows_at_end"] > 200_000  # started from a populated snapshot, grown by new rows
    assert saved["ranker"]["server_side"]["compute_infer_us"] > 0



def test_short_freshness_run():
    result = run_freshness(None, "grpc", probes=3, timeout_s=10.0, sync_interval_ms=100.0, schema=SCHEMA)
    assert result["probes"] == 3 and result["failed"] == 0
    assert 0 < result["p50_s"] <= result["max_s"] < 5.0


def test_short_freshness_run_against_its_timer_only_baseline_under_load():
    """--baseline --rate: both modes measured in one run, each with the emitted records and the load's p99."""
    result = run_freshness(None, "grpc", probes=3, timeout_s=10.0, sync_interval_ms=200.0, schema=SCHEMA,
                           rate=20.0, baseline=True)
    for run in (result, result["baseline"]):
        assert run["probes"] == 3 and run["failed"] == 0 and run["load_errors"] == 0
        assert run["delta_records_per_s"] > 0 and run["rows_per_record"] >= 1 and run["ranker_p99_ms"] > 0
    assert result["ranker_p99_ratio"] > 0



def test_short_demo_run(tmp_path):
    from loadtest.demo import run_demo

    summary = run_demo(SCHEMA, tmp_path / "data", tmp_path / "report", minutes=0.15, concurrency=2, negatives=4,
                       sync_interval_ms=200.0)
    assert summary["errors"] == 0 and summary["requests"] > 200
    assert 0.5 < summary["served_auc"] < 1.0 and 0.5 < summary["batch_only_auc"] < 1.0
    assert len(summary["served_auc_by_tenth"]) == len(summary["batch_only_auc_by_tenth"]) == 10
    assert summary["freshness"]["probes"] >= 1 and summary["freshness"]["failed"] == 0
    assert summary["latency_ms"]["count"] == summary["requests"]
    for name in ("summary.json", "latency.png", "quality.png"):
        assert (tmp_path / "report" / name).stat().st_size > 100



def test_short_soak():
    from loadtest.soak import run_soak

    result = run_soak(SCHEMA, minutes=0.3, clients=1, sample_s=4.0)
    assert result["errors"] == 0, result["last_error"]
    assert result["requests"] > 100 and len(result["samples"]) >= 3
    assert result["freshness_failed"] == 0
    assert result["server_rss_mb"]["end"] > 100 and result["trainer_rss_mb"]["end"] > 100
    assert -0.5 < result["server_rss_growth"] < 0.5 and -0.5 < result["trainer_rss_growth"] < 0.5
    assert 0 < result["disk_bytes"]["start"] <= result["disk_bytes"]["max"]
