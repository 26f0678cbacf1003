"""The LoadGen command's pure parts: its settings are checked once, and LoadGen's summary is read as written."""

import pytest

from loadtest.mlperf import MlperfConfig, parse_summary

_SERVER_SUMMARY = """================================================
MLPerf Results Summary
================================================
SUT name : PySUT
Scenario : Server
Mode     : PerformanceOnly
Completed samples per second    : 47.04
Result is : INVALID
  Performance constraints satisfied : Yes
  Min duration satisfied : Yes
  Min queries satisfied : Yes
  Early stopping satisfied: NO
Recommendations:
Early Stopping Result:
 * Run unsuccessful.
 * Processed 144 queries.

================================================
Additional Stats
================================================
Scheduled samples per second : 47.16
Min latency (ns)                : 5363579
50.00 percentile latency (ns)   : 6057236
90.00 percentile latency (ns)   : 10249323
99.00 percentile latency (ns)   : 37578492
99.90 percentile latency (ns)   : 41688122

================================================
Test Parameters Used
================================================
samples_per_query : 1
target_qps : 50
target_latency (ns): 60000000
"""

_OFFLINE_SUMMARY = """SUT name : PySUT
Scenario : Offline
Mode     : PerformanceOnly
Samples per second: 20318.6
Result is : VALID
  Min duration satisfied : Yes
50.00 percentile latency (ns)   : 14520344
99.00 percentile latency (ns)   : 16229472
target_qps : 100
"""


def test_server_summary_is_read_as_loadgen_wrote_it():
    s = parse_summary(_SERVER_SUMMARY)
    assert s["result"] == "INVALID" and s["scenario"] == "Server" and s["mode"] == "PerformanceOnly"
    assert s["achieved_qps"] == 47.04  # completed, not scheduled (47.16)
    assert s["p50_ms"] == pytest.approx(6.057236) and s["p99_ms"] == pytest.approx(37.578492)
    assert s["performance_constraints_satisfied"] and not s["early_stopping_satisfied"]
    assert s["target_qps"] == 50.0


def test_offline_summary():
    s = parse_summary(_OFFLINE_SUMMARY)
    assert s["result"] == "VALID" and s["achieved_qps"] == 20318.6 and s["p99_ms"] == pytest.approx(16.229472)
    assert "performance_constraints_satisfied" not in s


def test_a_summary_without_a_verdict_is_refused():
    with pytest.raises(ValueError, match="Result is"):
        parse_summary("SUT name : PySUT\n")


@pytest.mark.parametrize("kwargs, message", [
    ({"protocol": "udp"}, "protocol requires grpc or http"),
    ({"scenario": "single"}, "scenario requires one of"),
    ({"scenario": "offline", "find_peak": True}, "--find-peak requires --scenario server"),
    ({"target_qps": 0}, "target_qps requires > 0"),
    ({"p99_ms": -1}, "p99_ms requires > 0"),
    ({"run": "../x"}, "run requires a plain folder name"),
])
def test_settings_are_checked_once(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MlperfConfig(**kwargs)
