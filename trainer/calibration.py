"""``monolith-rt experiment calibration``: are served scores probabilities?

Negatives are down-sampled before training (the joiner keeps an unclicked
impression with probability ``negative_rate``); the trainer weights each
kept negative by 1 / rate (trainer.model). If that correction is right, the
served score of an example is its click probability on the *unsampled*
stream, whatever the rate.

For each dataset and rate, one online pass in time order:

    the stream        every example, in order, in micro-batches of 256
    serving           a separate model that receives the trainer's sparse
                      deltas (absolute rows, as the updater applies them)
                      and its dense weights after every micro-batch
    held out          each micro-batch is scored by serving *before* the
                      trainer sees it (prequential), so every score is on
                      traffic the model has not trained on
    the trainer       sees the micro-batch with negatives kept at ``rate``
                      (seeded), each with sample rate ``rate``; Adagrad
                      0.05 on rows, Adam 1e-2 on the dense weights
    measured          on the second half of the stream (after warm-up):
                      mean_pred, observed_rate, ratio = mean_pred /
                      observed_rate, ece = sum over 10 equal-width score
                      bins of (bin share) * |mean score - click rate|

Datasets: ``movielens`` (MovieLens-100K, label: rating >= 4; its label-0
ratings are the negatives that get sampled) and ``synthetic`` (users and
items drawn at random; each item has a known click probability drawn once
from Beta(1, 4), so the true rate is about 0.2 and spans 0..~0.8; labels
Bernoulli of that).

Target: every ratio within 0.9..1.1 and every ece <= 0.02.
"""

from __future__ import annotations

import sys

import numpy as np

from server.features import FeatureSchema
from trainer.data import Examples, load_dataset
from trainer.experiments import apply_delta
from trainer.model import TrainerModel

NEGATIVE_RATES = (1.0, 0.5, 0.1)
_BATCH = 256
_BINS = 10
# The online default sparse rate; the dense rate of batch training, so the
# bias settles within a pass of a few hundred micro-batches.
_LR_SPARSE = 0.05
_LR_DENSE = 1e-2


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray, bins: int = _BINS) -> float:
    """sum_b (n_b / n) * |mean score in b - mean label in b| over equal-width bins of [0, 1]."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    which = np.minimum((scores * bins).astype(np.int64), bins - 1)
    n = np.bincount(which, minlength=bins)
    score_sum = np.bincount(which, scores, minlength=bins)
    label_sum = np.bincount(which, labels, minlength=bins)
    used = n > 0
    return float(np.abs(score_sum[used] - label_sum[used]).sum() / labels.shape[0])


def synthetic_stream(schema: FeatureSchema, n: int, seed: int = 0, users: int = 2000, items: int = 300
                     ) -> Examples:
    """n impressions of random (user, item, hour) with a per-item click rate ~ Beta(1, 4)."""
    rng = np.random.default_rng(seed)
    item_rate = rng.beta(1.0, 4.0, items)
    user_rows = np.stack([schema.encode({"user_id": u, "hour": u % 24}, schema.user_slots) for u in range(users)])
    item_rows = np.stack([schema.encode({"item_id": i}, schema.item_slots) for i in range(items)])
    uid = rng.integers(0, users, n)
    iid = rng.integers(0, items, n)
    labels = (rng.random(n) < item_rate[iid]).astype(np.float32)
    times = 1_700_000_000.0 + np.arange(n, dtype=np.float64)
    return Examples(user_rows[uid], item_rows[iid], labels, times, uid.astype(np.int64), iid.astype(np.int64))


def _sync(trainer: TrainerModel, serving: TrainerModel, seq: int) -> None:
    """Serving takes the trainer's touched rows (embedding half, absolute) and dense weights."""
    record = trainer.take_delta(seq)
    if record is not None:
        apply_delta(serving, record)
    serving.dense.load_state_dict(trainer.dense.state_dict())


def calibrate_one(schema: FeatureSchema, ex: Examples, negative_rate: float, seed: int = 0) -> dict:
    """One online pass at ``negative_rate``; the figures of the served scores on the second half."""
    trainer, serving = TrainerModel(schema, lr_sparse=_LR_SPARSE, lr_dense=_LR_DENSE), TrainerModel(schema)
    rng = np.random.default_rng(seed + 1)
    start_measure = len(ex) // 2
    scores, labels = [], []
    for seq, a in enumerate(range(0, len(ex), _BATCH), start=1):
        b = min(len(ex), a + _BATCH)
        if a >= start_measure:
            scores.append(serving.predict(ex.user_fids[a:b], ex.item_fids[a:b]))
            labels.append(ex.labels[a:b])
        y = ex.labels[a:b]
        keep = (y > 0) | (rng.random(b - a) < negative_rate)
        rates = np.where(y > 0, 1.0, negative_rate).astype(np.float32)[keep]
        trainer.train_step(ex.user_fids[a:b][keep], ex.item_fids[a:b][keep], y[keep], now=float(ex.times[b - 1]),
                           sample_rates=rates)
        _sync(trainer, serving, seq)
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    mean_pred, observed = float(scores.mean()), float(labels.mean())
    return {"negative_rate": negative_rate, "mean_pred": round(mean_pred, 4), "observed_rate": round(observed, 4),
            "ratio": round(mean_pred / observed, 4), "ece": round(expected_calibration_error(labels, scores), 4),
            "examples": int(labels.shape[0])}


def run_calibration(schema: FeatureSchema, quick: bool, datasets=("movielens", "synthetic"),
                    rates=NEGATIVE_RATES, seed: int = 0) -> dict:
    """{"experiment": "calibration", "rows": [{"dataset", "negative_rate", "mean_pred", "observed_rate",
    "ratio", "ece", "examples"}, ...]}"""
    rows = []
    for dataset in datasets:
        if dataset in ("movielens", "ml-1m"):  # "movielens": ML-100K, as before ML-1M came
            ex = load_dataset("ml-100k" if dataset == "movielens" else dataset, schema)
            ex = ex.slice(0, 30_000) if quick else ex
        elif dataset == "synthetic":
            ex = synthetic_stream(schema, 40_000 if quick else 200_000, seed)
        else:
            raise ValueError(f"dataset requires 'movielens', 'ml-1m' or 'synthetic', got {dataset!r}")
        for rate in rates:
            row = {"dataset": dataset, **calibrate_one(schema, ex, rate, seed)}
            rows.append(row)
            print(f"[calibration] {dataset:<9} rate {rate:<4} mean_pred {row['mean_pred']:.4f} observed "
                  f"{row['observed_rate']:.4f} ratio {row['ratio']:.3f} ece {row['ece']:.4f}", file=sys.stderr,
                  flush=True)
    return {"experiment": "calibration", "rows": rows}


def format_calibration(result: dict) -> str:
    lines = ["calibration of served scores (held-out, prequential; target ratio 0.9..1.1, ece <= 0.02)",
             f"  {'dataset':<10} {'neg rate':>8} {'mean_pred':>10} {'observed':>9} {'ratio':>7} {'ece':>7}"]
    for r in result["rows"]:
        lines.append(f"  {r['dataset']:<10} {r['negative_rate']:>8} {r['mean_pred']:>10.4f} "
                     f"{r['observed_rate']:>9.4f} {r['ratio']:>7.3f} {r['ece']:>7.4f}")
    return "\n".join(lines)
