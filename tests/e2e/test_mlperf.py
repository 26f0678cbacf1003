"""`loadtest mlperf`: LoadGen against a spawned `monolith-rt serve`, short runs at low QPS.

The bound is loose where the verdict must be VALID (the suite shares two cores with everything
else); the impossible bound (1 us at p99) must come back INVALID, as LoadGen wrote it."""

import json
from pathlib import Path

import pytest

from loadtest.latency import populate_snapshot
from loadtest.mlperf import MlperfConfig, replay_requests, run_mlperf
from server.features import shipped_schema
from server.host.supervisor import ServeProcess

SCHEMA = shipped_schema()
CANDIDATES = 20


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    """One server whose snapshot holds a row for every FID of the replay."""
    data_dir = tmp_path_factory.mktemp("mlperf-serve")
    replay = replay_requests(SCHEMA, "ml-100k", CANDIDATES, 0)
    populate_snapshot(SCHEMA, [(replay.user_fids.ravel(), replay.item_pool)], 0)(data_dir)
    with ServeProcess(data_dir) as server:
        yield server


def _config(tmp_path: Path, url: str, **kwargs) -> MlperfConfig:
    return MlperfConfig(url=url, candidates=CANDIDATES, report_dir=str(tmp_path), run="run", **kwargs)


def test_short_server_run_is_valid(serve, tmp_path):
    result = run_mlperf(SCHEMA, _config(tmp_path, serve.grpc_url, scenario="server", target_qps=40,
                                        min_duration_s=20, p99_ms=500))
    for key in ("scenario", "target_qps", "result", "achieved_qps", "p50_ms", "p99_ms", "errors", "candidates",
                "protocol"):
        assert key in result
    assert result["result"] == "VALID", _summary(result)
    assert result["errors"] == 0 and result["protocol"] == "grpc" and result["candidates"] == CANDIDATES
    assert result["target_qps"] == 40 and result["achieved_qps"] > 0 and 0 < result["p50_ms"] <= result["p99_ms"]
    assert "Result is : VALID" in _summary(result)
    assert (tmp_path / "run" / "ranker" / "mlperf_log_detail.txt").stat().st_size > 1000
    assert json.loads((tmp_path / "run" / "result.json").read_text())["result"] == "VALID"


def test_impossible_bound_is_reported_invalid_for_both_models(serve, tmp_path):
    result = run_mlperf(SCHEMA, _config(tmp_path, serve.http_url, protocol="http", scenario="server",
                                        target_qps=40, min_duration_s=3, p99_ms=0.001, baseline=True))
    for model in ("ranker", "baseline"):
        assert result[model]["result"] == "INVALID" and "Result is : INVALID" in _summary(result, model)
        assert result[model]["performance_constraints_satisfied"] is False
        assert result[model]["errors"] == 0, result[model]["errors_by_kind"]
    assert result["result"] == "INVALID" and result["p99_ratio_vs_baseline"] > 0


def test_offline_run_completes_every_query(serve, tmp_path):
    result = run_mlperf(SCHEMA, _config(tmp_path, serve.grpc_url, scenario="offline", target_qps=100,
                                        min_duration_s=2))
    assert result["scenario"] == "offline" and result["ranker"]["scenario"] == "Offline"
    assert result["errors"] == 0 and result["achieved_qps"] > 0
    assert result["result"] in ("VALID", "INVALID")  # INVALID when the machine is slower than 100 QPS


def _summary(result: dict, model: str = "ranker") -> str:
    return (Path(result[model]["log_dir"]) / "mlperf_log_summary.txt").read_text()


def test_api_key_is_sent_and_refusals_are_counted_as_errors(tmp_path):
    key = tmp_path / "api.key"
    key.write_text("mlperf-test-key-0123456789abcdef\n")
    key.chmod(0o600)
    with ServeProcess(tmp_path / "data", extra_args=["--api-key-file", str(key)]) as server:
        for api_key, protocol, url in ((None, "grpc", server.grpc_url), ("mlperf-test-key-0123456789abcdef", "http",
                                                                          server.http_url)):
            result = run_mlperf(SCHEMA, _config(tmp_path / protocol, url, protocol=protocol, scenario="offline",
                                                target_qps=50, min_duration_s=1, api_key=api_key))
            queries = int(50 * 1 * 1.1)
            if api_key is None:  # every query refused by the front, each still completed and counted
                assert result["errors"] == queries, result["ranker"]["errors_by_kind"]
            else:
                assert result["errors"] == 0, result["ranker"]["errors_by_kind"]
