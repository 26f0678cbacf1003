"""``monolith-rt demo``, ``loadtest latency|mlperf|soak|freshness|guard`` and ``bench serving|batching|feedback|recovery|instances``."""

from __future__ import annotations

import argparse
import sys

import orjson

from server.cli import add_api_key_option, api_key, emit, key_values, positive_int, schema
from trainer.cli import add_dataset_option


def add_commands(commands, bench) -> None:
    demo = commands.add_parser(
        "demo", help="end to end on MovieLens: batch train, serve, train online, replay live traffic",
        description="Batch-trains on the first 80% of MovieLens-100K (or -1M, --dataset), starts tritonserver "
        "and the online trainer on loopback, replays the last 20% in time order as ranking requests and "
        "feedback, shows requests/s, p99 latency, freshness and the AUC of served scores live, and writes a "
        "report.")
    demo.add_argument("--minutes", type=float, default=3.0, help="bound on the replay (default 3)")
    demo.add_argument("--concurrency", type=positive_int, default=4, help="client threads (default 4)")
    demo.add_argument("--negatives", type=int, default=9, help="extra candidates per request (default 9)")
    demo.add_argument("--sync-interval-ms", type=float, default=200.0, help="trainer sync interval (default 200)")
    demo.add_argument("--data-dir", default=None, help="data directory (default: a new temporary one)")
    demo.add_argument("--fresh", action="store_true", help="empty --data-dir first if it holds anything")
    demo.add_argument("--report", default="reports/demo", help="report directory (default reports/demo)")
    demo.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_dataset_option(demo, "Here: ml-100k about 2 minutes in all; ml-1m about 1 minute of loading and batch "
                       "training more, and the replay (200,000 ratings) stops at --minutes.")
    demo.set_defaults(run=_run_demo)


    loadtest = commands.add_parser("loadtest", help="latency and freshness load tests")
    loadtests = loadtest.add_subparsers(dest="loadtest", required=True, metavar="TEST")
    latency = loadtests.add_parser(
        "latency", help="ranker latency: open-loop rate or closed-loop concurrency, HDR percentiles",
        description="Measures ranker latency like perf_analyzer: open loop at --rate (latency from each "
        "request's intended send time, so no coordinated omission) or closed loop at --concurrency; HDR "
        "histogram percentiles, achieved throughput, errors by kind, Triton's server-side split. Variants "
        "(--with-updates, --baseline) run in alternating windows of the same run.")
    target = latency.add_mutually_exclusive_group()
    target.add_argument("--url", default=None, help="host:port of a running server")
    target.add_argument("--spawn", action="store_true", help="start a server on free loopback ports")
    load = latency.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="open loop: requests per second")
    load.add_argument("--concurrency", type=positive_int, help="closed loop: clients in flight")
    latency.add_argument("--arrival", choices=("poisson", "constant"), default="poisson",
                         help="open-loop arrivals (default poisson)")
    latency.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="default grpc")
    latency.add_argument("--duration-s", type=float, default=30.0, help="measured seconds per variant (default 30)")
    latency.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured warm-up (default 3)")
    latency.add_argument("--rounds", type=positive_int, default=3,
                         help="alternating windows per variant (default 3)")
    latency.add_argument("--max-requests", type=positive_int, default=1_000_000,
                         help="cap per window (default 1000000)")
    latency.add_argument("--candidates", type=positive_int, default=100, help="candidates per request (default 100)")
    latency.add_argument("--with-updates", type=float, default=None, metavar="ROWS_PER_S",
                         help="also measure while a producer streams this many rows/s of deltas (half overwrites "
                         "of requested rows, half new rows); reports the rows/s the ranker applied")
    latency.add_argument("--baseline", action="store_true", help="also measure the trivial baseline model")
    latency.add_argument("--data-dir", default=None, help="the --url server's data dir (for --with-updates)")
    latency.add_argument("--metrics-url", default=None,
                         help="the --url server's metrics URL, for the rows/s it applied (spawned: its own)")
    latency.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    latency.add_argument("--json", action="store_true", help="print one JSON object")
    latency.add_argument("--report", default=None, help="write latency.json and latency.png here")
    latency.add_argument("--bus", choices=("local", "nats"), default="local",
                         help="nats: spawn a server on the local bus and a replica on a 3-node NATS JetStream "
                         "cluster (same snapshot) and alternate the load between them; reports both and the p99 "
                         "ratio (about 1.5 minutes at --duration-s 30; ignores --url/--spawn) (default local)")
    add_api_key_option(latency)
    latency.set_defaults(run=_run_latency)

    mlperf = loadtests.add_parser(
        "mlperf", help="MLPerf Inference LoadGen (Server or Offline scenario) against the running server",
        description="Runs MLPerf Inference's LoadGen with a system-under-test that sends each query as a ranking "
        "request (a MovieLens replay request, --candidates candidates) through the front, asynchronously, and "
        "keeps LoadGen's logs (mlperf_log_summary.txt with its VALID/INVALID verdict, mlperf_log_detail.txt) in "
        "--report/RUN/MODEL/. Prints one JSON line.")
    target = mlperf.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", default=None, help="host:port of a running server's front")
    target.add_argument("--spawn", action="store_true", help="start a server on free loopback ports")
    mlperf.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="default grpc")
    mlperf.add_argument("--scenario", choices=("server", "offline"), default="server", help="default server")
    mlperf.add_argument("--target-qps", type=float, default=50.0,
                        help="server: Poisson arrival rate (with --find-peak: where the search starts); offline: "
                        "the expected QPS that sizes LoadGen's one query (default 50)")
    mlperf.add_argument("--p99-ms", type=float, default=60.0,
                        help="server: the latency bound at the 99th percentile (default 60, as MLPerf's DLRM-v2)")
    mlperf.add_argument("--min-duration-s", type=float, default=600.0,
                        help="LoadGen's minimum run length (default 600 as in MLPerf; shorter for a quick look; "
                        "--find-peak runs this long at every step)")
    mlperf.add_argument("--find-peak", action="store_true",
                        help="LoadGen's FindPeakPerformance mode: the highest integer Server QPS that is VALID")
    mlperf.add_argument("--candidates", type=positive_int, default=100, help="candidates per request (default 100)")
    mlperf.add_argument("--baseline", action="store_true",
                        help="then the same run against the trivial baseline model, and the ratios")
    mlperf.add_argument("--max-in-flight", type=positive_int, default=64,
                        help="requests the SUT has out at once (default 64)")
    mlperf.add_argument("--performance-samples", type=positive_int, default=2048,
                        help="replay requests LoadGen loads and draws queries from (default 2048)")
    mlperf.add_argument("--report", default="reports/mlperf", help="log root (default reports/mlperf)")
    mlperf.add_argument("--run", dest="run_name", default=None,
                        help="folder under --report (default: UTC time + scenario)")
    mlperf.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_dataset_option(mlperf, "The replay is the held-out last 20%% of the ratings.")
    add_api_key_option(mlperf)
    mlperf.set_defaults(run=_run_mlperf)

    soak = loadtests.add_parser(
        "soak", help="minutes of requests + feedback + training + expiry; leaks, errors, drift",
        description="Runs a spawned server and online trainer under steady traffic with ID churn on a "
        "simulated clock (one day per second, so the 30-day TTLs expire within the run) and reports errors, "
        "RSS growth after warm-up, table size, p99 latency and freshness over time.")
    soak.add_argument("--minutes", type=float, default=10.0, help="run length (default 10)")
    soak.add_argument("--clients", type=positive_int, default=2, help="client threads (default 2)")
    soak.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples (default 10)")
    soak.add_argument("--json", action="store_true", help="print one JSON object")
    soak.set_defaults(run=_run_soak)

    fresh = loadtests.add_parser(
        "freshness", help="feedback-to-serving freshness of hot updates",
        description="For each probe: score a never-seen item, send positive feedback for it, and poll the ranker "
        "until a response shows a newer delta_seq and a changed score. Reports the seconds from the accepted "
        "feedback to that response. Spawns server + online trainer on loopback unless --url is given.")
    fresh.add_argument("--url", default=None, help="host:port of a running server with a trainer (default: spawn)")
    fresh.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="default grpc")
    fresh.add_argument("--probes", type=positive_int, default=20, help="number of probes (default 20)")
    fresh.add_argument("--timeout-s", type=float, default=10.0, help="a probe fails after this long (default 10)")
    fresh.add_argument("--sync-interval-ms", type=float, default=200.0,
                       help="the spawned trainer's sync interval (default 200)")
    fresh.add_argument("--json", action="store_true", help="print one JSON object")
    fresh.add_argument("--bus", choices=("local", "nats"), default="local",
                       help="nats: spawn a 3-node NATS JetStream cluster, --replicas servers and the trainer; probes "
                       "alternate replicas; then the replicas' tables are compared with the trainer's "
                       "(replicas_identical). About 1 minute for 2 replicas and 20 probes here (default local)")
    fresh.add_argument("--replicas", type=positive_int, default=2, help="servers with --bus nats (default 2)")
    fresh.add_argument("--rate", type=float, default=0.0,
                       help="meanwhile, send this many ranking requests/s of 100 candidates (open loop) and report "
                       "their p50/p99 as the ranker's latency (default 0: the probes' own ranking calls)")
    fresh.add_argument("--baseline", action="store_true",
                       help="measure twice in one run, first with the trainer emitting on its sync timer only "
                       "(--no-emit-on-train), then as usual; reports both (\"baseline\") and ranker_p99_ratio. "
                       "Each run also reports the sparse delta records/s and rows per record while the probes ran")
    add_api_key_option(fresh)
    fresh.set_defaults(run=_run_freshness)

    guard = loadtests.add_parser(
        "guard", help="the quality guard end to end on the JetStream bus: poison, hold, kill -9, rollback",
        description="Spawns a 3-node NATS JetStream cluster on loopback, batch-trains on MovieLens-100K without "
        "its last --tail ratings (the snapshot goes to the bus), starts --replicas serve replicas and train "
        "online, and replays the tail live (clicks as feedback, the rest sampled negatives at 0.1). In the middle "
        "third a poisoning client joins (label-inverting sources and a click bot, 40% of the volume). While the "
        "guard holds, the trainer is killed with SIGKILL and restarted; a second SIGKILL lands between a "
        "rollback's records and the checkpoint that makes it durable when the poll sees that window. Then clean "
        "traffic until the guard has been open for 10 s, and the replicas are quiesced and compared with the "
        "trainer. Prints rollbacks, held_s, "
        "poison_rows_served_after_rollback, dense_restored, replicas_identical, trainer_restarts and "
        "failed_requests (loadtest.guard_loadtest). Exit status 1 unless the rollback happened, no poison row is "
        "served, the dense weights were restored, the replicas are identical, the guard ended open and no "
        "request failed. 4 to 4.5 minutes here.")
    guard.add_argument("--bus", choices=("nats",), default="nats",
                       help="the bus (nats only: the local bus's guard is measured by `experiment guard`)")
    guard.add_argument("--replicas", type=positive_int, default=2, help="serving replicas (default 2)")
    guard.add_argument("--tail", type=positive_int, default=24_000,
                       help="ratings replayed live, 3000..50000 (default 24000)")
    guard.add_argument("--concurrency", type=positive_int, default=4, help="client threads (default 4)")
    guard.add_argument("--no-kill", action="store_true", help="no SIGKILL of the trainer")
    guard.add_argument("--dense-interval-s", type=float, default=5.0,
                       help="the trainer's dense record interval (default 5: poisoned dense weights go out "
                       "before the hold, so the rollback has dense weights to restore)")
    guard.add_argument("--timeout-s", type=float, default=120.0,
                       help="how long replicas get to catch up (default 120)")
    guard.add_argument("--seed", type=int, default=0, help="poison scenario seed (default 0)")
    guard.add_argument("--work-dir", default=None,
                       help="keep the cluster's, replicas' and trainer's directories and logs here (must be empty or "
                       "absent; default: a temporary directory, removed)")
    guard.add_argument("--json", action="store_true", help="print one JSON object")
    guard.set_defaults(run=_run_guard)


    serving = bench.add_parser(
        "serving",
        help="ranker latency vs a trivial Python-backend model on the same server",
        description="Round-robin from one client thread: ranker and baseline (trivial model) through the "
        "front, and the ranker on tritonserver's private port (direct); reports each latency distribution, the "
        "ranker/baseline p50 ratio and what the front adds. Spawns `monolith-rt serve` unless --url is given.",
    )
    serving.add_argument("--url", default=None, help="host:port of a running server (default: spawn one)")
    serving.add_argument("--direct-url", default=None,
                         help="with --url: tritonserver's private port behind the front, to time the front's cost")
    serving.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="default grpc")
    serving.add_argument("--candidates", type=positive_int, default=100, help="candidates per request (default 100)")
    serving.add_argument("--requests", type=positive_int, default=2000, help="requests per model (default 2000)")
    serving.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    serving.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    add_api_key_option(serving)
    serving.set_defaults(run=_run_bench_serving)

    batching = bench.add_parser(
        "batching",
        help="ranker with and without Triton dynamic batching, side by side",
        description="Runs the shipped ranker config (dynamic batching) and an unbatched variant on two servers and "
        "alternates the same closed-loop load between them; prints throughput and latency of each as JSON.",
    )
    batching.add_argument("--concurrency", type=positive_int, default=4, help="client threads (default 4)")
    batching.add_argument("--candidates", type=positive_int, default=100, help="candidates per request")
    batching.add_argument("--window-s", type=float, default=5.0, help="seconds per window (default 5)")
    batching.add_argument("--rounds", type=positive_int, default=3, help="A/B windows each (default 3)")
    batching.set_defaults(run=_run_bench_batching)


    feedback = bench.add_parser(
        "feedback", help="durable feedback acknowledgements/s with many clients vs one",
        description="Closed-loop gRPC clients send feedback (one click each); an acknowledgement means the action "
        "is fsynced. Measures --clients clients against one client on the same server, in alternating windows "
        "of the same run: acks/s, p50 and p99 latency; and the floor, the same clients sending the smallest "
        "ranking request to the trivial baseline model (baseline_rps, acks_vs_baseline). Spawns a server unless "
        "--url is given.")
    feedback.add_argument("--url", default=None, help="host:port (gRPC) of a running server (default: spawn one)")
    feedback.add_argument("--clients", type=positive_int, default=8, help="concurrent clients (default 8)")
    feedback.add_argument("--window-s", type=float, default=5.0, help="seconds per window (default 5)")
    feedback.add_argument("--rounds", type=positive_int, default=2, help="windows per variant (default 2)")
    feedback.add_argument("--json", action="store_true", help="print one JSON object")
    feedback.set_defaults(run=_run_bench_feedback)

    recovery = bench.add_parser(
        "recovery", help="restart time with a large snapshot plus a minute of deltas",
        description="Writes a serving snapshot of --rows rows and --seconds of deltas at --rows-per-s, then "
        "times a server start until it answers at the last delta_seq; an empty start in the same run is the "
        "baseline.")
    recovery.add_argument("--rows", type=positive_int, default=1_000_000, help="snapshot rows (default 1000000)")
    recovery.add_argument("--seconds", type=float, default=60.0, help="seconds of deltas (default 60)")
    recovery.add_argument("--rows-per-s", type=float, default=10_000.0, help="delta rows per second (default 10000)")
    recovery.add_argument("--json", action="store_true", help="print one JSON object")
    recovery.set_defaults(run=_run_bench_recovery)

    instances = bench.add_parser(
        "instances", help="ranker throughput and table memory per instance count",
        description="For each --instances count, spawns monolith-rt serve with that many ranker instances over a "
        "snapshot of --rows rows and measures, in alternating closed-loop windows on tritonserver's own gRPC "
        "port, the ranker's req/s and the baseline model's (same tensors); then the table's bytes and, from "
        "/proc/<pid>/smaps, the table bytes each ranker stub holds privately, each stub's RSS and Pss without the "
        "table (stub_rss_minus_table_bytes, stub_pss_minus_table_bytes) and ready_s (spawn of serve until it is "
        "ready).")
    instances.add_argument("--instances", default="1,2", help="comma-separated instance counts (default 1,2)")
    instances.add_argument("--rows", type=positive_int, default=2_000_000, help="table rows (default 2000000)")
    instances.add_argument("--candidates", type=positive_int, default=100, help="candidates per request (default 100)")
    instances.add_argument("--concurrency", type=positive_int, default=8, help="clients in flight (default 8)")
    instances.add_argument("--window-s", type=float, default=5.0, help="seconds per window (default 5)")
    instances.add_argument("--rounds", type=positive_int, default=2, help="windows per model (default 2)")
    instances.add_argument("--private-table", action="store_true",
                           help="each instance with its own private table (model parameter shared_table false)")
    instances.add_argument("--row-dtype", default="fp32",
                           help="comma-separated row types to measure, each with every --instances count (serve "
                           "--row-dtype: fp32, fp16, int8; default fp32)")
    instances.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    instances.add_argument("--json", action="store_true", help="print one JSON object")
    instances.set_defaults(run=_run_bench_instances)


