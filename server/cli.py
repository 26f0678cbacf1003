"""The ``monolith-rt`` command: one entry point, a subcommand per job.

Subcommand modules are imported only when chosen, so ``--help`` is instant
and a job pulls in only what it needs.
"""

from __future__ import annotations

import argparse
import sys

import orjson


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"requires an integer >= 1, got {text}")
    return value


def _add_api_key_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key-file", default=None,
                        help="file holding the server's API key, for a --url server started with one "
                        "(default: $MONOLITH_API_KEY_FILE, else none)")


def _api_key(args: argparse.Namespace) -> str | None:
    from server.front.auth import api_key_file_from, load_api_key

    key = load_api_key(api_key_file_from(args.api_key_file))
    return None if key is None else key.decode()


def _run_bench_table(args: argparse.Namespace) -> int:
    from server.bench import bench_table, format_table_report

    result = bench_table(keys=args.keys, dim=args.dim, batch=args.batch, seed=args.seed)
    if args.json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    else:
        print(format_table_report(result))
    return 0


def _run_bench_serving(args: argparse.Namespace) -> int:
    from loadtest.serving_bench import bench_serving, format_serving_report

    result = bench_serving(args.url, args.protocol, args.candidates, args.requests, args.seed,
                           direct_url=args.direct_url, api_key=_api_key(args))
    if args.json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    else:
        print(format_serving_report(result))
    return 0


