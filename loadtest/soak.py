"""``monolith-rt loadtest soak``: the whole stack for minutes, watching for leaks and drift.

A spawned server and online trainer take ranking requests and feedback
from a few clients. Request times run on a simulated clock, one day per
wall second, over a sliding window of user and item IDs, so new IDs keep
arriving and the schema's 30-day TTLs expire old ones within the run: the
tables must stay bounded by expiry. Every ``sample_s`` the soak records
RSS of the server (tritonserver and its model stubs) and of the trainer,
the ranker's table size, p99 latency of the last window, a freshness
probe and the bytes of the data directory (the trainer runs retention after
every snapshot, every 10 s here, with 1 MiB segments and 10 s of log
retention). Growth figures compare the end with the end of warm-up (the
first 20% of the run).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from loadtest.freshness import probe_once
from loadtest.histogram import LatencyHistogram
from loadtest.stack import spawn_stack, wait_trainer_ready
from server.client import RankerClient
from server.features import FeatureSchema
from server.procs import processes

_SIM_SECONDS_PER_S = 86_400.0
_IDS_PER_S = 200
_ID_WINDOW = 2_000
# Retention at soak scale: small segments, frequent snapshots, short log
# retention, so that what retention deletes shows within minutes.
_SEGMENT_BYTES = 1 << 20
_SNAPSHOT_S = 10.0
_LOG_RETENTION_S = 10.0


def tree_rss_bytes(pid: int) -> int:
    """RSS of a process and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for child, _, parent, _ in processes():
        children.setdefault(parent, []).append(child)
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        stack += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _table_rows(metrics_url: str) -> int:
    for line in urllib.request.urlopen(metrics_url, timeout=5).read().decode().splitlines():
        if line.startswith("monolith_table_rows{") and 'model="ranker"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return -1


def disk_bytes(directory: str | Path) -> int:
    """Bytes of every file under ``directory``."""
    total = 0
    for path in Path(directory).rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:  # deleted while we looked
            pass
    return total