def _run_bench_serving(args: argparse.Namespace) -> int:
    from loadtest.serving_bench import bench_serving, format_serving_report

    result = bench_serving(args.url, args.protocol, args.candidates, args.requests, args.seed,
                           direct_url=args.direct_url, api_key=api_key(args))
    emit(result, args.json, format_serving_report)
    return 0


def _run_bench_batching(args: argparse.Namespace) -> int:
    from loadtest.batching_bench import bench_batching

    print(orjson.dumps(bench_batching(args.concurrency, args.candidates, args.window_s, args.rounds),
                       option=orjson.OPT_INDENT_2).decode())
    return 0


def _run_freshness(args: argparse.Namespace) -> int:
    from loadtest.freshness import run_freshness

    if args.bus == "nats":
        from loadtest.bus_loadtests import run_bus_freshness

        result = run_bus_freshness(args.replicas, args.probes, args.timeout_s, args.sync_interval_ms, schema())
        emit(result, args.json, lambda r: f"freshness over {r['probes']} probes on {r['replicas']} replicas: p50 "
             f"{r['p50_s']} s, p99 {r['p99_s']} s, max {r['max_s']} s, failed {r['failed']}; replicas identical "
             f"after quiescing: {r['replicas_identical']}")
        return 0 if result["failed"] == 0 and result["replicas_identical"] else 1
    result = run_freshness(args.url, args.protocol, args.probes, args.timeout_s, args.sync_interval_ms, schema(),
                           api_key=api_key(args), rate=args.rate, baseline=args.baseline)

    def line(r: dict) -> str:
        return (f"p50 {r['p50_s']} s, p99 {r['p99_s']} s, max {r['max_s']} s, failed {r['failed']}; ranker p99 "
                f"{r['ranker_p99_ms']} ms; {r.get('delta_records_per_s')} delta records/s, "
                f"{r.get('rows_per_record')} rows/record")

    emit(result, args.json, lambda r: f"freshness over {r['probes']} probes (sync interval "
         f"{args.sync_interval_ms:.0f} ms): {line(r)}" + (f"\ntimer only (baseline): {line(r['baseline'])}; "
         f"ranker p99 ratio {r.get('ranker_p99_ratio')}" if "baseline" in r else ""))
    return 0 if result["failed"] == 0 else 1


