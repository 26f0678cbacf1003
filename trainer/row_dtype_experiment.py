"""``monolith-rt experiment row-dtype``: what fp16 and int8 serving rows cost in AUC and gain in bytes and speed.

The trainer keeps fp32 master rows; a serving table holds them in its row
type (``monolith-rt serve --row-dtype``, server.table.quantize): fp32, fp16,
or int8 with a per-row scale. Per seed, one model is trained on the first 80%
by time (as ``experiment collisions`` does), then the last 20% is scored
three times with the same dense weights and the model's rows upserted into a
serving table of each row type, which quantizes them as ``serve`` does. The
AUC loss of a row type is paired per seed: fp32's AUC minus its own on the
same model, so the seeds' spread does not hide it.

Beside AUC, per row type, all in the same run:
    row_bytes              the stored row (dim 16: 64, 32, 16 + a 4-byte scale)
    slot_bytes             a table slot: key (8) + row + update stamp (8)
    table_bytes_per_row    a table of ``lookup_rows`` random FIDs, presized at the growth bound (0.98) as
                           ``bench table`` presizes one: its arrays (``EmbeddingTable.nbytes``: keys, rows,
                           stamps, seqlock versions) over its rows (free slots included: 4M rows fill 0.954
                           of 2**22 slots)
    lookup_mkeys_per_s     the cuckoo lookup (server.table.cuckoo.lookup_batch, decoding to float32) on that
                           table: present FIDs in random order, batches of 4096, one thread, best of 5 rounds,
                           the row types interleaved; ``gather_mrows_per_s`` is a numpy gather of as many
                           random rows from a dense fp32 array of the same size, the memory-bound floor
    ranker_cpu_us_per_request   CPU time (this thread) of ``RankerRuntime.score`` per ranking request of
                           ``candidates`` held-out items (table lookup + the numpy forward), the last seed's
                           model served from a snapshot in that row type; 1,000 requests, best of 5 interleaved rounds
    score_max_abs_diff     the largest change of a held-out probability against fp32 (same model)

What it does not show: the ML-1M table (~10k rows) fits in cache, so its
ranker CPU measures the decode, not memory traffic. On the large table a
lookup misses twice whatever the row type (the bucket's line, then the
row's), so narrower rows save memory more than time.
"""

from __future__ import annotations

import sys
import tempfile
import time

import numpy as np

from server.features import FeatureSchema
from server.runtime.ranker import RankerRuntime, RankRequest
from server.streams.snapshots import write_snapshot
from server.table import EmbeddingTable
from server.table.cuckoo import SLOTS
from server.table.quantize import ROW_DTYPES, bytes_per_row, quantized
from trainer.data import DATASET_TITLES, Examples
from trainer.experiments import experiment_examples, seeded_model, train_span
from trainer.model import TrainerModel, auc

_KEY_BYTES = 8
_STAMP_BYTES = 8
_LOOKUP_ROWS = 4_000_000
_QUICK_LOOKUP_ROWS = 100_000
_BATCH = 4096
_ROUNDS = 5
_CANDIDATES = 100
_SCORED_REQUESTS = 1000


def _progress(message: str) -> None:
    print(f"[row-dtype] {message}", file=sys.stderr, flush=True)


def _presized(dim: int, rows: int, row_dtype: str) -> EmbeddingTable:
    """An empty table sized as ``EmbeddingTable.load`` sizes one for ``rows`` rows."""
    return EmbeddingTable(dim, capacity=int(rows / 0.9) + SLOTS, row_dtype=row_dtype)


