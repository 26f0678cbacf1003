"""The ``monolith-rt`` command: one entry point; each package registers its own subcommands.

    server/cli.py    main, ``serve``, ``bench table|scoring``, and the helpers every package's commands share
    trainer/cli.py   ``train batch|online``, ``experiment``, ``bench train``
    updater/cli.py   ``deltas ...``, ``bench apply``
    loadtest/cli.py  ``demo``, ``loadtest ...``, ``bench serving|batching|feedback|recovery|instances``

A package's cli module defines ``add_commands(commands, bench)`` (the top-level and the ``bench``
subparsers) and imports its job's modules only inside the handler, so ``--help`` is instant and a
job pulls in only what it needs. ``main`` finds them through the entry-point group
``monolith_rt.commands`` (pyproject.toml), so this lowest package never imports the ones above it:
they import its helpers, not the other way round.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from typing import Callable

import orjson

from server.streams.bus_options import add_bus_options

COMMAND_GROUP = "monolith_rt.commands"
COMMAND_ORDER = ("server", "trainer", "updater", "loadtest")  # the order of their commands in --help


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"requires an integer >= 1, got {text}")
    return value


def emit(result: dict, as_json: bool, text: Callable[[dict], str]) -> None:
    """A command's result on stdout: one JSON object, or ``text(result)``."""
    print(orjson.dumps(result).decode() if as_json else text(result), flush=True)


def key_values(result: dict) -> str:
    return "\n".join(f"{k}: {v}" for k, v in result.items())


def schema():
    """The shipped feature schema (server.features.shipped_schema), imported when a command runs."""
    from server.features import shipped_schema

    return shipped_schema()


def add_api_key_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key-file", default=None,
                        help="file holding the server's API key, for a --url server started with one "
                        "(default: $MONOLITH_API_KEY_FILE, else none)")


def api_key(args: argparse.Namespace) -> str | None:
    from server.front.auth import api_key_file_from, load_api_key

    key = load_api_key(api_key_file_from(args.api_key_file))
    return None if key is None else key.decode()


def _run_bench_table(args: argparse.Namespace) -> int:
    from server.table.table_bench import bench_table, format_table_report

    emit(bench_table(keys=args.keys, dim=args.dim, batch=args.batch, seed=args.seed), args.json,
         format_table_report)
    return 0


def _run_bench_scoring(args: argparse.Namespace) -> int:
    from server.runtime.scoring_bench import bench_scoring, format_scoring_report

    emit(bench_scoring(schema(), requests=args.requests, candidates=args.candidates, calls=args.calls,
                       seed=args.seed, busy_cores=args.busy_cores), args.json, format_scoring_report)
    return 0


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"requires a port 0..65535 (0 = pick a free one), got {text}")
    return value


def _run_serve(args: argparse.Namespace) -> int:
    import logging
    import os

    import uvloop

    from server.clock import TimeWindow
    from server.runtime.ranker import ROW_DTYPE_ENV
    from server.front import ApiKeyError, FrontLimits, api_key_file_from
    from server.host.launcher import DEFAULT_MODEL_REPOSITORY, DataDirInUse, TritonStartError
    from server.streams.bus import BusError
    from server.streams.bus_options import configure_bus
    from server.host.supervisor import RestartPolicy, ServeConfig, Supervisor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        configure_bus(args, "replica")  # the models find it in the environment
        os.environ.update(TimeWindow(args.max_time_ahead_s, args.max_time_behind_s).to_env())  # so does this
        if args.row_dtype is not None:
            os.environ[ROW_DTYPE_ENV] = args.row_dtype  # and this
        config = ServeConfig(
            data_dir=args.data_dir, model_repository=args.model_repository or DEFAULT_MODEL_REPOSITORY,
            host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
            tritonserver=args.tritonserver, startup_timeout_s=args.startup_timeout_s,
            api_key_file=api_key_file_from(args.api_key_file),
            limits=FrontLimits(max_body_bytes=args.max_body_bytes, max_elements_per_input=args.max_elements,
                               max_connections=args.max_connections, read_timeout_s=args.read_timeout_s),
            restarts=RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window_s),
            grpc_direct=args.grpc_direct,
        )
        supervisor = Supervisor(config, announce=lambda text: print(text, flush=True))
    except (ValueError, ApiKeyError, BusError, DataDirInUse) as exc:
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
    bench = commands.add_parser("bench", help="micro-benchmarks, each against its baseline in the same run")
    bench = bench.add_subparsers(dest="bench", required=True, metavar="WHAT")
    registered = {entry.name: entry for entry in entry_points(group=COMMAND_GROUP)}
    if "server" not in registered:
        raise SystemExit(f"monolith-rt: no commands registered under the entry-point group {COMMAND_GROUP!r}: "
                         "the package is not installed (pip install -e . from the repository)")
    for name in sorted(registered, key=lambda n: (COMMAND_ORDER.index(n) if n in COMMAND_ORDER else 99, n)):
        registered[name].load()(commands, bench)
    return parser


