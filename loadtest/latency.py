"""``monolith-rt loadtest latency``: ranker latency under load, as perf_analyzer measures it.

Modes:
    --rate R          open loop: requests are due at Poisson (or constant)
                      arrival times; each latency runs from the request's
                      *intended* send time, so a stalled server is charged
                      for the requests queued behind the stall (no
                      coordinated omission). A pool of client threads sends.
    --concurrency C   closed loop: C clients, one request in flight each.

Latencies go into HDR histograms (1 us .. 60 s, 3 significant digits).
Triton's statistics API is read before and after each measured window, so
the server-side split (queue / compute input / infer / output) covers the
same requests.

Variants run in alternating short windows, so machine drift hits all alike:
    ranker            always
    ranker+updates    with --with-updates ROWS_PER_S: a synthetic producer
                      writes that many rows/s into the delta stream the
                      ranker applies: half of them the requests' own FIDs
                      (overwrites of rows being read), half FIDs never seen
                      (inserts: the table grows, cuckoo paths displace
                      rows); the rows/s the ranker really applied in each
                      window come from its metrics
                      (monolith_delta_rows_applied_total), beside the rate
                      asked for
A spawned server starts from a snapshot holding a row for every FID the
requests use plus ``_SNAPSHOT_EXTRA_ROWS`` others, so lookups hit real rows
in a table of realistic size.
    baseline          with --baseline: the trivial model, same tensors
Every run is bounded by --duration-s and --max-requests.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtest.histogram import LatencyHistogram
from loadtest.stack import read_metric, target_url
from server.client import InferError, RankerClient, rank_tensors
from server.features import FeatureSchema, random_fids
from updater.tools import SyntheticProducer
from server.streams import DELTAS, Streams

_THREADS_OPEN_LOOP = 16
_SNAPSHOT_EXTRA_ROWS = 200_000
_NEW_FID_SHARE = 0.5


def populate_snapshot(schema: FeatureSchema, requests, seed: int):
    """prepare(data_dir): a serving snapshot with a row for every requested FID and some more."""
    def prepare(data_dir: Path) -> None:
        from server.dense import initial_dense_state
        from server.streams.snapshots import write_snapshot
        from server.table import EmbeddingTable

        rng = np.random.default_rng(seed)
        pool = request_fids(requests)
        extra = random_fids(10, rng, _SNAPSHOT_EXTRA_ROWS)
        fids = np.unique(np.concatenate([pool, extra]))
        table = EmbeddingTable(schema.dim, capacity=int(fids.shape[0] / 0.9))
        table.upsert(fids, rng.standard_normal((fids.shape[0], schema.dim), dtype=np.float32) * 0.1, now=time.time())
        write_snapshot(data_dir, table, initial_dense_state(schema.num_fields, schema.dim, schema.dense), 0)
    return prepare


def request_fids(requests) -> np.ndarray:
    """Every FID ``requests`` ((user FIDs, item FIDs) pairs) name, without padding, sorted once."""
    pool = np.unique(np.concatenate([np.concatenate([u, i.ravel()]) for u, i in requests]))
    return pool[pool != 0]


def synthetic_requests(schema: FeatureSchema, n: int, candidates: int, seed: int):
    """``n`` encoded ranking requests of ``candidates`` random items each (users 1..2000, items 1..5000)."""
    rng = np.random.default_rng(seed)
    return [schema.encode_request({"user_id": int(u), "hour": int(h)},
                                  [{"item_id": int(i), "item_genres": ["Drama"]} for i in rng.integers(1, 5000, candidates)])
            for u, h in zip(rng.integers(1, 2000, n), rng.integers(0, 24, n))]


def arrival_schedule(rate: float, duration_s: float, arrival: str, rng) -> np.ndarray:
    """Intended send times (seconds from the window's start)."""
    n = int(rate * duration_s * 1.5) + 10
    if arrival == "constant":
        times = np.arange(n) / rate
    else:
        times = np.concatenate([[0.0], np.cumsum(rng.exponential(1.0 / rate, n - 1))])
    return times[times < duration_s]


def run_window(url: str, protocol: str, model: str, requests, duration_s: float, rate: float | None,
               concurrency: int | None, arrival: str, max_requests: int, rng,
               api_key: str | None = None) -> tuple[LatencyHistogram, Counter, float, list]:
    """One timed window of load on ``model``: open loop at ``rate`` req/s (``arrival`` "poisson" or
    "constant", latency measured from each request's intended send time, so queueing counts) or, with
    ``rate`` None, closed loop with ``concurrency`` clients; at most ``max_requests``, cycling over
    ``requests``. Returns (latency histogram, errors by kind, seconds elapsed, [(sent at s, latency ms)])."""
    histogram = LatencyHistogram()
    errors: Counter = Counter()
    timeline: list = []
    lock = threading.Lock()
    clock = {"start": 0.0, "stop_at": 0.0}
    if rate is not None:
        due = arrival_schedule(rate, duration_s, arrival, rng)[:max_requests]
        threads = _THREADS_OPEN_LOOP
    else:
        due = None
        threads = concurrency
    cursor = iter(range(len(due) if due is not None else max_requests))

    def start_clock() -> None:  # runs once, when every client is connected
        clock["start"] = time.perf_counter() + 0.01
        clock["stop_at"] = clock["start"] + duration_s

    ready = threading.Barrier(threads + 1, action=start_clock)

    def worker(k: int) -> None:
        with RankerClient(url, protocol, api_key=api_key) as client:
            client.infer(model, rank_tensors(*requests[k % len(requests)], b"lt-connect"), ["scores"])
            ready.wait()  # connections are up before the clock starts
            start, stop_at = clock["start"], clock["stop_at"]
            while True:
                with lock:
                    n = next(cursor, None)
                if n is None:
                    return
                if due is not None:
                    intended = start + due[n]
                    delay = intended - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                else:
                    intended = time.perf_counter()
                    if intended >= stop_at:
                        return
                user, items = requests[n % len(requests)]
                try:
                    client.infer(model, rank_tensors(user, items, f"lt-{k}-{n}".encode()), ["scores"])
                    latency_ms = (time.perf_counter() - intended) * 1e3
                    with lock:
                        histogram.record_ms(latency_ms)
                        timeline.append((intended - start, latency_ms))
                except InferError as exc:
                    with lock:
                        errors[str(exc).split(":")[0][:80]] += 1
                except Exception as exc:  # connection trouble and the like, counted by kind
                    with lock:
                        errors[type(exc).__name__] += 1

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    ready.wait()
    for t in pool:
        t.join()
    start = clock["start"]
    elapsed = max(time.perf_counter() - start, 1e-9)
    return histogram, errors, elapsed, timeline


def _rows_applied(metrics_url: str | None) -> float | None:
    """The ranker's monolith_delta_rows_applied_total. The server refreshes it once a second,
    so it is read after 1.5 s without feeding: every row fed before is applied and counted."""
    if metrics_url is None:
        return None
    time.sleep(1.5)
    return read_metric(metrics_url, "monolith_delta_rows_applied_total")


def _server_stats(url: str, protocol: str, model: str, api_key: str | None = None) -> dict:
    with RankerClient(url, protocol, api_key=api_key) as client:
        stats = client.statistics(model)
    infer = stats.get("inference_stats", {})  # protobuf JSON leaves out zeros
    return {"count": int(infer.get("success", {}).get("count", 0)),
            **{k: int(infer.get(k, {}).get("ns", 0)) for k in ("queue", "compute_input", "compute_infer",
                                                               "compute_output")}}


def _breakdown(before: dict, after: dict) -> dict:
    n = max(1, after["count"] - before["count"])
    return {f"{k}_us": round((after[k] - before[k]) / n / 1e3, 1)
            for k in ("queue", "compute_input", "compute_infer", "compute_output")}


@dataclass(frozen=True)
class LatencyConfig:
    """What `loadtest latency` runs; validated once, here."""

    url: str | None = None  # None: spawn `monolith-rt serve` on a temporary data dir
    protocol: str = "grpc"
    rate: float | None = None  # open loop: requests per second ...
    concurrency: int | None = None  # ... or closed loop: clients in flight
    duration_s: float = 30.0
    warmup_s: float = 3.0
    candidates: int = 100
    with_updates: float | None = None  # rows/s streamed into the ranker during the "ranker+updates" windows
    baseline: bool = False
    data_dir: str | None = None  # the --url server's data dir (for with_updates)
    arrival: str = "poisson"
    max_requests: int = 1_000_000
    rounds: int = 3
    seed: int = 0
    metrics_url: str | None = None  # the --url server's metrics (for applied rows/s)
    api_key: str | None = None

    def __post_init__(self):
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("requires exactly one of --rate and --concurrency")
        if self.protocol not in ("grpc", "http"):
            raise ValueError(f"protocol requires grpc or http, got {self.protocol!r}")
        if self.arrival not in ("poisson", "constant"):
            raise ValueError(f"arrival requires poisson or constant, got {self.arrival!r}")
        for name in ("duration_s", "candidates", "rounds", "max_requests"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} requires > 0, got {getattr(self, name)}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate requires > 0, got {self.rate}")
        if self.warmup_s < 0:
            raise ValueError(f"warmup_s requires >= 0, got {self.warmup_s}")


def run_latency(schema: FeatureSchema, config: LatencyConfig) -> dict:
    c = config
    url, protocol, rate, concurrency, arrival, max_requests = (c.url, c.protocol, c.rate, c.concurrency, c.arrival,
                                                              c.max_requests)
    duration_s, warmup_s, candidates, rounds, seed, api_key = (c.duration_s, c.warmup_s, c.candidates, c.rounds,
                                                               c.seed, c.api_key)
    with_updates, baseline, data_dir, metrics_url = c.with_updates, c.baseline, c.data_dir, c.metrics_url
    requests = synthetic_requests(schema, 500, candidates, seed)
    rng = np.random.default_rng(seed)
    with ExitStack() as stack:
        target = target_url(stack, url, protocol, "latency", prepare=populate_snapshot(schema, requests, seed))
        url, data_dir, metrics_url = target.url, target.data_dir or data_dir, target.metrics_url or metrics_url
        producer = None
        if with_updates:
            if data_dir is None:
                raise ValueError("--with-updates needs the server's --data-dir (or spawn one)")
            producer = SyntheticProducer(Streams(data_dir).path(DELTAS), with_updates, dim=schema.dim,
                                         fids=request_fids(requests), interval_s=0.05, seed=seed,
                                         new_share=_NEW_FID_SHARE)
            stack.callback(producer.close)
        variants = ["ranker"] + (["ranker+updates"] if producer else []) + (["baseline"] if baseline else [])
        print(f"[latency] warm-up {warmup_s:.0f} s", file=sys.stderr, flush=True)
        run_window(url, protocol, "ranker", requests, warmup_s, rate, concurrency, arrival, max_requests, rng, api_key)
        results = {v: {"hist": LatencyHistogram(), "errors": Counter(), "elapsed": 0.0, "timeline": [],
                       "server": []} for v in variants}
        window_s = duration_s / rounds
        for r in range(rounds):
            for variant in variants:
                print(f"[latency] round {r + 1}/{rounds}: {variant} for {window_s:.1f} s", file=sys.stderr, flush=True)
                model = "baseline" if variant == "baseline" else "ranker"
                stop = threading.Event()
                feeder = None
                if variant == "ranker+updates":
                    applied_before = _rows_applied(metrics_url)
                    feeder = threading.Thread(target=producer.run, args=(window_s + 1.0, stop))
                    feeding_since = time.perf_counter()
                    feeder.start()
                before = _server_stats(url, protocol, model, api_key)
                hist, errors, elapsed, timeline = run_window(url, protocol, model, requests, window_s, rate,
                                                          concurrency, arrival, max_requests, rng, api_key)
                after = _server_stats(url, protocol, model, api_key)
                stop.set()
                if feeder is not None:
                    feeder.join()
                    fed_s = time.perf_counter() - feeding_since
                    if applied_before is not None:  # every row the ranker applied of this window's feed
                        applied = (_rows_applied(metrics_url) - applied_before) / fed_s
                        results[variant].setdefault("applied_rows_per_s", []).append(round(applied))
                res = results[variant]
                res["hist"].add(hist)
                res["errors"].update(errors)
                res["elapsed"] += elapsed
                offset = r * window_s
                res["timeline"] += [(offset + t, lat) for t, lat in timeline]
                res["server"].append(_breakdown(before, after))
        with RankerClient(url, protocol, api_key=api_key) as client:
            delta_seq_at_end = client.rank(*requests[0], request_id=b"lt-end")[1]
        table_rows = read_metric(metrics_url, "monolith_table_rows") if metrics_url else None
    out = {"protocol": protocol, "candidates": candidates, "mode": "rate" if rate else "concurrency",
           "rate": rate, "concurrency": concurrency, "duration_s": duration_s, "delta_seq_at_end": delta_seq_at_end,
           "table_rows_at_end": table_rows}
    for variant, res in results.items():
        summary = res["hist"].summary()
        server = {k: round(float(np.mean([s[k] for s in res["server"]])), 1) for k in res["server"][0]}
        block = {**summary, "achieved_rps": round(summary["count"] / res["elapsed"], 1),
                 "errors": int(sum(res["errors"].values())), "errors_by_kind": dict(res["errors"]),
                 "server_side": server}
        out[variant] = block
    main = out["ranker"]
    out.update({k: main[k] for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "achieved_rps", "errors")})
    if "ranker+updates" in out:
        out["updates_rows_per_s"] = with_updates
        applied = results["ranker+updates"].get("applied_rows_per_s")
        out["ranker+updates"]["applied_rows_per_s_by_window"] = applied
        out["applied_rows_per_s"] = round(float(np.mean(applied))) if applied and None not in applied else None
        out["p99_ratio_vs_no_updates"] = round(out["ranker+updates"]["p99_ms"] / main["p99_ms"], 3)
    if "baseline" in out:
        out["baseline_p50_ms"] = out["baseline"]["p50_ms"]
        out["p50_ratio_vs_baseline"] = round(main["p50_ms"] / out["baseline"]["p50_ms"], 3)
    out["_timelines"] = {v: res["timeline"] for v, res in results.items()}
    return out


