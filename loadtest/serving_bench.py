"""``monolith-rt bench serving``: ranker latency against the trivial-model floor, and the front's cost.

Sends one request at a time (closed loop, one client thread), round-robin
over three series with the same candidate tensor, so machine drift hits all
alike:
    ranker     the ranker through the front (what callers get)
    baseline   the baseline model through the front: the floor for this
               request contract (Triton, the Python backend, the client,
               the front), with no ranking work
    direct     the ranker on tritonserver's own private port, skipping the
               front: ``ranker - direct`` is what the front's checks cost
A spawned server (no --url) gives all three; with --url, ``direct`` needs
--direct-url (tritonserver's own port, which `monolith-rt serve` prints).
"""

from __future__ import annotations

import sys
import tempfile
import time
from contextlib import ExitStack

import numpy as np

from server.client import RankerClient
from server.features import shipped_schema

_WARMUP = 50


def _percentiles(samples_ms: list[float]) -> dict:
    values = [float(v) for v in np.percentile(np.asarray(samples_ms), [50, 90, 99])]
    return {"p50_ms": round(values[0], 3), "p90_ms": round(values[1], 3), "p99_ms": round(values[2], 3)}


def bench_serving(url: str | None, protocol: str, candidates: int, requests: int, seed: int = 0,
                  direct_url: str | None = None, api_key: str | None = None) -> dict:
    from server.host.supervisor import ServeProcess

    schema = shipped_schema()
    rng = np.random.default_rng(seed)
    with ExitStack() as stack:
        if url is None:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="monolith-bench-serving-"))
            print("[bench serving] starting monolith-rt serve", file=sys.stderr, flush=True)
            serve = stack.enter_context(ServeProcess(data_dir))
            url = serve.grpc_url if protocol == "grpc" else serve.http_url
            direct_url = serve.triton_grpc_url if protocol == "grpc" else serve.triton_http_url
        clients = {"ranker": stack.enter_context(RankerClient(url, protocol, api_key=api_key))}
        if direct_url:
            clients["direct"] = stack.enter_context(RankerClient(direct_url, protocol))
        users = rng.integers(1, 1000, requests + _WARMUP)
        item_ids = rng.integers(1, 2000, (requests + _WARMUP, candidates))
        encoded = [
            schema.encode_request({"user_id": int(u), "hour": 12}, [{"item_id": int(i)} for i in row])
            for u, row in zip(users, item_ids)
        ]
        series = [("ranker", clients["ranker"], "ranker"), ("baseline", clients["ranker"], "baseline")]
        if "direct" in clients:
            series.append(("direct", clients["direct"], "ranker"))
        samples: dict[str, list[float]] = {name: [] for name, _, _ in series}
        print(f"[bench serving] {requests} x {len(series)} requests, {candidates} candidates, {protocol}",
              file=sys.stderr)
        for n, (user, items) in enumerate(encoded):
            for name, client, model in series:
                t0 = time.perf_counter()
                client.rank(user, items, request_id=f"bench-{n}".encode(), model=model)
                if n >= _WARMUP:
                    samples[name].append((time.perf_counter() - t0) * 1e3)
    result = {"protocol": protocol, "candidates": candidates, "requests": requests,
              **{name: _percentiles(values) for name, values in samples.items()}}
    result["p50_ratio_vs_baseline"] = round(result["ranker"]["p50_ms"] / result["baseline"]["p50_ms"], 2)
    if "direct" in result:
        result["front_added_p50_ms"] = round(result["ranker"]["p50_ms"] - result["direct"]["p50_ms"], 3)
        result["front_added_p99_ms"] = round(result["ranker"]["p99_ms"] - result["direct"]["p99_ms"], 3)
    return result


def format_serving_report(result: dict) -> str:
    lines = [f"serving latency, {result['requests']} requests each, {result['candidates']} candidates, "
             f"{result['protocol']}, one client thread"]
    for name, label in (("ranker", "ranker (front)"), ("baseline", "baseline (front)"), ("direct", "ranker (direct)")):
        if name in result:
            r = result[name]
            lines.append(f"  {label:17s} p50 {r['p50_ms']:7.3f} ms   p90 {r['p90_ms']:7.3f} ms   "
                         f"p99 {r['p99_ms']:7.3f} ms")
    lines.append(f"  ranker p50 / baseline p50 = {result['p50_ratio_vs_baseline']}")
    if "front_added_p50_ms" in result:
        lines.append(f"  the front adds p50 {result['front_added_p50_ms']:.3f} ms, p99 {result['front_added_p99_ms']:.3f} ms "
                     "(ranker through the front minus ranker direct)")
    return "\n".join(lines)
