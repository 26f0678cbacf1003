"""The front's and the supervisor's Prometheus metrics, appended to Triton's on the metrics port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

REFUSAL_REASONS = ("invalid", "too_large", "unauthorized", "not_exposed", "malformed", "too_many_connections",
                   "slow_request")


class _Collector:
    def __init__(self, front_stats, supervisor_stats):
        self._front, self._supervisor = front_stats, supervisor_stats

    def collect(self):
        refused = CounterMetricFamily("monolith_front_refused", "Requests the front refused before Triton, by reason",
                                      labels=["reason"])
        for reason in REFUSAL_REASONS:
            refused.add_metric([reason], self._front.refused.get(reason, 0))
        yield refused
        yield GaugeMetricFamily("monolith_front_open_connections", "HTTP connections callers hold open on the front",
                                value=self._front.open_connections)
        yield CounterMetricFamily("monolith_front_forwarded", "Requests the front forwarded to tritonserver",
                                  value=self._front.forwarded)
        yield CounterMetricFamily("monolith_front_upstream_errors",
                                  "Requests answered 503/UNAVAILABLE because tritonserver was unreachable",
                                  value=self._front.upstream_errors)
        yield CounterMetricFamily("monolith_server_restarts", "Times the supervisor restarted tritonserver",
                                  value=self._supervisor.restarts)
        yield CounterMetricFamily("monolith_server_stub_exits",
                                  "Model stubs that exited while tritonserver ran (each restarts tritonserver)",
                                  value=self._supervisor.stub_exits)
        code = self._supervisor.last_exit_code
        yield GaugeMetricFamily("monolith_server_last_exit_code",
                                "Exit code of tritonserver's last unexpected exit (negative: signal; 0: none yet)",
                                value=0 if code is None else code)


def exposition(front_stats, supervisor_stats) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(front_stats, supervisor_stats))
    return generate_latest(registry)