def write_report(result: dict, report_dir: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    timelines = result.pop("_timelines", {})
    (report_dir / "latency.json").write_text(json.dumps(result, indent=2))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for variant, points in timelines.items():
        if not points:
            continue
        t = np.array([p[0] for p in points])
        lat = np.array([p[1] for p in points])
        order = np.argsort(t)
        a.plot(t[order], lat[order], ".", markersize=1, alpha=0.4, label=variant)
        b.hist(lat, bins=200, histtype="step", log=True, label=variant)
    a.set_xlabel("seconds (measured windows, concatenated)")
    a.set_ylabel("latency from intended send, ms")
    a.set_title("latency over time")
    a.legend(markerscale=10)
    b.set_xlabel("ms")
    b.set_title("latency histogram")
    b.legend()
    fig.tight_layout()
    fig.savefig(report_dir / "latency.png", dpi=100)
    plt.close(fig)


def format_report(result: dict) -> str:
    lines = [f"latency, {result['candidates']} candidates, {result['protocol']}, "
             + (f"open loop at {result['rate']} req/s" if result["mode"] == "rate"
                else f"{result['concurrency']} concurrent clients")]
    for variant in ("ranker", "ranker+updates", "baseline"):
        if variant in result:
            r = result[variant]
            s = r["server_side"]
            lines.append(f"  {variant:<15} p50 {r['p50_ms']:7.3f}  p90 {r['p90_ms']:7.3f}  p99 {r['p99_ms']:7.3f}  "
                         f"p99.9 {r['p999_ms']:7.3f} ms  {r['achieved_rps']:8.1f} req/s  errors {r['errors']}  "
                         f"(server: queue {s['queue_us']} us, infer {s['compute_infer_us']} us)")
    if "p99_ratio_vs_no_updates" in result:
        applied = result.get("applied_rows_per_s")
        lines.append(f"  p99 with {result['updates_rows_per_s']:,.0f} rows/s of updates asked ("
                     + (f"{applied:,.0f} rows/s applied by the ranker" if applied is not None else
                        "applied rows/s unknown: give --metrics-url")
                     + f") / without: {result['p99_ratio_vs_no_updates']}")
    if "p50_ratio_vs_baseline" in result:
        lines.append(f"  ranker p50 / baseline p50: {result['p50_ratio_vs_baseline']}")
    return "\n".join(lines)
