"""The operators' kit against the real stack: `monolith-rt serve` and `monolith-rt train online`
with some traffic over both fronts; every metric (and fixed label value) the dashboard and the
alert rules use must be exported on the metrics port or in the trainer's metrics files, so a
rename can never silently blind an operator."""

import urllib.request

import numpy as np

from loadtest.stack import spawn_stack, wait_trainer_ready
from server.client import RankerClient
from server.features import shipped_schema
from server.ops.kit import exported_series, load_dashboard, load_rules, missing, recorded_names, used_metrics
from tests.waiting import wait_until

SCHEMA = shipped_schema()
TRAINER_FILES = ("joiner/metrics.prom", "guard/metrics.prom")  # what a node-exporter textfile collector exports


def _traffic(url: str, protocol: str, requests: int) -> None:
    rng = np.random.default_rng(0)
    with RankerClient(url, protocol) as client:
        for n in range(requests):
            user, items = SCHEMA.encode_request({"user_id": int(rng.integers(1, 50)), "hour": 3},
                                                [{"item_id": int(i)} for i in rng.integers(1, 200, 5)])
            rid = f"ops-{protocol}-{n}".encode()
            client.rank(user, items, request_id=rid)
            if n % 3 == 0:
                client.feedback(rid, items[:1, 0], [1.0])


def _scrape(url: str) -> str:
    return urllib.request.urlopen(url, timeout=10).read().decode()


def test_every_metric_the_kit_uses_is_exported(tmp_path):
    rules, dashboard = load_rules(), load_dashboard()
    uses = used_metrics(rules, dashboard)
    data_dir = tmp_path / "data"
    with spawn_stack(data_dir, sync_interval_ms=200, window_s=1.0) as (server, trainer):
        wait_trainer_ready(data_dir, trainer)
        _traffic(server.grpc_url, "grpc", 40)
        _traffic(server.http_url, "http", 40)
        wait_until(lambda: all((data_dir / f).is_file() for f in TRAINER_FILES), "the trainer's metrics files",
                   timeout_s=30, poll_s=0.2)
        wait_until(lambda: "monolith_requests_scored_total" in _scrape(server.metrics_url)
                   and 'counter="joined"} 0.0' not in (data_dir / TRAINER_FILES[0]).read_text(),
                   "scored requests and joined examples in the metrics", timeout_s=30, poll_s=0.5)
        texts = [_scrape(server.metrics_url)] + [(data_dir / f).read_text() for f in TRAINER_FILES]
    series = exported_series(*texts)
    problems = missing(uses, series, recorded_names(rules))
    assert not problems, "the kit uses what the stack does not export:\n" + "\n".join(problems)
    assert len({u.name for u in uses}) > 30
