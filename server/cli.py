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


def _run_bench_table(args: argparse.Namespace) -> int:
    from server.bench import bench_table, format_table_report

    result = bench_table(keys=args.keys, dim=args.dim, batch=args.batch, seed=args.seed)
    if args.json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    else:
        print(format_table_report(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monolith-rt",
        description="Real-time recommendation ranking on Triton with a collisionless embedding table.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