def add_commands(commands, bench) -> None:
    """``serve`` and ``bench table|scoring``."""
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
    serve.add_argument("--http-port", type=port, default=8000, help="KServe v2 HTTP port (default 8000; 0 = free)")
    serve.add_argument("--grpc-port", type=port, default=8001, help="KServe v2 gRPC port (default 8001; 0 = free)")
    serve.add_argument("--metrics-port", type=port, default=8002,
                       help="Prometheus metrics port (default 8002; 0 = free)")
    serve.add_argument("--api-key-file", default=None,
                       help="require 'Authorization: Bearer <key>' (HTTP header or gRPC metadata) on everything "
                       "but health and metrics; the file holds the key and must give no access to group or others (mode 0600) "
                       "(default: $MONOLITH_API_KEY_FILE, else no key)")
    serve.add_argument("--max-body-bytes", type=positive_int, default=8 << 20,
                       help="largest request body or gRPC message accepted (default 8 MiB)")
    serve.add_argument("--max-elements", type=positive_int, default=1 << 20,
                       help="most elements one input tensor may declare (default 1048576; the ranker needs at most "
                       "4096 x 8)")
    serve.add_argument("--max-connections", type=positive_int, default=1024,
                       help="most HTTP connections open at once; more are answered 503 and closed (default 1024)")
    serve.add_argument("--read-timeout-s", type=float, default=30.0,
                       help="an HTTP request must arrive whole within this many seconds of its first byte, else "
                       "408 and the connection closes (default 30)")
    serve.add_argument("--max-time-ahead-s", type=float, default=300.0,
                       help="a ranking request's 'timestamp' or a feedback's 'event_time' more than this far ahead "
                       "of the server's clock is refused (default 300; inf: no limit). Absent, the server's receive "
                       "time is used")
    serve.add_argument("--max-time-behind-s", type=float, default=86400.0,
                       help="... and more than this far behind it (default 86400; inf: no limit, for replays of "
                       "recorded times such as the demo)")
    serve.add_argument("--row-dtype", choices=("fp32", "fp16", "int8"), default=None,
                       help="how the serving table stores embedding rows: fp32 (4 bytes a value), fp16 (2), or int8 "
                       "with a per-row scale (1, plus 4 a row). The trainer keeps fp32 and serving reads its rows as "
                       "quantized; `monolith-rt experiment row-dtype` measures the AUC each costs (default: the "
                       "model's row_dtype parameter, fp32)")
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
    add_bus_options(serve)
    serve.set_defaults(run=_run_serve)

    table = bench.add_parser(
        "table",
        help="embedding table lookups/inserts vs a Python dict",
        description="Builds a table of N random FIDs and measures batched inserts and lookups on one "
        "thread, with a Python dict + numpy row fetch as the baseline in the same run.",
    )
    table.add_argument("--keys", type=positive_int, default=4_000_000, help="number of FIDs N (default 4000000)")
    table.add_argument("--dim", type=positive_int, default=16, help="row length D (default 16)")
    table.add_argument("--batch", type=positive_int, default=4096, help="FIDs per call B (default 4096)")
    table.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    table.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    table.set_defaults(run=_run_bench_table)
    scoring = bench.add_parser(
        "scoring", help="the ranker's serving forward vs numpy pooling + the straightforward numpy DeepFM",
        description="Times server.runtime.scoring.DeepFMScorer (pooling, FM, DeepFM, sigmoid for R requests of N "
        "candidates) against the same probabilities computed with numpy pooling and server.dense.deepfm_logits, "
        "one thread each, in the same run (a few seconds).")
    scoring.add_argument("--requests", type=positive_int, default=1, help="requests per call R (default 1)")
    scoring.add_argument("--candidates", type=positive_int, default=100, help="candidates per request N (default 100)")
    scoring.add_argument("--calls", type=positive_int, default=200, help="calls per timed repeat (default 200)")
    scoring.add_argument("--busy-cores", type=int, default=0,
                         help="processes spinning on the CPU during the timing, as a serving host's other work "
                         "(default 0; the machine's core count shows what two BLAS threads cost there)")
    scoring.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    scoring.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    scoring.set_defaults(run=_run_bench_scoring)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as exc:
        print(f"monolith-rt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