def _run_demo(args: argparse.Namespace) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    from loadtest.demo import format_summary, run_demo
    from trainer.online import configure_torch

    configure_torch()
    data_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="monolith-demo-"))
    if data_dir.exists() and any(data_dir.iterdir()):
        if not args.fresh:
            print(f"monolith-rt demo: {data_dir} is not empty; pass --fresh to start it over", file=sys.stderr)
            return 2
        shutil.rmtree(data_dir)
    report_dir = Path(args.report)
    summary = run_demo(schema(), data_dir, report_dir, args.minutes, args.concurrency, args.negatives,
                       args.sync_interval_ms, dataset=args.dataset)
    emit(summary, args.json, lambda r: format_summary(r, report_dir))
    return 0 if summary["errors"] == 0 else 1


def _run_latency(args: argparse.Namespace) -> int:
    from loadtest.latency import LatencyConfig, format_report, run_latency, write_report

    if args.bus == "nats":
        from loadtest.bus_loadtests import format_bus_latency, run_bus_latency

        result = run_bus_latency(schema(), args.concurrency, args.rate, args.duration_s, args.warmup_s, args.rounds,
                                 args.candidates, args.seed, args.protocol)
        emit(result, args.json, format_bus_latency)
        return 0
    if args.url is None and not args.spawn:
        print("monolith-rt loadtest latency: give --url HOST:PORT or --spawn", file=sys.stderr)
        return 2
    config = LatencyConfig(
        url=None if args.spawn else args.url, protocol=args.protocol, rate=args.rate, concurrency=args.concurrency,
        duration_s=args.duration_s, warmup_s=args.warmup_s, candidates=args.candidates,
        with_updates=args.with_updates, baseline=args.baseline, data_dir=args.data_dir, arrival=args.arrival,
        max_requests=args.max_requests, rounds=args.rounds, seed=args.seed, metrics_url=args.metrics_url,
        api_key=api_key(args))
    result = run_latency(schema(), config)
    if args.report:
        write_report(result, args.report)
    result.pop("_timelines", None)
    emit(result, args.json, format_report)
    return 0


