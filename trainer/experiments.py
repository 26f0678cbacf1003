"""``monolith-rt experiment collisions|sync-interval``: the paper's two findings on MovieLens-100K.

Both run in-process on time-ordered real data, through the same table,
model and delta code paths as serving. Each prints a table and returns
``{"experiment", "rows": [{"variant", "auc_mean", "auc_std", "seeds"}], ...}``.

collisions
    One pass over the first 80% by time, AUC on the last 20%. Variants:
    ``collisionless`` (full 64-bit FIDs) and ``hashed-1/k``: every FID
    hashed (MurmurHash3 finaliser, salted by the seed) into k times fewer
    buckets than there are distinct FIDs, so unrelated IDs share rows, as
    with a fixed-size hashed table (the paper: MD5 into a smaller space).

sync-interval
    Batch-train on the first half (micro-batches of 1024), then train online
    on the second half in micro-batches of 100 (the same for every variant,
    reported per row as ``batch_size``) while separate serving tables
    receive the trainer's touched rows K times (after every len/K
    micro-batches; one trainer feeds every variant, so they differ only in
    when serving sees its rows). Each micro-batch is scored by each serving
    side before the trainer sees it (prequential). ``batch-only`` serves the
    batch model throughout; ``trainer-live`` scores with the trainer's own
    live table and dense weights, the upper bound of syncing. The served
    dense weights stay those of the batch phase (Monolith syncs dense daily).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from server.features import PAD_FID, FeatureSchema
from server.table import cuckoo
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.data import Examples, load_movielens
from trainer.model import TrainerModel, auc
from updater.applier import write_sparse
from updater.delta import DeltaRecord

_BATCH = 1024
# One online micro-batch size for every sync-interval variant, small enough
# for the most frequent (500 syncs over ~50,000 examples: one per batch).
_ONLINE_BATCH = 100
_SYNC_COUNTS = (1, 10, 50, 100, 500)
_HASH_FRACTIONS = (2, 4, 8)


def _hashed(fids: np.ndarray, buckets: int, salt: int) -> np.ndarray:
    """Each non-pad FID -> 1 + (h(fid) mod buckets): deliberate collisions.
    h: the table's own hash (MurmurHash3's finaliser) of fid ^ salt."""
    flat = np.ascontiguousarray(fids, dtype=np.uint64).ravel()
    x = np.empty_like(flat)
    cuckoo.mix64_batch(flat, np.uint64((salt * 0x9E3779B97F4A7C15) % 2**64), x)
    x = x.reshape(fids.shape)
    return np.where(fids == PAD_FID, np.uint64(PAD_FID), x % np.uint64(buckets) + np.uint64(1))


def _model(schema: FeatureSchema, seed: int) -> TrainerModel:
    seeded = FeatureSchema(schema.slots, {**schema.dense, "seed": seed})
    return TrainerModel(seeded)


def _train(model: TrainerModel, ex: Examples, user: np.ndarray, items: np.ndarray, start: int, stop: int) -> None:
    for s in range(start, stop, _BATCH):
        e = min(stop, s + _BATCH)
        model.train_step(user[s:e], items[s:e], ex.labels[s:e], now=float(ex.times[e - 1]))


def apply_delta(serving: TrainerModel, record) -> None:
    """A sparse delta into a serving-side model, as the updater applies it
    (``write_sparse``). The follower is trainer-shaped: its rows carry the
    Adagrad half after the embedding, which the record leaves as it was."""
    rows = serving.table.lookup(record.fids)
    rows[:, : serving.dim] = record.values
    write_sparse(serving.table, record.fids, rows, record.evicted, record.created_s)


def _summarize(name: str, results: dict[str, list[float]]) -> dict:
    rows = [{"variant": v, "auc_mean": round(float(np.mean(a)), 4), "auc_std": round(float(np.std(a)), 4),
             "seeds": len(a), "aucs": [round(x, 4) for x in a]} for v, a in results.items()]
    return {"experiment": name, "rows": rows}


def run_collisions(schema: FeatureSchema, seeds: int, quick: bool, examples: Examples | None = None) -> dict:
    ex = examples or load_movielens(schema)
    if quick:
        ex = ex.slice(0, 20_000)
    split = int(len(ex) * 0.8)
    distinct = np.unique(np.concatenate([ex.user_fids.ravel(), ex.item_fids.ravel()]))
    distinct = int((distinct != PAD_FID).sum())
    results: dict[str, list[float]] = {}
    variants = [("collisionless", None)] + [(f"hashed-1/{k}", max(1, distinct // k)) for k in _HASH_FRACTIONS]
    for seed in range(seeds):
        for name, buckets in variants:
            user = ex.user_fids if buckets is None else _hashed(ex.user_fids, buckets, seed)
            items = ex.item_fids if buckets is None else _hashed(ex.item_fids, buckets, seed)
            model = _model(schema, seed)
            _train(model, ex, user, items, 0, split)
            score = auc(ex.labels[split:], model.predict(user[split:], items[split:]))
            results.setdefault(name, []).append(score)
            print(f"[collisions] seed {seed}: {name:<14} AUC {score:.4f}", file=sys.stderr, flush=True)
    out = _summarize("collisions", results)
    out.update({"distinct_fids": distinct, "train_examples": split, "test_examples": len(ex) - split})
    return out


class _Follower:
    """A serving-side model that takes the trainer's touched rows every so many micro-batches."""

    def __init__(self, serving: TrainerModel, sync_after: set[int]):
        self.serving = serving
        self.sync_after = sync_after
        self.pending: list[np.ndarray] = []
        self.served: list[np.ndarray] = []

    def sync(self, trainer: TrainerModel, seq: int, created_s: float) -> None:
        """Absolute rows of every FID touched since the last sync (deletes for gone ones)."""
        fids = np.unique(np.concatenate(self.pending)) if self.pending else np.empty(0, np.uint64)
        self.pending = []
        rows, found = trainer.table.lookup_found(fids)
        apply_delta(self.serving, DeltaRecord.sparse(seq, created_s, fids[found], rows[found, : trainer.dim],
                                                     fids[~found]))


