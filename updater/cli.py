"""``monolith-rt deltas inspect|verify|produce|hold|resume|rollback`` and ``bench apply|rollback|scale``: the updater's commands."""

from __future__ import annotations

import argparse
import sys

from server.cli import emit, key_values, positive_int, schema

DEFAULT_SCALE_ROWS = (1_000_000, 4_000_000, 16_000_000, 64_000_000)


def add_commands(commands, bench) -> None:
    deltas = commands.add_parser("deltas", help="inspect, verify or feed a delta stream")
    actions = deltas.add_subparsers(dest="action", required=True, metavar="ACTION")
    inspect = actions.add_parser("inspect", help="per segment: seq range, record kinds, rows, bytes",
                                 description="Reads every record of a delta stream directory and summarises "
                                 "each segment. Exits 1 on the first corrupt record.")
    inspect.add_argument("path", help="delta stream directory (e.g. data/deltas)")
    inspect.set_defaults(run=_run_inspect)
    verify = actions.add_parser("verify", help="check every checksum and sequence number",
                                description="Exit code 0 when every record checks out, 1 otherwise (the "
                                "message names the segment and offset of the first bad record).")
    verify.add_argument("path", help="delta stream directory")
    verify.set_defaults(run=_run_verify)
    produce = actions.add_parser("produce", help="write synthetic sparse deltas at a given rate",
                                 description="Appends real sparse delta records (random FIDs and rows) to a "
                                 "delta stream, for load tests. Only one writer may hold a stream at a time.")
    produce.add_argument("path", help="delta stream directory")
    produce.add_argument("--rows-per-s", type=float, required=True, help="rows per second to write")
    produce.add_argument("--duration-s", type=float, default=10.0, help="how long to run (default 10)")
    produce.add_argument("--interval-s", type=float, default=0.1, help="seconds between records (default 0.1)")
    produce.add_argument("--dim", type=positive_int, default=16, help="row length (default 16)")
    produce.add_argument("--key-space", type=positive_int, default=100_000,
                         help="FIDs are drawn from 1..KEY_SPACE (default 100000)")
    produce.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    produce.set_defaults(run=_run_produce)
    for verb, text in (("hold", "stop the trainer's sparse emission (it keeps training)"),
                       ("resume", "let the trainer emit again (what it held goes out with the next sync; an "
                        "expiry pass held by the expiry breaker runs then)")):
        control = actions.add_parser(verb, help=text, description=f"{text[0].upper()}{text[1:]}. Written durably "
                                     "to <data-dir>/guard/control.json; a running trainer acts on it within 0.5 s, "
                                     "one started later starts in that state.")
        control.add_argument("--data-dir", default="data", help="data directory of the trainer (default ./data)")
        control.set_defaults(run=_run_hold, hold=verb == "hold")
    rollback = actions.add_parser(
        "rollback", help="append records that restore every server to the state at --to-seq",
        description="Rebuilds the state at seq S (newest retained snapshot at or before S, then the records up "
        "to S) of every row and of the dense weights changed after S, and appends it as ordinary delta records "
        "(absolute rows, deletes for rows created after S); servers apply them like any delta. Refused when S is "
        "outside the retained range, oldest base .. last seq (a base: seq 0 while the stream starts at seq 1, or "
        "a snapshot whose later records are all retained), which the refusal names. With a trainer running, the "
        "trainer does it (and restores its own rows). Reads the records from the base snapshot to the head of "
        "the stream; on a JetStream bus (MONOLITH_BUS) the snapshot comes from its object store and the records "
        "from its DELTAS stream.")
    rollback.add_argument("--data-dir", default="data", help="data directory (default ./data)")
    rollback.add_argument("--to-seq", type=int, required=True, help="the seq whose state to restore")
    rollback.add_argument("--wait-s", type=float, default=30.0,
                          help="with a trainer running, how long to wait for it (default 30)")
    rollback.set_defaults(run=_run_rollback)

    apply = bench.add_parser(
        "apply", help="delta updater: read + decode + apply rows/s vs encoding the same rows",
        description="Writes --rows rows of sparse delta records (FIDs from a pool of --rows IDs: inserts and "
        "overwrites) to a delta stream, then times the updater path (segment log read, CRC, decode, validation, "
        "upserts into a live ranker table) against encoding the same records, one thread each, same run.")
    apply.add_argument("--rows", type=positive_int, default=1_000_000, help="rows in all (default 1000000)")
    apply.add_argument("--dim", type=positive_int, default=16, help="row length (default 16)")
    apply.add_argument("--rows-per-record", type=positive_int, default=10_000,
                       help="rows per delta record (default 10000: 50,000 rows/s at a 200 ms sync)")
    apply.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    apply.add_argument("--json", action="store_true", help="print one JSON object")
    apply.set_defaults(run=_run_bench_apply)

    scale = bench.add_parser(
        "scale", help="the table's cost curve: lookup, insert, growth stalls, snapshots, recovery, bytes per row "
        "at 1M..64M rows",
        description="For each size N, on the table the ranker serves from (the shared table in /dev/shm, or "
        "--private-table): inserts into a table presized for N and lookups in random order (M keys/s); "
        "resident bytes per row; one doubling of the table (a copy of every row into a new generation) while "
        "a reader thread, a reader process (shared table) and the delta applier keep going, with the longest "
        "lookup and the longest apply it caused; snapshot write and cold load; recovery to ready (a new ranker "
        "runtime on the data dir, until it answers a lookup). A size whose peak memory (both generations of a "
        "doubling; a snapshot load's arrays plus its table) exceeds MemAvailable is skipped, saying so. "
        "Progress on stderr; one JSON object with --json. 1M..64M took 21-25 minutes on a busy 2-core VM and needs "
        "~17 GB free at 64M (~22 GB for the shared table's recovery, which holds a private table and the shared one).")
    scale.add_argument("--rows", type=_sizes, default=list(DEFAULT_SCALE_ROWS),
                       help="comma-separated table sizes N (default 1000000,4000000,16000000,64000000)")
    scale.add_argument("--dim", type=positive_int, default=16, help="row length (default 16)")
    scale.add_argument("--batch", type=positive_int, default=4096,
                       help="FIDs per insert and per timed lookup call; readers during growth look up a quarter "
                       "of it every ms (default 4096)")
    scale.add_argument("--record-rows", type=positive_int, default=4096,
                       help="rows per delta record applied during growth, half new FIDs (default 4096)")
    scale.add_argument("--lookups", type=positive_int, default=1 << 21,
                       help="FIDs looked up per timed pass (default 2097152)")
    scale.add_argument("--private-table", action="store_true",
                       help="one instance's private EmbeddingTable instead of the shared table")
    scale.add_argument("--work-dir", default=None,
                       help="where snapshots are written (default: the system temp directory; needs ~80 bytes "
                       "per row)")
    scale.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    scale.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    scale.set_defaults(run=_run_bench_scale)

    rollback_bench = bench.add_parser(
        "rollback", help="a rollback's cost per bus: rows changed since S, records replayed, plan and apply seconds",
        description="Writes --records sparse records of --rows-per-record rows (a snapshot after the first quarter, "
        "S at the half), then times planning the rollback to S (base snapshot, records since) and appending it, "
        "on each --bus: local segment files, and a spawned 3-node nats-server cluster (JetStream: snapshot from "
        "the object store, records from the DELTAS stream, fenced appends).")
    rollback_bench.add_argument("--bus", choices=("local", "nats", "both"), default="both",
                                help="which bus (default both)")
    rollback_bench.add_argument("--records", type=positive_int, default=40, help="records written (default 40)")
    rollback_bench.add_argument("--rows-per-record", type=positive_int, default=5000,
                                help="rows per record (default 5000)")
    rollback_bench.add_argument("--pool", type=positive_int, default=200_000,
                                help="FIDs drawn from this many IDs (default 200000)")
    rollback_bench.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    rollback_bench.add_argument("--json", action="store_true", help="print one JSON object")
    rollback_bench.set_defaults(run=_run_bench_rollback)