def _run_mlperf(args: argparse.Namespace) -> int:
    from loadtest.mlperf import MlperfConfig, format_summary_line, run_mlperf

    config = MlperfConfig(
        url=None if args.spawn else args.url, protocol=args.protocol, scenario=args.scenario,
        target_qps=args.target_qps, p99_ms=args.p99_ms, min_duration_s=args.min_duration_s, find_peak=args.find_peak,
        candidates=args.candidates, baseline=args.baseline, max_in_flight=args.max_in_flight,
        performance_samples=args.performance_samples, dataset=args.dataset, report_dir=args.report,
        run=args.run_name, seed=args.seed, api_key=api_key(args))
    result = run_mlperf(schema(), config)
    print(format_summary_line(result), file=sys.stderr, flush=True)
    emit(result, True, key_values)
    return 0 if result["errors"] == 0 and result.get("baseline", {}).get("errors", 0) == 0 else 1


def _run_guard(args: argparse.Namespace) -> int:
    from loadtest.guard_loadtest import format_guard, run_guard_loadtest

    result = run_guard_loadtest(schema(), args.replicas, args.tail, args.concurrency, kill_during_hold=not args.no_kill,
                                kill_during_rollback=not args.no_kill, dense_interval_s=args.dense_interval_s,
                                timeout_s=args.timeout_s, seed=args.seed, work_dir=args.work_dir)
    emit(result, args.json, format_guard)
    ok = (result["rollbacks"] >= 1 and result["poison_rows_served_after_rollback"] == 0 and result["dense_restored"]
          and result["replicas_identical"] and result["failed_requests"] == 0 and result["settled"])
    return 0 if ok else 1


