"""``monolith-rt bench scoring``: the serving forward against the straightforward numpy forward.

For R requests of N candidates in the shipped schema's layout (random rows,
padding as real requests have it), per call, best of several repeats:
    scorer_us   server.runtime.scoring.DeepFMScorer (numba pass + two BLAS products)
    reference_us  the same probabilities the straightforward way: pooling in
                numpy, the user fields repeated per candidate, the DeepFM in
                numpy (server.dense.deepfm_logits), then a sigmoid
    speedup     reference_us / scorer_us
    scorer_2_blas_threads_us   the scorer with numpy's BLAS on two threads (OpenBLAS
                splits products past 2^18 multiply-adds): why the stub pins one
Both run on one thread (the ranker stub's setting, compute_threads 1), in
the same run, after a warm-up; inputs are built before any timer starts.
``busy_cores`` processes spin on the CPU meanwhile, as a serving host's other
work does (with every core busy, BLAS threads wait for one).
"""

from __future__ import annotations

import time

import numpy as np
import threadpoolctl

from server.benchmarks import BusyCores
from server.dense import deepfm_logits, initial_dense_state
from server.features import PAD_FID, FeatureSchema
from server.runtime.scoring import DeepFMScorer

_REPEATS = 7


def reference_pool(rows: np.ndarray, fids: np.ndarray, slots) -> np.ndarray:
    """Per slot, the sum (or mean) of the rows of its non-PAD columns, in numpy:
    rows [N, W, K], fids [N, W] -> [N, F_side, K]."""
    out, col = [], 0
    for s in slots:
        block, present = rows[:, col : col + s.max_values], fids[:, col : col + s.max_values] != PAD_FID
        total = (block * present[..., None]).sum(axis=1)
        if s.pooling == "mean":
            total /= np.maximum(present.sum(axis=1), 1)[:, None]
        out.append(total)
        col += s.max_values
    return np.stack(out, axis=1)


def reference_probs(state, schema: FeatureSchema, user_rows, user, item_rows, items, counts,
                    dtype=np.float32) -> np.ndarray:
    """The probabilities DeepFMScorer computes from the dense state ``state``, the straightforward way
    (in ``dtype``; float64 gives the exact reference the tests bound float32 error against)."""
    k = schema.dim
    user_fields = reference_pool(user_rows.reshape(*user.shape, k).astype(dtype), user, schema.user_slots)
    item_fields = reference_pool(item_rows.reshape(*items.shape, k).astype(dtype), items, schema.item_slots)
    fields = np.concatenate([np.repeat(user_fields, counts, axis=0), item_fields], axis=1).astype(dtype)
    return np.exp(-np.logaddexp(0, -deepfm_logits(state, fields)))  # sigmoid, without overflow


def _best_us(fn, calls: int) -> float:
    fn()
    best = float("inf")
    for _ in range(_REPEATS):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def bench_scoring(schema: FeatureSchema, requests: int = 1, candidates: int = 100, calls: int = 200,
                  seed: int = 0, busy_cores: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    state = initial_dense_state(schema.num_fields, schema.dim, schema.dense)
    counts = np.full(requests, candidates, dtype=np.int64)
    user = rng.integers(1, 2**40, (requests, schema.user_width), dtype=np.uint64)
    items = rng.integers(1, 2**40, (requests * candidates, schema.item_width), dtype=np.uint64)
    items[:, schema.item_column_slots == schema.item_column_slots[-1]] = PAD_FID  # the last slot padded, ...
    items[rng.random(items.shape) < 0.5] = PAD_FID  # ... and half of all columns
    user_rows = (rng.standard_normal((user.size, schema.dim)) * 0.1).astype(np.float32)
    item_rows = (rng.standard_normal((items.size, schema.dim)) * 0.1).astype(np.float32)
    scorer = DeepFMScorer(state, schema)
    with BusyCores(busy_cores), threadpoolctl.threadpool_limits(1, user_api="blas"):
        got = scorer(user_rows, user, item_rows, items, counts)
        expected = reference_probs(state, schema, user_rows, user, item_rows, items, counts)
        scorer_us = _best_us(lambda: scorer(user_rows, user, item_rows, items, counts), calls)
        with threadpoolctl.threadpool_limits(2, user_api="blas"):
            scorer_2_us = _best_us(lambda: scorer(user_rows, user, item_rows, items, counts), calls)
        reference_us = _best_us(lambda: reference_probs(state, schema, user_rows, user, item_rows, items, counts),
                                calls)
    return {"requests": requests, "candidates": candidates, "calls": calls, "repeats": _REPEATS,
            "busy_cores": busy_cores,
            "scorer_us": round(scorer_us, 2), "scorer_2_blas_threads_us": round(scorer_2_us, 2),
            "reference_us": round(reference_us, 2),
            "speedup": round(reference_us / scorer_us, 2),
            "max_abs_difference": float(np.abs(got - expected).max())}


def format_scoring_report(result: dict) -> str:
    return (f"scoring: {result['requests']} request(s) x {result['candidates']} candidates, best of "
            f"{result['repeats']} x {result['calls']} calls, one thread, {result['busy_cores']} busy core(s)\n"
            f"  DeepFMScorer {result['scorer_us']:.1f} us per call "
            f"({result['scorer_2_blas_threads_us']:.1f} us with two BLAS threads)\n"
            f"  baseline: numpy pooling + numpy DeepFM {result['reference_us']:.1f} us per call\n"
            f"  speedup {result['speedup']:.2f}x (max |difference| {result['max_abs_difference']:.2e})")
