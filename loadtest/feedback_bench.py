"""``monolith-rt bench feedback``: acknowledged feedback per second, many clients against one.

Each client is a thread with its own gRPC connection sending feedback
requests (one click each, a new request id every time) in a closed loop; an
acknowledgement means the action is on disk (the feedback model answers
only after the fsync that covers it). The same server is measured with one
client (the baseline: every fsync covers one request) and with
``clients`` clients (Triton batches the requests that arrive while an fsync
is under way, so one fsync covers many), in alternating windows of the same
run. Figures per variant: ``acks_per_s``, ``p50_ms``, ``p99_ms`` (client
side, per request), ``errors``. The floor, in the same rounds: the same
``clients`` sending the smallest ranking request to the trivial ``baseline``
model, which does no work and writes nothing (``baseline_rps``,
``baseline_p99_ms``); ``acks_vs_baseline`` is what durability leaves of it.
"""

from __future__ import annotations

import contextlib
import threading
import time


from loadtest.histogram import LatencyHistogram
from loadtest.stack import target_url
from server.client import RankerClient
from server.features import fid, shipped_schema

_USER, _ITEMS = shipped_schema().encode_request({"user_id": 1}, [{"item_id": 1}])


def _window(url: str, clients: int, duration_s: float, tag: str,
            model: str = "feedback") -> tuple[int, int, LatencyHistogram, float]:
    """``clients`` closed loops for ``duration_s`` against ``model`` ("feedback": one durable click per
    request; "baseline": the smallest ranking request, the floor). Returns (answers, errors, latencies, s)."""
    histogram = LatencyHistogram()
    counts = {"acks": 0, "errors": 0}
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(c: int) -> None:
        with RankerClient(url, "grpc", timeout_s=10.0) as conn:
            def send(k: int) -> None:
                if model == "baseline":
                    conn.rank(_USER, _ITEMS, request_id=f"{tag}-{c}-{k}".encode(), model="baseline")
                else:
                    conn.feedback(f"{tag}-{c}-{k}".encode(), [fid(10, k % 1000 + 1)], [1.0])

            send(-1)  # connected and warm before the clock starts
            ready.wait()
            k, acks, errors, latencies = 0, 0, 0, []
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                try:
                    send(k)
                    acks += 1
                    latencies.append((time.perf_counter() - t0) * 1e3)
                except Exception:
                    errors += 1
                k += 1
        with lock:
            counts["acks"] += acks
            counts["errors"] += errors
            for ms in latencies:
                histogram.record_ms(ms)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 3600
    ready.wait()
    started = time.perf_counter()
    stop_at[0] = started + duration_s
    for t in threads:
        t.join()
    return counts["acks"], counts["errors"], histogram, time.perf_counter() - started


def bench_feedback(url: str | None, clients: int, duration_s: float, rounds: int) -> dict:
    with contextlib.ExitStack() as stack:
        url = target_url(stack, url, "grpc", "bench-feedback").url
        variants = [(1, "feedback"), (clients, "feedback"), (clients, "baseline")]
        totals = {v: {"acks": 0, "errors": 0, "seconds": 0.0, "hist": LatencyHistogram()} for v in variants}
        for r in range(rounds):
            for n, model in variants:
                acks, errors, hist, seconds = _window(url, n, duration_s, f"r{r}c{n}{model[0]}", model)
                t = totals[(n, model)]
                t["acks"] += acks
                t["errors"] += errors
                t["seconds"] += seconds
                t["hist"].add(hist)

    def figures(n: int, model: str = "feedback") -> dict:
        t = totals[(n, model)]
        summary = t["hist"].summary()
        return {"clients": n, "acks_per_s": round(t["acks"] / t["seconds"], 1), "p50_ms": summary["p50_ms"],
                "p99_ms": summary["p99_ms"], "acks": t["acks"], "errors": t["errors"]}

    many, one, floor = figures(clients), figures(1), figures(clients, "baseline")
    return {**many, "one_client": one, "speedup_vs_one_client": round(many["acks_per_s"] / one["acks_per_s"], 2),
            "baseline_rps": floor["acks_per_s"], "baseline_p99_ms": floor["p99_ms"],
            "baseline_errors": floor["errors"], "acks_vs_baseline": round(many["acks_per_s"] / floor["acks_per_s"], 3),
            "window_s": duration_s, "rounds": rounds}


def format_feedback_report(result: dict) -> str:
    one = result["one_client"]
    return (f"feedback acknowledgements (durable), {result['rounds']} x {result['window_s']} s windows each\n"
            f"  {result['clients']} clients: {result['acks_per_s']:,.0f} acks/s, p50 {result['p50_ms']} ms, "
            f"p99 {result['p99_ms']} ms, {result['errors']} errors\n"
            f"  1 client:  {one['acks_per_s']:,.0f} acks/s, p50 {one['p50_ms']} ms, p99 {one['p99_ms']} ms, "
            f"{one['errors']} errors\n"
            f"  speed-up {result['speedup_vs_one_client']}x\n"
            f"  baseline (trivial model, {result['clients']} clients, same rounds): {result['baseline_rps']:,.0f} req/s, "
            f"p99 {result['baseline_p99_ms']} ms; acks / baseline = {result['acks_vs_baseline']}")
