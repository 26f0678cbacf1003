"""``monolith-rt experiment row-dtype``: what fp16 and int8 serving rows cost in AUC and gain in bytes and speed.

The trainer keeps fp32 master rows; a serving table could hold them as fp16
or as int8 with a per-row scale (``server.table.quantize``). Per seed, one
model is trained on the first 80% by time (as ``experiment collisions``
does), then the last 20% is scored three times with the same dense weights
and the embedding rows as each row type serves them (quantized, then back
to float32). The AUC loss of a row type is paired per seed: fp32's AUC minus
its own on the same model, so the seeds' spread does not hide it.

Beside AUC, per row type:
    row_bytes            the row itself (dim 16: 64, 32, 16 + a 4-byte scale)
    slot_bytes           a table slot: key (8) + row + update stamp (8)
    gather_mrows_per_s   random rows read from a table-sized array of that
                         row type and decoded to float32, batches of 4096, one
                         thread, best of 5 interleaved rounds (numba kernels that
                         prefetch 16 rows ahead, as the table's lookup does, and
                         copy a row as it does): what the row type
                         changes in a lookup's memory traffic. int8 rows are
                         packed with their scale (``pack_int8``: D + 4 bytes,
                         one place per row, not two arrays). It is not the
                         cuckoo lookup itself, whose kernels hold fp32 rows.
    score_max_abs_diff   the largest change of a held-out probability
                         against fp32 (same model)

numba has no float16 on the CPU, so the fp16 kernel reads the rows' uint16
bits and decodes them itself: sign, exponent and mantissa shifted into a
float32's places, times 2**112 (exact for every finite half; inf and nan
are never stored, see quantize.py). A serving table would do the same.
Without the prefetch the decode's extra work cut the misses in flight and
fp16 gathered at 0.56x fp32's rate (ML-1M run of 3b4f6d4); with it, faster.
"""

from __future__ import annotations

import sys
import time

import numba
import numpy as np

from server.features import FeatureSchema
from server.table import EmbeddingTable
from server.table._atomics import prefetch
from server.table.quantize import ROW_DTYPES, bytes_per_row, quantize_rows, quantized
from trainer.data import DATASET_TITLES, Examples
from trainer.experiments import experiment_examples, seeded_model, train_span
from trainer.model import TrainerModel, auc

_KEY_BYTES = 8
_STAMP_BYTES = 8
_GATHER_ROWS = 4_000_000
_QUICK_GATHER_ROWS = 100_000
_GATHER_BATCH = 4096
_GATHER_ROUNDS = 5
_HALF_SCALE = np.float32(2.0**112)  # 2**(127 - 15): float32's exponent bias minus fp16's
_PREFETCH_AHEAD = 16  # rows, as the table's lookup prefetches


@numba.njit(cache=True, nogil=True)
def _gather_fp32(rows, positions, out):
    n = positions.shape[0]
    for i in range(n):
        if i + _PREFETCH_AHEAD < n:
            prefetch(rows, positions[i + _PREFETCH_AHEAD])
        p = positions[i]
        for j in range(out.shape[1]):
            out[i, j] = rows[p, j]


@numba.njit(cache=True, nogil=True)
def _gather_fp16(bits, positions, out):
    """bits: the fp16 rows as uint16. A half's sign, exponent and mantissa moved to a float32's bit
    positions make a float32 2**112 times too small (fp16's exponent bias is 15, float32's 127):
    one multiply gives the exact value, subnormals and -0 included."""
    n = positions.shape[0]
    scratch = np.empty(out.shape[1], dtype=np.uint32)
    scratch_f = scratch.view(np.float32)
    for i in range(n):
        if i + _PREFETCH_AHEAD < n:
            prefetch(bits, positions[i + _PREFETCH_AHEAD])
        p = positions[i]
        for j in range(out.shape[1]):
            h = np.uint32(bits[p, j])
            scratch[j] = ((h & np.uint32(0x8000)) << np.uint32(16)) | ((h & np.uint32(0x7FFF)) << np.uint32(13))
        for j in range(out.shape[1]):
            out[i, j] = scratch_f[j] * _HALF_SCALE