@contextmanager
def _environment(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_soak(schema: FeatureSchema, minutes: float, clients: int = 2, sample_s: float = 10.0,
             data_dir: str | None = None) -> dict:
    duration_s = minutes * 60
    with tempfile.TemporaryDirectory(prefix="monolith-soak-") as tmp, \
            _environment(MONOLITH_SEGMENT_BYTES=str(_SEGMENT_BYTES)):
        tmp = data_dir or tmp
        # A simulated clock (a day per second, from 2023 on): the server's time window is open both ways
        # and the trainer's clock may pass its own (server.clock); each 5 s expiry pass removes about an
        # eighth of a table that turns over every ~40 s, under the expiry breaker's 20%.
        with spawn_stack(tmp, window_s=2.0, negative_rate=0.2,
                         trainer_args=("--expiry-interval-s", "5", "--snapshot-interval-s", str(_SNAPSHOT_S),
                                       "--log-retention-s", str(_LOG_RETENTION_S), "--max-time-ahead-s", "inf"),
                         serve_args=("--max-time-ahead-s", "inf", "--max-time-behind-s", "inf")) as (server, trainer):
            wait_trainer_ready(server.data_dir, trainer)
            disk_at_start = disk_bytes(server.data_dir)
            started = time.monotonic()
            sim_start = 1.7e9
            stop = threading.Event()
            lock = threading.Lock()
            window_hist = LatencyHistogram()
            total = {"requests": 0, "errors": 0, "last_error": ""}

            def client_loop(k: int) -> None:
                rng = np.random.default_rng(k)
                with RankerClient(server.grpc_url, "grpc") as client:
                    n = 0
                    while not stop.is_set():
                        elapsed = time.monotonic() - started
                        base = int(elapsed * _IDS_PER_S)
                        user_id = int(rng.integers(base, base + _ID_WINDOW))
                        item_ids = rng.integers(base, base + _ID_WINDOW, 10)
                        user, items = schema.encode_request({"user_id": user_id, "hour": int(elapsed) % 24},
                                                            [{"item_id": int(i)} for i in item_ids])
                        rid = f"soak-{k}-{n}".encode()
                        n += 1
                        t0 = time.perf_counter()
                        try:
                            client.rank(user, items, request_id=rid,
                                        timestamp_s=sim_start + elapsed * _SIM_SECONDS_PER_S)
                            latency = (time.perf_counter() - t0) * 1e3
                            if rng.random() < 0.3:
                                client.feedback(rid, items[:1, 0], [1.0])
                            with lock:
                                window_hist.record_ms(latency)
                                total["requests"] += 1
                        except Exception as exc:  # counted, the soak goes on
                            with lock:
                                total["errors"] += 1
                                total["last_error"] = str(exc)[:200]

            threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
            for t in threads:
                t.start()
            samples = []
            try:
                with RankerClient(server.grpc_url, "grpc") as probe_client:
                    k = 0
                    while time.monotonic() - started < duration_s:
                        time.sleep(max(0.0, min(sample_s, duration_s - (time.monotonic() - started))))
                        fresh = probe_once(probe_client, schema, k, timeout_s=10.0, tag="soak-probe",
                                           timestamp_s=sim_start + (time.monotonic() - started) * _SIM_SECONDS_PER_S)
                        k += 1
                        with lock:
                            p99 = window_hist.percentile_ms(99) if window_hist.count else None
                            window_hist = LatencyHistogram()
                        sample = {"t_s": round(time.monotonic() - started, 1),
                                  "server_rss_mb": round(tree_rss_bytes(server.process.pid) / 2**20, 1),
                                  "trainer_rss_mb": round(tree_rss_bytes(trainer.pid) / 2**20, 1),
                                  "table_rows": _table_rows(server.metrics_url), "p99_ms": p99,
                                  "disk_bytes": disk_bytes(server.data_dir),
                                  "freshness_s": None if fresh is None else round(fresh, 3),
                                  "requests": total["requests"]}
                        samples.append(sample)
                        if trainer.poll() is not None:
                            total["errors"] += 1
                            total["last_error"] = f"trainer exited with code {trainer.returncode}"
                            break
                        print(f"[soak] {sample}", file=sys.stderr, flush=True)
            finally:
                stop.set()
                for t in threads:
                    t.join()
    if not samples:
        raise RuntimeError(f"soak ended before its first sample: {total['last_error']}")
    warm = next((s for s in samples if s["t_s"] >= 0.2 * duration_s), samples[0])
    end = samples[-1]

    def growth(key: str) -> float | None:
        return round(end[key] / warm[key] - 1, 4) if warm[key] > 0 else None

    fresh = [s["freshness_s"] for s in samples if s["freshness_s"] is not None]
    return {
        "minutes": minutes,
        "requests": total["requests"],
        "errors": total["errors"],
        "last_error": total["last_error"],
        "server_rss_growth": growth("server_rss_mb"),
        "trainer_rss_growth": growth("trainer_rss_mb"),
        "server_rss_mb": {"start": samples[0]["server_rss_mb"], "warm": warm["server_rss_mb"],
                          "end": end["server_rss_mb"]},
        "trainer_rss_mb": {"start": samples[0]["trainer_rss_mb"], "warm": warm["trainer_rss_mb"],
                           "end": end["trainer_rss_mb"]},
        "table_rows": {"warm": warm["table_rows"], "end": end["table_rows"],
                       "max": max(s["table_rows"] for s in samples)},
        "disk_bytes": {"start": disk_at_start, "warm": warm["disk_bytes"], "end": end["disk_bytes"],
                       "max": max(s["disk_bytes"] for s in samples)},
        "disk_growth": growth("disk_bytes"),
        "freshness_failed": sum(s["freshness_s"] is None for s in samples),
        "freshness_p50_s": round(float(np.median(fresh)), 3) if fresh else None,
        "samples": samples,
    }