def lookup_rates(rows: int, dim: int, seed: int = 0) -> dict:
    """Per row type: lookup M keys/s and table bytes per row on a table of ``rows`` random FIDs, plus the numpy
    gather of as many random rows from a dense fp32 array (``gather``); see the module docstring."""
    rng = np.random.default_rng(seed)
    fids = np.unique(rng.integers(1, 2**63 - 1, rows, dtype=np.int64)).view(np.uint64)
    rng.shuffle(fids)
    master = rng.standard_normal((fids.shape[0], dim), dtype=np.float32) * np.float32(0.05)
    tables, figures = {}, {}
    for row_dtype in ROW_DTYPES:
        _progress(f"a {row_dtype} table of {fids.shape[0]:,} rows")
        table = EmbeddingTable(dim, capacity=int(fids.shape[0] / 0.98) + 1, row_dtype=row_dtype)
        for a in range(0, fids.shape[0], 1 << 16):
            table.upsert(fids[a:a + (1 << 16)], master[a:a + (1 << 16)], now=1.0)
        figures[row_dtype] = {"table_bytes_per_row": round(table.nbytes / len(table), 1)}
        tables[row_dtype] = table
    queries = fids[rng.permutation(fids.shape[0])]
    positions = rng.integers(0, fids.shape[0], fids.shape[0])
    out = np.empty((_BATCH, dim), dtype=np.float32)
    order = np.argsort(fids)
    first = master[order[np.searchsorted(fids[order], queries[:_BATCH])]]
    for row_dtype, table in tables.items():  # compiled, and serving the rows as quantized
        table.lookup(queries[:_BATCH], out=out)
        if not np.array_equal(out, quantized(first, row_dtype)):
            raise AssertionError(f"the {row_dtype} table's lookups are not its rows as quantized")
    runs = {**{t: (lambda a, b, t=t: tables[t].lookup(queries[a:b], out=out[: b - a])) for t in ROW_DTYPES},
            "gather": lambda a, b: np.take(master, positions[a:b], axis=0, out=out[: b - a])}
    best = {name: float("inf") for name in runs}
    _progress(f"lookups of {fids.shape[0]:,} present FIDs per row type and a numpy gather, best of {_ROUNDS} "
              f"interleaved rounds")
    for _ in range(_ROUNDS):
        for name, run in runs.items():
            t0 = time.perf_counter()
            for a in range(0, fids.shape[0], _BATCH):
                run(a, min(fids.shape[0], a + _BATCH))
            best[name] = min(best[name], time.perf_counter() - t0)
    for row_dtype in ROW_DTYPES:
        figures[row_dtype]["lookup_mkeys_per_s"] = round(fids.shape[0] / best[row_dtype] / 1e6, 2)
    return {"rows": fids.shape[0], "gather_mrows_per_s": round(fids.shape[0] / best["gather"] / 1e6, 2),
            "row_types": figures}


def ranker_cpu_us(model: TrainerModel, schema: FeatureSchema, user: np.ndarray, items: np.ndarray) -> dict:
    """CPU microseconds of ``RankerRuntime.score`` per request of up to _CANDIDATES held-out items, per row type."""
    requests = [RankRequest(b"r", 1.0, user[a], items[a:a + _CANDIDATES])
                for a in range(0, min(len(user), _SCORED_REQUESTS * _CANDIDATES), _CANDIDATES)]
    best = {t: float("inf") for t in ROW_DTYPES}
    with tempfile.TemporaryDirectory(prefix="row-dtype-") as tmp:
        write_snapshot(tmp, model.serving_table(), model.dense_state(), 1)
        runtimes = {t: RankerRuntime(schema, tmp, f"bench-{t}", row_dtype=t) for t in ROW_DTYPES}
        try:
            for round_ in range(_ROUNDS):
                for row_dtype in ROW_DTYPES[round_ % 3:] + ROW_DTYPES[:round_ % 3]:  # each goes first in turn
                    runtime = runtimes[row_dtype]
                    t0 = time.thread_time()
                    for request in requests:
                        runtime.score([request])
                    best[row_dtype] = min(best[row_dtype], time.thread_time() - t0)
        finally:
            for runtime in runtimes.values():
                runtime.close(snapshot=False)
    return {t: round(best[t] / len(requests) * 1e6, 1) for t in ROW_DTYPES}