@numba.njit(cache=True, nogil=True)
def _gather_int8(packed, scales, positions, out):
    """packed: int8[N, D + 4], each row's values then its float32 scale; scales: the same memory as
    float32[N, (D + 4) / 4], so the scale column is D / 4. One row, one place in memory."""
    n = positions.shape[0]
    column = out.shape[1] // 4
    for i in range(n):
        if i + _PREFETCH_AHEAD < n:
            prefetch(packed, positions[i + _PREFETCH_AHEAD])
        p = positions[i]
        scale = scales[p, column]
        for j in range(out.shape[1]):
            out[i, j] = np.float32(packed[p, j]) * scale


def pack_int8(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 rows and their scales as one int8[N, D + 4] array, each row's scale after its values
    (D a multiple of 4), so a random read of a row touches one place, not two arrays."""
    if values.shape[1] % 4:
        raise ValueError(f"packed int8 rows require a dim that is a multiple of 4, got {values.shape[1]}")
    packed = np.empty((values.shape[0], values.shape[1] + 4), dtype=np.int8)
    packed[:, : values.shape[1]] = values
    packed[:, values.shape[1]:] = scales.astype("<f4").view(np.int8).reshape(-1, 4)
    return packed


def _gather(row_dtype: str, stored: tuple, positions: np.ndarray, out: np.ndarray) -> None:
    if row_dtype == "fp32":
        _gather_fp32(stored[0], positions, out)
    elif row_dtype == "fp16":
        _gather_fp16(stored[0], positions, out)
    else:
        _gather_int8(stored[0], stored[1], positions, out)


def gather_rates(rows: int, dim: int, seed: int = 0) -> dict[str, float]:
    """Million random rows per second read and decoded per row type (see the module docstring)."""
    rng = np.random.default_rng(seed)
    master = rng.standard_normal((rows, dim), dtype=np.float32) * np.float32(0.05)
    stored = {}
    for row_dtype in ROW_DTYPES:
        values, scales = quantize_rows(master, row_dtype)
        if row_dtype == "int8":
            packed = pack_int8(values, scales)
            stored[row_dtype] = (packed, packed.view(np.float32))
        else:
            stored[row_dtype] = (values.view(np.uint16) if row_dtype == "fp16" else values, None)
    del master
    lookups = max(_GATHER_BATCH, min(rows, 2_000_000))
    positions = rng.integers(0, rows, lookups)
    out = np.empty((_GATHER_BATCH, dim), dtype=np.float32)
    for row_dtype in ROW_DTYPES:  # compile, and check the decode against numpy's on the first batch
        _gather(row_dtype, stored[row_dtype], positions[:_GATHER_BATCH], out)
        first = stored[row_dtype][0][positions[:_GATHER_BATCH]]
        if row_dtype == "fp16":
            first = first.view(np.float16)
        elif row_dtype == "int8":
            first = first[:, :dim].astype(np.float32) * first[:, dim:].copy().view(np.float32)
        np.testing.assert_array_equal(out, first.astype(np.float32))
    best = {t: float("inf") for t in ROW_DTYPES}
    for _ in range(_GATHER_ROUNDS):
        for row_dtype in ROW_DTYPES:
            t0 = time.perf_counter()
            for a in range(0, lookups, _GATHER_BATCH):
                b = min(lookups, a + _GATHER_BATCH)
                _gather(row_dtype, stored[row_dtype], positions[a:b], out[: b - a])
            best[row_dtype] = min(best[row_dtype], time.perf_counter() - t0)
    return {t: round(lookups / best[t] / 1e6, 2) for t in ROW_DTYPES}


def _predict_as(model: TrainerModel, row_dtype: str, user: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Held-out probabilities with the model's embedding rows as a ``row_dtype`` table serves them."""
    served = EmbeddingTable(model.dim, capacity=max(1024, int(len(model.table) / 0.9)))
    for fids, rows, stamps in model.table.items():
        served.upsert(fids, quantized(rows[:, : model.dim], row_dtype), now=stamps)
    trained, model.table = model.table, served
    try:
        return model.predict(user, items)
    finally:
        model.table = trained


def run_row_dtype(schema: FeatureSchema, seeds: int, quick: bool, examples: Examples | None = None,
                  dataset: str = "ml-100k", gather_rows: int | None = None) -> dict:
    """AUC per row type (paired loss against fp32), bytes per row and decode-gather rate; see the module doc."""
    ex = experiment_examples(schema, dataset, quick, examples)
    split = int(len(ex) * 0.8)
    user, items, labels = ex.user_fids[split:], ex.item_fids[split:], ex.labels[split:]
    aucs: dict[str, list[float]] = {t: [] for t in ROW_DTYPES}
    diffs: dict[str, list[float]] = {t: [] for t in ROW_DTYPES}
    table_rows = []
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
            print(f"[row-dtype] seed {seed}: {row_dtype} AUC {aucs[row_dtype][-1]:.5f}", file=sys.stderr, flush=True)
    gather_rows = gather_rows or (_QUICK_GATHER_ROWS if quick else _GATHER_ROWS)
    print(f"[row-dtype] gather of random rows from {gather_rows:,} x {schema.dim}", file=sys.stderr, flush=True)
    rates = gather_rates(gather_rows, schema.dim)
    rows = []
    for row_dtype in ROW_DTYPES:
        loss = np.array(aucs["fp32"]) - np.array(aucs[row_dtype])
        row_bytes = bytes_per_row(schema.dim, row_dtype)
        rows.append({"variant": row_dtype, "auc_mean": round(float(np.mean(aucs[row_dtype])), 5),
                     "auc_std": round(float(np.std(aucs[row_dtype])), 5), "seeds": seeds,
                     "aucs": [round(a, 6) for a in aucs[row_dtype]],
                     "auc_loss_mean": round(float(loss.mean()), 6) + 0.0,  # + 0.0: no -0.0 in the table
                     "auc_loss_max": round(float(loss.max()), 6) + 0.0,
                     "score_max_abs_diff": float(f"{max(diffs[row_dtype]):.3g}"), "row_bytes": row_bytes,
                     "slot_bytes": _KEY_BYTES + row_bytes + _STAMP_BYTES,
                     "gather_mrows_per_s": rates[row_dtype],
                     "gather_vs_fp32": round(rates[row_dtype] / rates["fp32"], 3)})
    return {"experiment": "row-dtype", "dataset": dataset, "rows": rows, "dim": schema.dim,
            "train_examples": split, "test_examples": len(ex) - split, "table_rows": table_rows,
            "gather_rows": gather_rows, "gather_batch": _GATHER_BATCH, "targets": {"fp16": 0.001, "int8": 0.003}}


def format_row_dtype(result: dict) -> str:
    title = DATASET_TITLES.get(result["dataset"], result["dataset"])
    lines = [f"row-dtype ({title}, time-ordered; dim {result['dim']}, {result['rows'][0]['seeds']} seeds; gather "
             f"from {result['gather_rows']:,} rows)",
             f"  {'row type':<8} {'AUC mean':>9} {'loss vs fp32':>13} {'max loss':>9} {'row B':>6} {'slot B':>7} "
             f"{'gather Mrows/s':>15} {'vs fp32':>8}"]
    for r in result["rows"]:
        lines.append(f"  {r['variant']:<8} {r['auc_mean']:>9.5f} {r['auc_loss_mean']:>13.6f} {r['auc_loss_max']:>9.6f} "
                     f"{r['row_bytes']:>6} {r['slot_bytes']:>7} {r['gather_mrows_per_s']:>15.2f} "
                     f"{r['gather_vs_fp32']:>8.3f}")
    return "\n".join(lines)