def _run_inspect(args: argparse.Namespace) -> int:
    from updater import tools

    return tools.print_inspect(args.path)


def _run_verify(args: argparse.Namespace) -> int:
    from updater import tools

    ok, message = tools.verify(args.path)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _run_produce(args: argparse.Namespace) -> int:
    from updater import tools

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


def _run_hold(args: argparse.Namespace) -> int:
    from updater.rollback import set_hold

    print(set_hold(args.data_dir, args.hold))
    return 0


def _run_rollback(args: argparse.Namespace) -> int:
    from server.streams.bus import BusError
    from updater.rollback import RollbackRangeError, rollback_now

    try:
        print(rollback_now(args.data_dir, args.to_seq, schema(), args.wait_s))
    except (RollbackRangeError, TimeoutError, BusError) as exc:
        print(f"monolith-rt deltas rollback: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_bench_rollback(args: argparse.Namespace) -> int:
    from updater.rollback_bench import bench_rollback

    buses = ["local", "nats"] if args.bus == "both" else [args.bus]
    emit(bench_rollback(schema(), buses, args.records, args.rows_per_record, args.pool, args.seed), args.json,
         key_values)
    return 0


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"requires comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"requires sizes >= 1, got {text!r}")
    return sizes


def _run_bench_scale(args: argparse.Namespace) -> int:
    from updater.scale_bench import ScaleConfig, bench_scale, format_scale_report

    config = ScaleConfig(dim=args.dim, batch=args.batch, shared=not args.private_table, record_rows=args.record_rows,
                         lookups=args.lookups, seed=args.seed)
    emit(bench_scale(schema(), args.rows, config, args.work_dir), args.json, format_scale_report)
    return 0


def _run_bench_apply(args: argparse.Namespace) -> int:
    from updater.apply_bench import bench_apply

    emit(bench_apply(schema(), args.rows, args.dim, args.rows_per_record, args.seed), args.json, key_values)
    return 0