def _run_deltas(args: argparse.Namespace) -> int:
    from updater import tools

    if args.action == "inspect":
        return tools.print_inspect(args.path)
    if args.action == "verify":
        ok, message = tools.verify(args.path)
        print(message, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    producer = tools.SyntheticProducer(args.path, args.rows_per_s, dim=args.dim, key_space=args.key_space,
                                       interval_s=args.interval_s, seed=args.seed)
    try:
        producer.run(args.duration_s)
    except KeyboardInterrupt:
        pass
    finally:
        producer.close()
    print(f"wrote {producer.records} records, {producer.rows} rows to {args.path}")
    return 0


def _run_bench_batching(args: argparse.Namespace) -> int:
    from loadtest.batching_bench import bench_batching

    result = bench_batching(args.concurrency, args.candidates, args.window_s, args.rounds)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0


def _schema():
    from server.features import load_schema
    from server.launcher import DEFAULT_MODEL_REPOSITORY

    return load_schema(DEFAULT_MODEL_REPOSITORY / "ranker" / "feature_schema.json")


def _run_train(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading
    from pathlib import Path

    from trainer.online import OnlineConfig, OnlineTrainer, configure_torch, train_batch

    configure_torch()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    schema = _schema()
    if args.mode == "batch":
        from trainer.data import load_movielens

        result, _ = train_batch(schema, load_movielens(schema), Path(args.data_dir), args.train_fraction,
                                args.batch_size, progress=not args.json)
        print(orjson.dumps(result).decode() if args.json else
              f"trained on {result['examples']:,} examples at {result['examples_per_s']:,.0f}/s, "
              f"held-out AUC {result['holdout_auc']} on {result['holdout_examples']:,}; "
              f"snapshot at delta_seq {result['delta_seq']} in {args.data_dir}")
        return 0
    config = OnlineConfig(sync_interval_s=args.sync_interval_ms / 1000, dense_interval_s=args.dense_interval_s,
                          snapshot_interval_s=args.snapshot_interval_s, batch_size=args.batch_size,
                          window_s=args.window_s, negative_rate=args.negative_rate, lr_sparse=args.lr_sparse,
                          lr_dense=args.lr_dense, expiry_interval_s=args.expiry_interval_s,
                          log_retention_s=args.log_retention_s)
    trainer = OnlineTrainer(schema, args.data_dir, config)
    print(f"online trainer on {args.data_dir}: {trainer.start_message}", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        trainer.run(stop, max_seconds=args.max_seconds)
    finally:
        trainer.close()
    return 0


def _run_bench_train(args: argparse.Namespace) -> int:
    from trainer.bench import bench_train

    result = bench_train(_schema(), args.batch)
    print(orjson.dumps(result).decode() if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


def _run_freshness(args: argparse.Namespace) -> int:
    from loadtest.freshness import run_freshness

    result = run_freshness(args.url, args.protocol, args.probes, args.timeout_s, args.sync_interval_ms, _schema(),
                           api_key=_api_key(args))
    if args.json:
        print(orjson.dumps(result).decode())
    else:
        print(f"freshness over {result['probes']} probes (sync interval {args.sync_interval_ms:.0f} ms): "
              f"p50 {result['p50_s']} s, p99 {result['p99_s']} s, max {result['max_s']} s, "
              f"failed {result['failed']}")
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
    summary = run_demo(_schema(), data_dir, report_dir, args.minutes, args.concurrency, args.negatives,
                       args.sync_interval_ms)
    print(orjson.dumps(summary).decode() if args.json else format_summary(summary, report_dir))
    return 0 if summary["errors"] == 0 else 1


def _run_latency(args: argparse.Namespace) -> int:
    from loadtest.latency import format_report, run_latency, write_report

    if args.url is None and not args.spawn:
        print("monolith-rt loadtest latency: give --url HOST:PORT or --spawn", file=sys.stderr)
        return 2
    result = run_latency(_schema(), None if args.spawn else args.url, args.protocol, args.rate, args.concurrency,
                         args.duration_s, args.warmup_s, args.candidates, args.with_updates, args.baseline,
                         args.data_dir, args.arrival, args.max_requests, args.rounds, args.seed, args.metrics_url,
                         api_key=_api_key(args))
    if args.report:
        write_report(result, args.report)
    result.pop("_timelines", None)
    print(orjson.dumps(result).decode() if args.json else format_report(result))
    return 0


def _run_experiment(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trainer import experiments
    from trainer.online import configure_torch

    configure_torch()
    if args.name == "calibration":
        from trainer.calibration import format_calibration, run_calibration

        result = run_calibration(_schema(), args.quick)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "calibration.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
        print(orjson.dumps(result).decode() if args.json else
              format_calibration(result) + f"\n  written: {args.out}/calibration.json")
        return 0
    run = experiments.run_collisions if args.name == "collisions" else experiments.run_sync_interval
    result = run(_schema(), args.seeds, args.quick)
    experiments.write_outputs(result, Path(args.out))
    print(orjson.dumps(result).decode() if args.json else
          experiments.format_table(result) + f"\n  written: {args.out}/{args.name}.json, {args.name}.png")
    return 0


def _run_bench_apply(args: argparse.Namespace) -> int:
    from updater.bench import bench_apply

    result = bench_apply(_schema(), args.rows, args.dim, args.rows_per_record, args.seed)
    print(orjson.dumps(result).decode() if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


def _run_bench_feedback(args: argparse.Namespace) -> int:
    from loadtest.feedback_bench import bench_feedback, format_feedback_report

    result = bench_feedback(args.url, args.clients, args.window_s, args.rounds)
    print(orjson.dumps(result).decode() if args.json else format_feedback_report(result))
    return 0 if result["errors"] == 0 and result["one_client"]["errors"] == 0 else 1


def _run_bench_recovery(args: argparse.Namespace) -> int:
    from loadtest.recovery_bench import bench_recovery

    result = bench_recovery(_schema(), args.rows, args.seconds, args.rows_per_s)
    print(orjson.dumps(result).decode() if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


def _run_bench_instances(args: argparse.Namespace) -> int:
    from loadtest.instances_bench import bench_instances, format_instances_report

    counts = [int(c) for c in args.instances.split(",") if c.strip()]
    result = bench_instances(_schema(), counts, args.rows, args.candidates, args.concurrency, args.window_s,
                             args.rounds, args.seed, shared_table=not args.private_table)
    print(orjson.dumps(result).decode() if args.json else format_instances_report(result))
    return 0


def _run_soak(args: argparse.Namespace) -> int:
    from loadtest.soak import run_soak

    result = run_soak(_schema(), args.minutes, args.clients, args.sample_s)
    if args.json:
        print(orjson.dumps(result).decode())
    else:
        print(f"soak {args.minutes} min: {result['requests']:,} requests, {result['errors']} errors; RSS growth "
              f"after warm-up: server {result['server_rss_growth']}, trainer {result['trainer_rss_growth']}; "
              f"RSS MB server {result['server_rss_mb']}, trainer {result['trainer_rss_mb']}; "
              f"table rows {result['table_rows']}; disk bytes {result['disk_bytes']}; "
              f"freshness p50 {result['freshness_p50_s']} s")
    return 0 if result["errors"] == 0 else 1


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"requires a port 0..65535 (0 = pick a free one), got {text}")
    return value


def _run_serve(args: argparse.Namespace) -> int:
    import logging

    import uvloop

    from server.front import ApiKeyError, FrontLimits, api_key_file_from
    from server.launcher import DEFAULT_MODEL_REPOSITORY, TritonStartError
    from server.supervisor import RestartPolicy, ServeConfig, Supervisor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ServeConfig(
            data_dir=args.data_dir, model_repository=args.model_repository or DEFAULT_MODEL_REPOSITORY,
            host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
            tritonserver=args.tritonserver, startup_timeout_s=args.startup_timeout_s,
            api_key_file=api_key_file_from(args.api_key_file),
            limits=FrontLimits(max_body_bytes=args.max_body_bytes, max_elements_per_input=args.max_elements),
            restarts=RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window_s),
            grpc_direct=args.grpc_direct,
        )
        supervisor = Supervisor(config, announce=lambda text: print(text, flush=True))
    except (ValueError, ApiKeyError) as exc:
        print(f"monolith-rt serve: {exc}", file=sys.stderr)
        return 2
    print(f"starting tritonserver (log: {supervisor.triton.log_path})", file=sys.stderr, flush=True)
    try:
        return uvloop.run(supervisor.run())
    except (TritonStartError, FileNotFoundError, OSError) as exc:
        print(f"monolith-rt serve: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monolith-rt",
        description="Real-time recommendation ranking on Triton with a collisionless embedding table.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run tritonserver behind validating HTTP/gRPC fronts, restarting it if it dies",
        description="Starts the real Triton Inference Server on the model repository, on private loopback ports, "
        "and the fronts that callers reach: KServe v2 HTTP and gRPC (every request's declared shapes are "
        "checked against the data it carries, and its size against the limits, before Triton sees it) and "
        "the Prometheus metrics endpoint (Triton's metrics plus the front's and supervisor's). If tritonserver "
        "exits unexpectedly it is restarted with backoff from the newest snapshot plus the delta stream; more "
        "than --max-restarts exits within --restart-window-s and serve exits 3. SIGINT/SIGTERM stop everything "
        "(exit 0). Binds to 127.0.0.1 unless --host says otherwise; model load/unload, shared memory, trace and "
        "log settings are not exposed.",
    )
    serve.add_argument("--data-dir", default="data", help="directory for snapshots, logs and deltas (default ./data)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address for HTTP, gRPC and metrics (default 127.0.0.1; 0.0.0.0 exposes them)")
    serve.add_argument("--http-port", type=_port, default=8000, help="KServe v2 HTTP port (default 8000; 0 = free)")
    serve.add_argument("--grpc-port", type=_port, default=8001, help="KServe v2 gRPC port (default 8001; 0 = free)")
    serve.add_argument("--metrics-port", type=_port, default=8002,
                       help="Prometheus metrics port (default 8002; 0 = free)")
    serve.add_argument("--api-key-file", default=None,
                       help="require 'Authorization: Bearer <key>' (HTTP header or gRPC metadata) on everything "
                       "but health and metrics; the file holds the key and must not be readable by other users "
                       "(default: $MONOLITH_API_KEY_FILE, else no key)")
    serve.add_argument("--max-body-bytes", type=_positive_int, default=8 << 20,
                       help="largest request body or gRPC message accepted (default 8 MiB)")
    serve.add_argument("--max-elements", type=_positive_int, default=1 << 20,
                       help="most elements one input tensor may declare (default 1048576; the ranker needs at most "
                       "4096 x 8)")
    serve.add_argument("--grpc-direct", action="store_true",
                       help="expose tritonserver's own gRPC port instead of the gRPC front: about 0.5 ms faster per "
                       "request, for trusted callers only (Triton then accepts messages up to 2 GiB, and API keys "
                       "cannot be checked on gRPC)")
    serve.add_argument("--max-restarts", type=int, default=5,
                       help="restarts of a crashed tritonserver allowed within --restart-window-s (default 5)")
    serve.add_argument("--restart-window-s", type=float, default=300.0,
                       help="window for --max-restarts, seconds (default 300)")
    serve.add_argument("--model-repository", default=None,
                       help="model repository (default: the one shipped with this package)")
    serve.add_argument("--tritonserver", default=None,
                       help="tritonserver binary (default: the nvidia-pytriton wheel's, else PATH)")
    serve.add_argument("--startup-timeout-s", type=float, default=120.0,
                       help="seconds to wait for readiness before giving up (default 120)")
    serve.set_defaults(run=_run_serve)

    deltas = commands.add_parser("deltas", help="inspect, verify or feed a delta stream")
    actions = deltas.add_subparsers(dest="action", required=True, metavar="ACTION")
    inspect = actions.add_parser("inspect", help="per segment: seq range, record kinds, rows, bytes",
                                 description="Reads every record of a delta stream directory and summarises "
                                 "each segment. Exits 1 on the first corrupt record.")
    inspect.add_argument("path", help="delta stream directory (e.g. data/deltas)")
    verify = actions.add_parser("verify", help="check every checksum and sequence number",
                                description="Exit code 0 when every record checks out, 1 otherwise (the "
                                "message names the segment and offset of the first bad record).")
    verify.add_argument("path", help="delta stream directory")
    produce = actions.add_parser("produce", help="write synthetic sparse deltas at a given rate",
                                 description="Appends real sparse delta records (random FIDs and rows) to a "
                                 "delta stream, for load tests. Only one writer may hold a stream at a time.")
    produce.add_argument("path", help="delta stream directory")
    produce.add_argument("--rows-per-s", type=float, required=True, help="rows per second to write")
    produce.add_argument("--duration-s", type=float, default=10.0, help="how long to run (default 10)")
    produce.add_argument("--interval-s", type=float, default=0.1, help="seconds between records (default 0.1)")
    produce.add_argument("--dim", type=_positive_int, default=16, help="row length (default 16)")
    produce.add_argument("--key-space", type=_positive_int, default=100_000,
                         help="FIDs are drawn from 1..KEY_SPACE (default 100000)")
    produce.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    for p in (inspect, verify, produce):
        p.set_defaults(run=_run_deltas)

    train = commands.add_parser("train", help="batch or online training")
    modes = train.add_subparsers(dest="mode", required=True, metavar="MODE")
    batch = modes.add_parser(
        "batch", help="one pass over MovieLens-100K history, then a snapshot to serve from",
        description="Trains one time-ordered pass over the first --train-fraction of MovieLens-100K (fetched "
        "once into the user cache), reports AUC on the rest, and writes a serving snapshot and a trainer "
        "checkpoint into --data-dir.")
    batch.add_argument("--data-dir", default="data", help="data directory shared with the server (default ./data)")
    batch.add_argument("--train-fraction", type=float, default=0.8, help="leading share trained on (default 0.8)")
    batch.add_argument("--batch-size", type=_positive_int, default=1024, help="examples per step (default 1024)")
    batch.add_argument("--json", action="store_true", help="print one JSON object (and no progress bar)")
    online = modes.add_parser(
        "online", help="train continuously from the server's logs and emit deltas",
        description="Joins the ranker's feature log with the feedback log, trains on micro-batches, and emits "
        "the touched rows as sparse deltas every sync interval (dense weights every dense interval). Resumes "
        "from its last checkpoint; SIGINT/SIGTERM writes a snapshot and a checkpoint, then exits.")
    online.add_argument("--data-dir", default="data", help="data directory shared with the server (default ./data)")
    online.add_argument("--sync-interval-ms", type=float, default=200.0,
                        help="sparse delta interval, 50 ms to 24 h (default 200)")
    online.add_argument("--dense-interval-s", type=float, default=600.0, help="dense delta interval (default 600)")
    online.add_argument("--snapshot-interval-s", type=float, default=600.0,
                        help="snapshot interval; each also sends the dense weights (default 600)")
    online.add_argument("--batch-size", type=_positive_int, default=1024, help="micro-batch size (default 1024)")
    online.add_argument("--window-s", type=float, default=30.0, help="join window in seconds (default 30)")
    online.add_argument("--expiry-interval-s", type=float, default=60.0,
                        help="seconds between per-slot TTL sweeps (default 60)")
    online.add_argument("--negative-rate", type=float, default=0.1,
                        help="share of unclicked impressions kept as negatives, each weighted 1/rate; 0: none, "
                        "for feedback that labels negatives explicitly (default 0.1)")
    online.add_argument("--lr-sparse", type=float, default=0.05, help="Adagrad rate of embedding rows (default 0.05)")
    online.add_argument("--lr-dense", type=float, default=1e-4, help="Adam rate of dense weights (default 1e-4)")
    online.add_argument("--log-retention-s", type=float, default=3600.0,
                        help="feature/feedback log segments that the oldest kept checkpoint has read past are "
                        "deleted once this old (default 3600); delta segments go once every kept snapshot and "
                        "checkpoint is past them")
    online.add_argument("--max-seconds", type=float, default=None, help="stop after this long (default: never)")
    for p in (batch, online):
        p.set_defaults(run=_run_train)

    demo = commands.add_parser(
        "demo", help="end to end on MovieLens-100K: batch train, serve, train online, replay live traffic",
        description="Batch-trains on the first 80%% of MovieLens-100K, starts tritonserver and the online "
        "trainer on loopback, replays the last 20%% in time order as ranking requests and feedback, shows "
        "requests/s, p99 latency, freshness and the AUC of served scores live, and writes a report.")
    demo.add_argument("--minutes", type=float, default=3.0, help="bound on the replay (default 3)")
    demo.add_argument("--concurrency", type=_positive_int, default=4, help="client threads (default 4)")
    demo.add_argument("--negatives", type=int, default=9, help="extra candidates per request (default 9)")
    demo.add_argument("--sync-interval-ms", type=float, default=200.0, help="trainer sync interval (default 200)")
    demo.add_argument("--data-dir", default=None, help="data directory (default: a new temporary one)")
    demo.add_argument("--fresh", action="store_true", help="empty --data-dir first if it holds anything")
    demo.add_argument("--report", default="reports/demo", help="report directory (default reports/demo)")
    demo.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    demo.set_defaults(run=_run_demo)

    experiment = commands.add_parser(
        "experiment", help="the paper's findings on MovieLens-100K: collisions, sync-interval; calibration",
        description="collisions: collisionless table vs FIDs hashed into 1/2, 1/4, 1/8 as many rows (AUC on "
        "the time-ordered last 20%%). sync-interval: batch on the first half, then online training with K "
        "sparse syncs to a serving table, AUC of served scores (prequential). Several seeds, mean +- std; "
        "prints a table, writes JSON and a PNG. calibration: online training with negatives kept at 1.0, "
        "0.5, 0.1 on MovieLens-100K and a synthetic stream of known click rates; mean served score, observed "
        "rate, their ratio and the ECE (10 bins) of held-out served scores per rate (JSON only).")
    experiment.add_argument("name", choices=("collisions", "sync-interval", "calibration"), help="which experiment")
    experiment.add_argument("--seeds", type=_positive_int, default=3, help="seeds (default 3)")
    experiment.add_argument("--quick", action="store_true", help="20,000 examples and fewer variants (for tests)")
    experiment.add_argument("--out", default="reports/experiments", help="output dir (default reports/experiments)")
    experiment.add_argument("--json", action="store_true", help="print one JSON object")
    experiment.set_defaults(run=_run_experiment)

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
    load.add_argument("--concurrency", type=_positive_int, help="closed loop: clients in flight")
    latency.add_argument("--arrival", choices=("poisson", "constant"), default="poisson",
                         help="open-loop arrivals (default poisson)")
    latency.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="default grpc")
    latency.add_argument("--duration-s", type=float, default=30.0, help="measured seconds per variant (default 30)")
    latency.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured warm-up (default 3)")
    latency.add_argument("--rounds", type=_positive_int, default=3,
                         help="alternating windows per variant (default 3)")
    latency.add_argument("--max-requests", type=_positive_int, default=1_000_000,
                         help="cap per window (default 1000000)")
    latency.add_argument("--candidates", type=_positive_int, default=100, help="candidates per request (default 100)")
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
    _add_api_key_option(latency)
    latency.set_defaults(run=_run_latency)

    soak = loadtests.add_parser(
        "soak", help="minutes of requests + feedback + training + expiry; leaks, errors, drift",
        description="Runs a spawned server and online trainer under steady traffic with ID churn on a "
        "simulated clock (one day per second, so the 30-day TTLs expire within the run) and reports errors, "
        "RSS growth after warm-up, table size, p99 latency and freshness over time.")
    soak.add_argument("--minutes", type=float, default=10.0, help="run length (default 10)")
    soak.add_argument("--clients", type=_positive_int, default=2, help="client threads (default 2)")
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
    fresh.add_argument("--probes", type=_positive_int, default=20, help="number of probes (default 20)")
    fresh.add_argument("--timeout-s", type=float, default=10.0, help="a probe fails after this long (default 10)")
    fresh.add_argument("--sync-interval-ms", type=float, default=200.0,
                       help="the spawned trainer's sync interval (default 200)")
    fresh.add_argument("--json", action="store_true", help="print one JSON object")
    _add_api_key_option(fresh)
    fresh.set_defaults(run=_run_freshness)

    bench = commands.add_parser("bench", help="micro-benchmarks, each against its baseline in the same run")
    bench_kinds = bench.add_subparsers(dest="bench", required=True, metavar="WHAT")
    table = bench_kinds.add_parser(
        "table",
        help="embedding table lookups/inserts vs a Python dict",
        description="Builds a table of N random FIDs and measures batched inserts and lookups on one "
        "thread, with a Python dict + numpy row fetch as the baseline in the same run.",
    )
    table.add_argument("--keys", type=_positive_int, default=4_000_000, help="number of FIDs N (default 4000000)")
    table.add_argument("--dim", type=_positive_int, default=16, help="row length D (default 16)")
    table.add_argument("--batch", type=_positive_int, default=4096, help="FIDs per call B (default 4096)")
    table.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    table.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    table.set_defaults(run=_run_bench_table)

    serving = bench_kinds.add_parser(
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
    serving.add_argument("--candidates", type=_positive_int, default=100, help="candidates per request (default 100)")
    serving.add_argument("--requests", type=_positive_int, default=2000, help="requests per model (default 2000)")
    serving.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    serving.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    _add_api_key_option(serving)
    serving.set_defaults(run=_run_bench_serving)

    batching = bench_kinds.add_parser(
        "batching",
        help="ranker with and without Triton dynamic batching, side by side",
        description="Runs the shipped ranker config (dynamic batching) and an unbatched variant on two servers and "
        "alternates the same closed-loop load between them; prints throughput and latency of each as JSON.",
    )
    batching.add_argument("--concurrency", type=_positive_int, default=4, help="client threads (default 4)")
    batching.add_argument("--candidates", type=_positive_int, default=100, help="candidates per request")
    batching.add_argument("--window-s", type=float, default=5.0, help="seconds per window (default 5)")
    batching.add_argument("--rounds", type=_positive_int, default=3, help="A/B windows each (default 3)")
    batching.set_defaults(run=_run_bench_batching)

    train_bench = bench_kinds.add_parser(
        "train", help="training examples/s on MovieLens-100K (full step) vs the dense part alone",
        description="Times full training steps (lookup, pooling, forward, backward, sparse Adagrad + dense Adam "
        "updates, touched-row tracking) over the first 80%% of MovieLens-100K on one thread, and the dense "
        "forward/backward/update alone on the same batches as the floor.")
    train_bench.add_argument("--batch", type=_positive_int, default=1024, help="examples per step (default 1024)")
    train_bench.add_argument("--json", action="store_true", help="print one JSON object")
    train_bench.set_defaults(run=_run_bench_train)

    apply = bench_kinds.add_parser(
        "apply", help="delta updater: read + decode + apply rows/s vs encoding the same rows",
        description="Writes --rows rows of sparse delta records (FIDs from a pool of --rows IDs: inserts and "
        "overwrites) to a delta stream, then times the updater path (segment log read, CRC, decode, validation, "
        "upserts into a live ranker table) against encoding the same records, one thread each, same run.")
    apply.add_argument("--rows", type=_positive_int, default=1_000_000, help="rows in all (default 1000000)")
    apply.add_argument("--dim", type=_positive_int, default=16, help="row length (default 16)")
    apply.add_argument("--rows-per-record", type=_positive_int, default=10_000,
                       help="rows per delta record (default 10000: 50,000 rows/s at a 200 ms sync)")
    apply.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    apply.add_argument("--json", action="store_true", help="print one JSON object")
    apply.set_defaults(run=_run_bench_apply)

    feedback = bench_kinds.add_parser(
        "feedback", help="durable feedback acknowledgements/s with many clients vs one",
        description="Closed-loop gRPC clients send feedback (one click each); an acknowledgement means the action "
        "is fsynced. Measures --clients clients against one client on the same server, in alternating windows "
        "of the same run: acks/s, p50 and p99 latency. Spawns a server unless --url is given.")
    feedback.add_argument("--url", default=None, help="host:port (gRPC) of a running server (default: spawn one)")
    feedback.add_argument("--clients", type=_positive_int, default=8, help="concurrent clients (default 8)")
    feedback.add_argument("--window-s", type=float, default=5.0, help="seconds per window (default 5)")
    feedback.add_argument("--rounds", type=_positive_int, default=2, help="windows per variant (default 2)")
    feedback.add_argument("--json", action="store_true", help="print one JSON object")
    feedback.set_defaults(run=_run_bench_feedback)

    recovery = bench_kinds.add_parser(
        "recovery", help="restart time with a large snapshot plus a minute of deltas",
        description="Writes a serving snapshot of --rows rows and --seconds of deltas at --rows-per-s, then "
        "times a server start until it answers at the last delta_seq; an empty start in the same run is the "
        "baseline.")
    recovery.add_argument("--rows", type=_positive_int, default=1_000_000, help="snapshot rows (default 1000000)")
    recovery.add_argument("--seconds", type=float, default=60.0, help="seconds of deltas (default 60)")
    recovery.add_argument("--rows-per-s", type=float, default=10_000.0, help="delta rows per second (default 10000)")
    recovery.add_argument("--json", action="store_true", help="print one JSON object")
    recovery.set_defaults(run=_run_bench_recovery)

    instances = bench_kinds.add_parser(
        "instances", help="ranker throughput and table memory per instance count",
        description="For each --instances count, spawns monolith-rt serve with that many ranker instances over a "
        "snapshot of --rows rows and measures, in alternating closed-loop windows on tritonserver's own gRPC "
        "port, the ranker's req/s and the baseline model's (same tensors); then the table's bytes and, from "
        "/proc/<pid>/smaps, the table bytes each ranker stub holds privately.")
    instances.add_argument("--instances", default="1,2", help="comma-separated instance counts (default 1,2)")
    instances.add_argument("--rows", type=_positive_int, default=2_000_000, help="table rows (default 2000000)")
    instances.add_argument("--candidates", type=_positive_int, default=100, help="candidates per request (default 100)")
    instances.add_argument("--concurrency", type=_positive_int, default=8, help="clients in flight (default 8)")
    instances.add_argument("--window-s", type=float, default=5.0, help="seconds per window (default 5)")
    instances.add_argument("--rounds", type=_positive_int, default=2, help="windows per model (default 2)")
    instances.add_argument("--private-table", action="store_true",
                           help="each instance with its own private table (model parameter shared_table false)")
    instances.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    instances.add_argument("--json", action="store_true", help="print one JSON object")
    instances.set_defaults(run=_run_bench_instances)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as exc:
        print(f"monolith-rt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