def run_sync_interval(schema: FeatureSchema, seeds: int, quick: bool, examples: Examples | None = None) -> dict:
    ex = examples or load_movielens(schema)
    if quick:
        ex = ex.slice(0, 20_000)
    half = len(ex) // 2
    counts = (1, 10, 50) if quick else _SYNC_COUNTS
    starts = list(range(half, len(ex), _ONLINE_BATCH))
    results: dict[str, list[float]] = {}
    work = Path(tempfile.mkdtemp(prefix="monolith-sync-"))
    try:
        for seed in range(seeds):
            base = _model(schema, seed)
            _train(base, ex, ex.user_fids, ex.item_fids, 0, half)
            save_checkpoint(work / f"seed{seed}", base, None, 0)
            tail_labels = ex.labels[half:]
            results.setdefault("batch-only", []).append(
                auc(tail_labels, base.predict(ex.user_fids[half:], ex.item_fids[half:])))
            print(f"[sync-interval] seed {seed}: batch-only AUC {results['batch-only'][-1]:.4f}", file=sys.stderr,
                  flush=True)
            trainer = _model(schema, seed)
            load_checkpoint(work / f"seed{seed}", trainer, None)
            trainer.set_learning_rates(sparse=0.05, dense=1e-4)
            trainer.take_delta(0)
            followers = {}
            for k in counts:  # serving side: batch rows + batch dense, then a sync after every len/k batches
                serving = _model(schema, seed)
                load_checkpoint(work / f"seed{seed}", serving, None)
                after = set(np.linspace(0, len(starts), k + 1).astype(int)[1:] - 1)
                followers[k] = _Follower(serving, after)
            live = []
            for index, a in enumerate(starts):
                b = min(len(ex), a + _ONLINE_BATCH)
                for follower in followers.values():
                    follower.served.append(follower.serving.predict(ex.user_fids[a:b], ex.item_fids[a:b]))
                live.append(trainer.predict(ex.user_fids[a:b], ex.item_fids[a:b]))
                _train(trainer, ex, ex.user_fids, ex.item_fids, a, b)
                record = trainer.take_delta(index + 1)
                for follower in followers.values():
                    if record is not None:
                        follower.pending.append(np.concatenate([record.fids, record.evicted]))
                    if index in follower.sync_after:
                        follower.sync(trainer, index + 1, float(ex.times[b - 1]))
            for k, follower in followers.items():
                score = auc(tail_labels, np.concatenate(follower.served))
                results.setdefault(f"online-syncs-{k}", []).append(score)
                print(f"[sync-interval] seed {seed}: {k:>4} syncs AUC {score:.4f}", file=sys.stderr, flush=True)
            score = auc(tail_labels, np.concatenate(live))
            results.setdefault("trainer-live", []).append(score)
            print(f"[sync-interval] seed {seed}: trainer-live AUC {score:.4f}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = _summarize("sync-interval", results)
    for row in out["rows"]:
        row["batch_size"] = _ONLINE_BATCH
    out.update({"batch_examples": half, "online_examples": len(ex) - half, "batch_size": _ONLINE_BATCH,
                "batch_phase_batch_size": _BATCH})
    return out


def format_table(result: dict) -> str:
    lines = [f"{result['experiment']} (MovieLens-100K, time-ordered)", f"  {'variant':<18} {'AUC mean':>9} "
             f"{'std':>7} {'seeds':>6}"]
    if "batch_size" in result:
        lines[1] += f" {'batch_size':>11}"
    for row in result["rows"]:
        lines.append(f"  {row['variant']:<18} {row['auc_mean']:>9.4f} {row['auc_std']:>7.4f} {row['seeds']:>6}"
                     + (f" {row['batch_size']:>11}" if "batch_size" in row else ""))
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: Path) -> None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    name = result["experiment"]
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [r["variant"] for r in result["rows"]]
    ax.bar(labels, [r["auc_mean"] for r in result["rows"]], yerr=[r["auc_std"] for r in result["rows"]], capsize=4)
    low = min(r["auc_mean"] - r["auc_std"] for r in result["rows"])
    high = max(r["auc_mean"] + r["auc_std"] for r in result["rows"])
    ax.set_ylim(low - 0.01, high + 0.01)
    ax.set_ylabel("AUC (mean +- std over seeds)")
    ax.set_title(f"{name} on MovieLens-100K")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=100)
    plt.close(fig)