def _run_bench_feedback(args: argparse.Namespace) -> int:
    from loadtest.feedback_bench import bench_feedback, format_feedback_report

    result = bench_feedback(args.url, args.clients, args.window_s, args.rounds)
    emit(result, args.json, format_feedback_report)
    return 0 if result["errors"] == 0 and result["one_client"]["errors"] == 0 else 1


def _run_bench_recovery(args: argparse.Namespace) -> int:
    from loadtest.recovery_bench import bench_recovery

    emit(bench_recovery(schema(), args.rows, args.seconds, args.rows_per_s), args.json, key_values)
    return 0


def _run_soak(args: argparse.Namespace) -> int:
    from loadtest.soak import run_soak

    result = run_soak(schema(), args.minutes, args.clients, args.sample_s)
    emit(result, args.json, lambda r: f"soak {args.minutes} min: {r['requests']:,} requests, {r['errors']} "
         f"errors; RSS growth after warm-up: server {r['server_rss_growth']}, trainer {r['trainer_rss_growth']}; "
         f"RSS MB server {r['server_rss_mb']}, trainer {r['trainer_rss_mb']}; table rows {r['table_rows']}; "
         f"disk bytes {r['disk_bytes']}; freshness p50 {r['freshness_p50_s']} s")
    return 0 if result["errors"] == 0 else 1


def _run_bench_instances(args: argparse.Namespace) -> int:
    from loadtest.instances_bench import bench_instances, format_instances_report

    counts = [int(c) for c in args.instances.split(",") if c.strip()]
    result = bench_instances(schema(), counts, args.rows, args.candidates, args.concurrency, args.window_s,
                             args.rounds, args.seed, shared_table=not args.private_table,
                             row_dtypes=tuple(t.strip() for t in args.row_dtype.split(",") if t.strip()))
    emit(result, args.json, format_instances_report)
    return 0