def _predict_as(model: TrainerModel, row_dtype: str, user: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Held-out probabilities with the model's embedding rows in a serving table of ``row_dtype``."""
    served = _presized(model.dim, len(model.table), row_dtype)
    for fids, rows, stamps in model.table.items():
        served.upsert(fids, rows[:, : model.dim], now=stamps)
    trained, model.table = model.table, served
    try:
        return model.predict(user, items)
    finally:
        model.table = trained


def run_row_dtype(schema: FeatureSchema, seeds: int, quick: bool, examples: Examples | None = None,
                  dataset: str = "ml-100k", lookup_rows: int | None = None) -> dict:
    """AUC per row type (paired loss against fp32), bytes per row, lookup rate and ranker CPU per request;
    see the module doc."""
    ex = experiment_examples(schema, dataset, quick, examples)
    split = int(len(ex) * 0.8)
    user, items, labels = ex.user_fids[split:], ex.item_fids[split:], ex.labels[split:]
    aucs: dict[str, list[float]] = {t: [] for t in ROW_DTYPES}
    diffs: dict[str, list[float]] = {t: [] for t in ROW_DTYPES}
    table_rows = []
    model = None
    for seed in range(seeds):
        model = seeded_model(schema, seed)
        train_span(model, ex, ex.user_fids, ex.item_fids, 0, split)
        table_rows.append(len(model.table))
        reference = None
        for row_dtype in ROW_DTYPES:
            scores = _predict_as(model, row_dtype, user, items)
            reference = scores if reference is None else reference
            aucs[row_dtype].append(auc(labels, scores))
            diffs[row_dtype].append(float(np.abs(scores - reference).max()))
            _progress(f"seed {seed}: {row_dtype} AUC {aucs[row_dtype][-1]:.5f}")
    _progress(f"ranker CPU per request of {_CANDIDATES} held-out candidates (seed {seeds - 1}'s model)")
    cpu = ranker_cpu_us(model, schema, user, items)
    lookups = lookup_rates(lookup_rows or (_QUICK_LOOKUP_ROWS if quick else _LOOKUP_ROWS), schema.dim)
    rows = []
    for row_dtype in ROW_DTYPES:
        loss = np.array(aucs["fp32"]) - np.array(aucs[row_dtype])
        row_bytes = bytes_per_row(schema.dim, row_dtype)
        measured = lookups["row_types"][row_dtype]
        rows.append({"variant": row_dtype, "auc_mean": round(float(np.mean(aucs[row_dtype])), 5),
                     "auc_std": round(float(np.std(aucs[row_dtype])), 5), "seeds": seeds,
                     "aucs": [round(a, 6) for a in aucs[row_dtype]],
                     "auc_loss_mean": round(float(loss.mean()), 6) + 0.0,  # + 0.0: no -0.0 in the table
                     "auc_loss_max": round(float(loss.max()), 6) + 0.0,
                     "score_max_abs_diff": float(f"{max(diffs[row_dtype]):.3g}"), "row_bytes": row_bytes,
                     "slot_bytes": _KEY_BYTES + row_bytes + _STAMP_BYTES,
                     "table_bytes_per_row": measured["table_bytes_per_row"],
                     "lookup_mkeys_per_s": measured["lookup_mkeys_per_s"],
                     "lookup_vs_fp32": round(measured["lookup_mkeys_per_s"]
                                             / lookups["row_types"]["fp32"]["lookup_mkeys_per_s"], 3),
                     "ranker_cpu_us_per_request": cpu[row_dtype],
                     "ranker_cpu_vs_fp32": round(cpu[row_dtype] / cpu["fp32"], 3)})
    return {"experiment": "row-dtype", "dataset": dataset, "rows": rows, "dim": schema.dim,
            "train_examples": split, "test_examples": len(ex) - split, "table_rows": table_rows,
            "lookup_rows": lookups["rows"], "lookup_batch": _BATCH, "gather_mrows_per_s": lookups["gather_mrows_per_s"],
            "candidates_per_request": _CANDIDATES, "targets": {"fp16": 0.001, "int8": 0.003}}


def format_row_dtype(result: dict) -> str:
    title = DATASET_TITLES.get(result["dataset"], result["dataset"])
    lines = [f"row-dtype ({title}, time-ordered; dim {result['dim']}, {result['rows'][0]['seeds']} seeds; lookups "
             f"on {result['lookup_rows']:,} rows, numpy gather {result['gather_mrows_per_s']:.2f} M rows/s; ranker "
             f"CPU per request of {result['candidates_per_request']} candidates)",
             f"  {'row type':<8} {'AUC mean':>9} {'loss vs fp32':>13} {'max loss':>9} {'row B':>6} {'table B/row':>12} "
             f"{'lookup M/s':>11} {'vs fp32':>8} {'ranker CPU us':>14} {'vs fp32':>8}"]
    for r in result["rows"]:
        lines.append(f"  {r['variant']:<8} {r['auc_mean']:>9.5f} {r['auc_loss_mean']:>13.6f} {r['auc_loss_max']:>9.6f} "
                     f"{r['row_bytes']:>6} {r['table_bytes_per_row']:>12.1f} {r['lookup_mkeys_per_s']:>11.2f} "
                     f"{r['lookup_vs_fp32']:>8.3f} {r['ranker_cpu_us_per_request']:>14.1f} "
                     f"{r['ranker_cpu_vs_fp32']:>8.3f}")
    return "\n".join(lines)
