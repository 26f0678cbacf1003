"""``monolith-rt bench train``: full training steps against the dense part alone.

Both run in the same process on the same MovieLens batches (first 80% by
time, one thread; ``--dataset``). The floor is the DeepFM forward/backward/
Adam step on pre-pooled fields, i.e. what remains if table lookup, pooling,
admission, sparse Adagrad and touched-row tracking cost nothing. On ML-1M
the full steps are also timed on ML-100K in the same run, the baseline of
``examples_per_s_vs_ml100k``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from server.features import FeatureSchema
from trainer.dense import build_dense
from trainer.data import load_dataset
from trainer.model import TrainerModel, auc


def _full_steps(schema: FeatureSchema, examples, batch: int) -> tuple[float, TrainerModel, int]:
    """Seconds for full training steps over the first 80% (after a warm-up step on a fresh model)."""
    split = int(len(examples) * 0.8)
    model = TrainerModel(schema)
    model.train_step(examples.user_fids[:batch], examples.item_fids[:batch], examples.labels[:batch], now=0.0)
    model = TrainerModel(schema)
    started = time.perf_counter()
    for start in range(0, split, batch):
        stop = min(split, start + batch)
        model.train_step(examples.user_fids[start:stop], examples.item_fids[start:stop],
                         examples.labels[start:stop], now=float(examples.times[stop - 1]))
    return time.perf_counter() - started, model, split


def bench_train(schema: FeatureSchema, batch: int, dataset: str = "ml-100k") -> dict:
    torch.set_num_threads(1)
    examples = load_dataset(dataset, schema)
    full_s, model, split = _full_steps(schema, examples, batch)
    tail = examples.slice(split, len(examples))
    holdout = auc(tail.labels, model.predict(tail.user_fids, tail.item_fids))
    baseline = {}
    if dataset != "ml-100k":  # the ML-100K figure, measured in this run, as the baseline
        small_s, _, small_split = _full_steps(schema, load_dataset("ml-100k", schema), batch)
        baseline = {"ml100k_examples_per_s": round(small_split / small_s, 1),
                    "examples_per_s_vs_ml100k": round((split / full_s) / (small_split / small_s), 3)}

    dense = build_dense(schema.num_fields, schema.dim, schema.dense).train()
    optimizer = torch.optim.Adam(dense.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    fields = torch.from_numpy(rng.standard_normal((batch, schema.num_fields, schema.dim), dtype=np.float32))
    started = time.perf_counter()
    for start in range(0, split, batch):
        target = torch.from_numpy(examples.labels[start : start + batch])
        logits = dense(fields[: target.shape[0]])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    dense_s = time.perf_counter() - started
    return {
        "dataset": dataset,
        "batch": batch,
        "examples": split,
        "examples_per_s": round(split / full_s, 1),
        "dense_only_examples_per_s": round(split / dense_s, 1),
        "speed_vs_dense_only": round(dense_s / full_s, 3),
        "holdout_auc": round(holdout, 4),
        "rows": len(model.table),
        **baseline,
    }
