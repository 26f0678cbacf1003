"""``monolith-rt bench batching``: does Triton's dynamic batching help the ranker here?

Two servers run side by side on one machine: A with the shipped config
(max_batch_size 16, dynamic batching with no added delay, ragged inputs:
Triton hands execute() every request queued while the instance was busy,
and the ranker scores them in one lookup + one forward), B with the same
model at max_batch_size 0 (one request per execute). The same closed-loop load (C client threads,
one request in flight each) alternates between A and B in short windows so
machine drift hits both alike; throughput and latency are reported per side.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from server.client import RankerClient
from server.features import shipped_schema
from server.host.launcher import DEFAULT_MODEL_REPOSITORY, TritonServer


def unbatched_repository(target: Path) -> Path:
    """A copy of the model repository whose ranker takes one request per execute."""
    shutil.copytree(DEFAULT_MODEL_REPOSITORY, target, ignore=shutil.ignore_patterns("__pycache__"))
    config_path = target / "ranker" / "config.pbtxt"
    config = re.sub(r"max_batch_size: \d+\ndynamic_batching \{[^}]*\}\n", "max_batch_size: 0\n",
                    config_path.read_text())
    config_path.write_text(config.replace("\n    allow_ragged_batch: true", ""))
    return target


def _load(url: str, batched: bool, requests, duration_s: float, threads: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def worker(k: int) -> None:
        with RankerClient(url, "grpc") as client:
            n = k
            while time.monotonic() < stop_at:
                user, items = requests[n % len(requests)]
                tensors = {"user_fids": user, "item_fids": items,
                           "request_id": np.array([f"b{k}-{n}".encode()], dtype=np.object_)}
                if batched:
                    tensors = {name: value[None] for name, value in tensors.items()}
                t0 = time.perf_counter()
                client.infer("ranker", tensors, ["scores"])
                elapsed = (time.perf_counter() - t0) * 1e3
                with lock:
                    latencies.append(elapsed)
                n += threads

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    t0 = time.monotonic()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return latencies, time.monotonic() - t0


def bench_batching(concurrency: int, candidates: int, window_s: float, rounds: int) -> dict:
    schema = shipped_schema()
    rng = np.random.default_rng(0)
    requests = [schema.encode_request({"user_id": int(u)}, [{"item_id": int(i)} for i in rng.integers(1, 3000, candidates)])
                for u in rng.integers(1, 1000, 200)]
    results = {"unbatched": ([], 0.0), "dynamic": ([], 0.0)}
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="monolith-batching-")))
        print("[bench batching] starting two servers", file=sys.stderr, flush=True)
        batched = stack.enter_context(TritonServer(work / "a"))
        plain = stack.enter_context(TritonServer(work / "b", model_repository=unbatched_repository(work / "repo")))
        for name, server, flag in (("unbatched", plain, False), ("dynamic", batched, True)):
            _load(server.grpc_url, flag, requests, 1.0, concurrency)  # warm-up
        for r in range(rounds):
            for name, server, flag in (("unbatched", plain, False), ("dynamic", batched, True)):
                print(f"[bench batching] round {r + 1}/{rounds}: {name}", file=sys.stderr, flush=True)
                lat, elapsed = _load(server.grpc_url, flag, requests, window_s, concurrency)
                results[name][0].extend(lat)
                results[name] = (results[name][0], results[name][1] + elapsed)
    out = {"concurrency": concurrency, "candidates": candidates}
    for name, (lat, elapsed) in results.items():
        p = np.percentile(lat, [50, 99])
        out[name] = {"rps": round(len(lat) / elapsed, 1), "p50_ms": round(float(p[0]), 3), "p99_ms": round(float(p[1]), 3),
                     "requests": len(lat)}
    out["rps_ratio_dynamic_vs_unbatched"] = round(out["dynamic"]["rps"] / out["unbatched"]["rps"], 2)
    return out
