"""``monolith-rt loadtest freshness``: time from accepted feedback to a response that reflects it.

Each probe: a never-seen item (fresh FIDs) is scored for a probe user, one
positive action for it is sent through the ``feedback`` model, and the
clock starts when that call returns (the action is durable). The ranker is
then polled with the same request until a response carries a delta_seq past
the one seen at the feedback AND a changed score for the item; the clock
stops at that response. A probe that does not get there within
``timeout_s`` counts as failed.

What the change costs, measured beside it (a spawned stack): the delta
records per second the trainer emitted while the probes ran, the rows per
record, and the ranker's p99 latency, from a background load of ``rate``
100-candidate ranking requests per second (open loop, latency from each
request's intended send time) or, without one, from the probes' own ranking
calls. ``baseline`` runs the whole measurement twice in one command, first
with the trainer emitting on its sync timer only (``--no-emit-on-train``, the
behaviour before training-triggered emission), then as configured, and
reports both and the ratio of the ranker's p99 (change / baseline).
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from server.client import RankerClient
from server.features import FeatureSchema

_POLL_S = 0.005
_LOAD_THREADS = 4
_LOAD_CANDIDATES = 100


def probe_once(client: RankerClient, schema: FeatureSchema, k: int, timeout_s: float, tag: str = "fresh",
               timestamp_s: float | None = None, latencies_ms: list | None = None) -> float | None:
    """Seconds from accepted feedback to a response reflecting it, or None. ``timestamp_s``: the time its
    ranking requests carry, for a replay on a clock of its own (default: the server's); ``latencies_ms``
    gets the latency of each polling ranking call."""
    # Only FIDs of its own (no shared hour or genre rows), so only its own
    # feedback can change its score (dense weights move once per dense interval).
    user, items = schema.encode_request({"user_id": f"{tag}-user-{k}-{int(time.time() * 1e6)}"},
                                        [{"item_id": f"{tag}-item-{k}-{int(time.time() * 1e6)}"}])
    before, _ = client.rank(user, items, request_id=f"{tag}-{k}-0".encode(), timestamp_s=timestamp_s)
    rid = f"{tag}-{k}".encode()
    _, seq_at_feedback = client.rank(user, items, request_id=rid, timestamp_s=timestamp_s)
    client.feedback(rid, items[:1, 0], [1.0])
    accepted = time.monotonic()
    while time.monotonic() - accepted < timeout_s:
        sent = time.perf_counter()
        scores, seq = client.rank(user, items, request_id=f"{tag}-{k}-poll".encode(), timestamp_s=timestamp_s)
        if latencies_ms is not None:
            latencies_ms.append((time.perf_counter() - sent) * 1e3)
        if seq > seq_at_feedback and scores[0] != before[0]:
            return time.monotonic() - accepted
        time.sleep(_POLL_S)
    return None


def summarize(samples: list[float | None]) -> dict:
    done = np.array([s for s in samples if s is not None])
    pct = (lambda q: round(float(np.percentile(done, q)), 3)) if done.size else (lambda q: None)
    return {"probes": len(samples), "failed": int(sum(s is None for s in samples)), "p50_s": pct(50),
            "p99_s": pct(99), "max_s": round(float(done.max()), 3) if done.size else None}


class BackgroundLoad:
    """Ranking requests of 100 candidates at ``rate`` req/s (open loop, constant arrivals) on a few threads
    until ``stop``; ``latencies_ms`` from each request's intended send time (queueing counts), ``errors``."""

    def __init__(self, url: str, protocol: str, rate: float, schema: FeatureSchema, api_key: str | None = None):
        from loadtest.latency import synthetic_requests

        self._requests = synthetic_requests(schema, 256, _LOAD_CANDIDATES, seed=23)
        self._url, self._protocol, self._api_key, self.rate = url, protocol, api_key, rate
        self.latencies_ms: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._next = 0
        self._lock = threading.Lock()
        self._start = time.perf_counter()
        self._threads = [threading.Thread(target=self._worker, args=(k,), daemon=True) for k in range(_LOAD_THREADS)]

    def __enter__(self) -> "BackgroundLoad":
        self._start = time.perf_counter()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _worker(self, k: int) -> None:
        with RankerClient(self._url, self._protocol, api_key=self._api_key) as client:
            while not self._stop.is_set():
                with self._lock:
                    n, self._next = self._next, self._next + 1
                intended = self._start + n / self.rate
                if intended > time.perf_counter() and self._stop.wait(intended - time.perf_counter()):
                    return
                user, items = self._requests[n % len(self._requests)]
                try:
                    client.rank(user, items, request_id=f"load-{k}-{n}".encode())
                except Exception:  # counted; the probes are what is measured
                    self.errors += 1
                    continue
                self.latencies_ms.append((time.perf_counter() - intended) * 1e3)


def delta_rates(data_dir: Path, since_s: float, until_s: float) -> dict:
    """Sparse delta records the trainer emitted between two wall-clock times: per second, and rows per record."""
    from server.streams import Streams
    from server.streams.deltas import SPARSE

    records = rows = 0
    reader = Streams(data_dir).open_delta_reader(0)
    try:
        while batch := reader.read(max_records=256):
            for record in batch:
                if record.kind == SPARSE and since_s <= record.created_s <= until_s:
                    records += 1
                    rows += record.fids.shape[0]
    finally:
        reader.close()
    seconds = max(until_s - since_s, 1e-9)
    return {"delta_records_per_s": round(records / seconds, 2),
            "rows_per_record": round(rows / records, 1) if records else None}


def _p99_ms(latencies_ms: list[float]) -> float | None:
    return round(float(np.percentile(latencies_ms, 99)), 2) if latencies_ms else None


def _measure(url: str | None, protocol: str, probes: int, timeout_s: float, sync_interval_ms: float,
             schema: FeatureSchema, api_key: str | None, rate: float, trainer_args: tuple[str, ...],
             label: str) -> dict:
    from loadtest.stack import spawn_stack, wait_trainer_ready

    data_dir = None
    with ExitStack() as stack:
        if url is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="monolith-fresh-")))
            print(f"[freshness] starting tritonserver and the online trainer{label}", file=sys.stderr, flush=True)
            server, trainer = stack.enter_context(spawn_stack(data_dir, sync_interval_ms=sync_interval_ms,
                                                              trainer_args=trainer_args))
            wait_trainer_ready(server.data_dir, trainer)
            url = server.grpc_url if protocol == "grpc" else server.http_url
        client = stack.enter_context(RankerClient(url, protocol, api_key=api_key))
        load = stack.enter_context(BackgroundLoad(url, protocol, rate, schema, api_key)) if rate > 0 else None
        samples, probe_latencies_ms = [], []
        started = time.time()
        for k in range(probes):
            samples.append(probe_once(client, schema, k, timeout_s, latencies_ms=probe_latencies_ms))
            print(f"[freshness{label}] probe {k + 1}/{probes}: "
                  f"{'failed' if samples[-1] is None else f'{samples[-1]:.3f} s'}", file=sys.stderr, flush=True)
        ended = time.time()
        if load is not None:
            load.__exit__(None, None, None)
        result = summarize(samples)
        if load is not None:
            result.update(rate=rate, load_requests=len(load.latencies_ms), load_errors=load.errors,
                          ranker_p50_ms=round(float(np.percentile(load.latencies_ms, 50)), 2)
                          if load.latencies_ms else None, ranker_p99_ms=_p99_ms(load.latencies_ms))
        else:
            result["ranker_p99_ms"] = _p99_ms(probe_latencies_ms)  # the probes' own ranking calls
        if data_dir is not None:
            result.update(delta_rates(data_dir, started, ended))
    return result


def run_freshness(url: str | None, protocol: str, probes: int, timeout_s: float, sync_interval_ms: float,
                  schema: FeatureSchema, api_key: str | None = None, rate: float = 0.0,
                  baseline: bool = False, trainer_args: tuple[str, ...] = ()) -> dict:
    """The freshness figures (module docstring); with ``baseline`` (a spawned stack only), the same measured
    first with timer-only emission under "baseline", and ``ranker_p99_ratio`` (this / baseline)."""
    if baseline and url is not None:
        raise ValueError("--baseline requires a spawned stack (no --url): it restarts the trainer in each mode")
    before = None
    if baseline:
        before = _measure(None, protocol, probes, timeout_s, sync_interval_ms, schema, api_key, rate,
                          (*trainer_args, "--no-emit-on-train"), " (baseline: timer only)")
    result = _measure(url, protocol, probes, timeout_s, sync_interval_ms, schema, api_key, rate, trainer_args, "")
    result["sync_interval_ms"] = sync_interval_ms
    if before is not None:
        result["baseline"] = before
        if result.get("ranker_p99_ms") and before.get("ranker_p99_ms"):
            result["ranker_p99_ratio"] = round(result["ranker_p99_ms"] / before["ranker_p99_ms"], 3)
    return result
