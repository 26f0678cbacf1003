"""``loadtest freshness --bus nats`` and ``loadtest latency --bus nats``: the scale-out stack measured.

freshness: spawns a 3-node NATS cluster, ``replicas`` servers and the trainer
(loadtest.bus_stack); after one unmeasured probe per replica (reported as
``warmup_probes_s``), probes (loadtest.freshness.probe_once) alternate replicas;
then the stack is quiesced and every replica's table compared with the trainer's.

latency: one server on the local bus and one replica on a 3-node JetStream
cluster, both started from the same populated snapshot; the same closed-loop
(or open-loop) load alternates between them in short windows, so machine drift
hits both alike; reports each distribution and the p99 ratio nats / local.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from loadtest.bus_stack import quiesce_and_compare, spawn_bus_stack
from loadtest.freshness import probe_once, summarize
from loadtest.histogram import LatencyHistogram
from server.client import RankerClient
from server.features import FeatureSchema
from server.host.supervisor import ServeProcess


def run_bus_freshness(replicas: int, probes: int, timeout_s: float, sync_interval_ms: float,
                      schema: FeatureSchema) -> dict:
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="monolith-bus-fresh-")))
        print(f"[freshness] starting a 3-node NATS cluster, {replicas} replicas and the trainer", file=sys.stderr,
              flush=True)
        bus = stack.enter_context(spawn_bus_stack(root, replicas=replicas, sync_interval_ms=sync_interval_ms,
                                                  window_s=30.0, negative_rate=0.1))
        clients = [stack.enter_context(RankerClient(s.grpc_url, "grpc")) for s in bus.servers]
        # One unmeasured probe per replica first: the trainer finds a replica's log within a second of
        # its first record (the list of logs is cached that long), so the first probe measures discovery.
        warmup = [probe_once(client, schema, -1 - i, timeout_s, tag=f"warm{i}") for i, client in enumerate(clients)]
        samples: list[list] = [[] for _ in clients]
        every = []
        for k in range(probes):
            which = k % len(clients)
            sample = probe_once(clients[which], schema, k, timeout_s, tag=f"r{which}")
            samples[which].append(sample)
            every.append(sample)
            print(f"[freshness] probe {k + 1}/{probes} on r{which}: "
                  f"{'failed' if sample is None else f'{sample:.3f} s'}", file=sys.stderr, flush=True)
        for client in clients:
            client.close()
        print("[freshness] quiescing: trainer stops, replicas catch up and are compared", file=sys.stderr, flush=True)
        compared = quiesce_and_compare(bus)
    result = {"replicas": replicas, **summarize(every), "sync_interval_ms": sync_interval_ms,
              "warmup_probes_s": [None if w is None else round(w, 3) for w in warmup],
              "per_replica": [{"replica": f"r{i}", **summarize(s)} for i, s in enumerate(samples)],
              "replicas_identical": compared["replicas_identical"], "final_seq": compared["final_seq"],
              "tables": compared["per_replica"]}
    return result


def run_bus_latency(schema: FeatureSchema, concurrency: int | None, rate: float | None, duration_s: float,
                    warmup_s: float, rounds: int, candidates: int, seed: int, protocol: str = "grpc") -> dict:
    from loadtest.latency import synthetic_requests, run_window, populate_snapshot  # one definition of the load and the data

    requests = synthetic_requests(schema, 500, candidates, seed)
    rng = np.random.default_rng(seed)
    prepare = populate_snapshot(schema, requests, seed)
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="monolith-bus-latency-")))
        bus = stack.enter_context(spawn_bus_stack(root, replicas=0, trainer=False))
        prepare(root / "local")
        prepare(root / "r0")
        print("[latency] starting a local-bus server and a JetStream replica", file=sys.stderr, flush=True)
        servers = {"local": stack.enter_context(ServeProcess(root / "local")),
                   "nats": stack.enter_context(ServeProcess(root / "r0", env=bus.replica_env("r0")))}
        urls = {name: (s.grpc_url if protocol == "grpc" else s.http_url) for name, s in servers.items()}
        for name, url in urls.items():
            print(f"[latency] warm-up {name} {warmup_s:.0f} s", file=sys.stderr, flush=True)
            run_window(url, protocol, "ranker", requests, warmup_s, rate, concurrency, "poisson", 1_000_000, rng)
        results = {name: {"hist": LatencyHistogram(), "errors": Counter(), "elapsed": 0.0, "nats_cpu_s": 0.0}
                   for name in urls}
        window_s = duration_s / rounds
        for r in range(rounds):
            for name in (("local", "nats") if r % 2 == 0 else ("nats", "local")):
                print(f"[latency] round {r + 1}/{rounds}: {name} for {window_s:.1f} s", file=sys.stderr, flush=True)
                cpu_before = bus.cluster.cpu_seconds()
                hist, errors, elapsed, _ = run_window(urls[name], protocol, "ranker", requests, window_s, rate,
                                                   concurrency, "poisson", 1_000_000, rng)
                results[name]["nats_cpu_s"] += bus.cluster.cpu_seconds() - cpu_before
                results[name]["hist"].add(hist)
                results[name]["errors"].update(errors)
                results[name]["elapsed"] += elapsed
        time.sleep(0.5)
    out = {"protocol": protocol, "candidates": candidates, "concurrency": concurrency, "rate": rate,
           "duration_s_each": duration_s, "rounds": rounds}
    for name, res in results.items():
        summary = res["hist"].summary()
        out[name] = {**summary, "achieved_rps": round(summary["count"] / res["elapsed"], 1),
                     "errors": int(sum(res["errors"].values())),
                     # CPU the 3 co-located nats-server nodes used during this variant's windows, as a share
                     # of one core: what separate NATS hosts would take off this machine
                     "nats_servers_cpu_cores": round(res["nats_cpu_s"] / res["elapsed"], 3)}
    out["p99_ratio_nats_vs_local"] = round(out["nats"]["p99_ms"] / out["local"]["p99_ms"], 3)
    out["p50_ratio_nats_vs_local"] = round(out["nats"]["p50_ms"] / out["local"]["p50_ms"], 3)
    return out


def format_bus_latency(r: dict) -> str:
    return (f"ranker latency, {r['candidates']} candidates, {r['concurrency'] or r['rate']} "
            f"{'clients' if r['concurrency'] else 'req/s'}:\n"
            f"  local bus  p50 {r['local']['p50_ms']} ms  p99 {r['local']['p99_ms']} ms  "
            f"{r['local']['achieved_rps']} req/s  errors {r['local']['errors']}\n"
            f"  JetStream  p50 {r['nats']['p50_ms']} ms  p99 {r['nats']['p99_ms']} ms  "
            f"{r['nats']['achieved_rps']} req/s  errors {r['nats']['errors']}\n"
            f"  p99 ratio JetStream / local: {r['p99_ratio_nats_vs_local']} (target <= 1.1); the 3 nats-server "
            f"nodes on this machine used {r['nats']['nats_servers_cpu_cores']} cores during the JetStream windows")
