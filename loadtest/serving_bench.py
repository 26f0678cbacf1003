"""``monolith-rt bench serving``: ranker latency against the trivial-model floor, same server, same run.

Sends one request at a time (closed loop, one client thread), alternating a
ranker request and a baseline request with the same candidate tensor, so
machine drift hits both alike. Reports p50/p90/p99 of each and the ratio.
The baseline model (model_repository/baseline) takes the ranker's tensors and
returns zeros: its latency is what Triton, the Python backend and the client
cost for this request contract, with no ranking work.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack

import numpy as np

from server.client import RankerClient
from server.features import load_schema
from loadtest.stack import target_url
from server.launcher import DEFAULT_MODEL_REPOSITORY

_WARMUP = 50


def _percentiles(samples_ms: list[float]) -> dict:
    values = [float(v) for v in np.percentile(np.asarray(samples_ms), [50, 90, 99])]
    return {"p50_ms": round(values[0], 3), "p90_ms": round(values[1], 3), "p99_ms": round(values[2], 3)}


def bench_serving(url: str | None, protocol: str, candidates: int, requests: int, seed: int = 0) -> dict:
    schema = load_schema(DEFAULT_MODEL_REPOSITORY / "ranker" / "feature_schema.json")
    rng = np.random.default_rng(seed)
    with ExitStack() as stack:
        url = target_url(stack, url, protocol, "bench-serving").url
        client = stack.enter_context(RankerClient(url, protocol))
        users = rng.integers(1, 1000, requests + _WARMUP)
        item_ids = rng.integers(1, 2000, (requests + _WARMUP, candidates))
        encoded = [
            schema.encode_request({"user_id": int(u), "hour": 12}, [{"item_id": int(i)} for i in row])
            for u, row in zip(users, item_ids)
        ]
        ranker_ms, baseline_ms = [], []
        print(f"[bench serving] {requests} x 2 requests, {candidates} candidates, {protocol}", file=sys.stderr)
        for n, (user, items) in enumerate(encoded):
            t0 = time.perf_counter()
            client.rank(user, items, request_id=f"bench-{n}".encode())
            t1 = time.perf_counter()
            client.rank(user, items, request_id=f"bench-{n}".encode(), model="baseline")
            t2 = time.perf_counter()
            if n >= _WARMUP:
                ranker_ms.append((t1 - t0) * 1e3)
                baseline_ms.append((t2 - t1) * 1e3)
    ranker = _percentiles(ranker_ms)
    baseline = _percentiles(baseline_ms)
    return {
        "protocol": protocol,
        "candidates": candidates,
        "requests": requests,
        "ranker": ranker,
        "baseline": baseline,
        "p50_ratio_vs_baseline": round(ranker["p50_ms"] / baseline["p50_ms"], 2),
    }


def format_serving_report(result: dict) -> str:
    r, b = result["ranker"], result["baseline"]
    return "\n".join([
        f"serving latency, {result['requests']} requests each, {result['candidates']} candidates, "
        f"{result['protocol']}, one client thread",
        f"  ranker    p50 {r['p50_ms']:7.3f} ms   p90 {r['p90_ms']:7.3f} ms   p99 {r['p99_ms']:7.3f} ms",
        f"  baseline  p50 {b['p50_ms']:7.3f} ms   p90 {b['p90_ms']:7.3f} ms   p99 {b['p99_ms']:7.3f} ms",
        f"  ranker p50 / baseline p50 = {result['p50_ratio_vs_baseline']}",
    ])
