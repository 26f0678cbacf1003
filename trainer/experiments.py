"""``monolith-rt experiment collisions|sync-interval``: the paper's two findings on MovieLens-100K or -1M.

Both run in-process on time-ordered real data, through the same table,
model and delta code paths as serving. Each prints a table and returns
``{"experiment", "rows": [{"variant", "auc_mean", "auc_std", "seeds"}], ...}``.

collisions
    One pass over the first 80% by time, AUC on the last 20%. Variants:
    ``collisionless`` (full 64-bit FIDs) and ``hashed-1/k``: the FIDs of
    each slot hashed (MurmurHash3 finaliser, salted by the seed) into k
    times fewer buckets than the slot has distinct FIDs, so unrelated IDs
    of one feature share rows, as with a fixed-size hashed table per
    feature (the paper: MD5 into a smaller space; its separate rates for
    users and movies imply a space per ID type); ``hashed-8x`` into 8 times
    more, for collision rates of the paper's order. A hashed FID keeps its
    slot bits, so admission and TTL act per slot as without hashing. (One
    space shared by all slots, as this experiment hashed until ML-1M came,
    is milder, ML-100K hashed-1/2 0.6567 against 0.6453 per slot, and hides
    collisions among crossed features: a frequent ID then mostly shares its
    row with rarely trained crossed FIDs; ML-1M crossed hashed-1/2 scored
    0.7423 there against 0.7233 per slot and 0.7430 collisionless.)
    Each hashed row reports ``collision_rate``: the share of the distinct
    FIDs that share their row with another FID (``collision_rate_user_id``,
    ``collision_rate_item_id``: the same over those slots' FIDs, the paper's
    two figures). ``features="crossed"`` trains on the experiment schema
    ``trainer/crossed_schema.json`` (the shipped slots plus user x genre,
    user x year, occupation x item, age x item), whose ~380,000 distinct
    FIDs on ML-1M make collisions bite as at ML-25M's scale; those rows
    are named ``crossed/<variant>``.

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

    Sync windows are count-based: equal numbers of micro-batches, not equal
    spans of time, since about 90% of ML-1M's ratings fall in 2000 and
    equal time windows would put most of the stream into a few of them.
    Each online row reports ``sync_every_examples`` and the median span of
    its windows in data time (``median_window_hours``); ``table2`` pairs
    each sync count with the batch-only AUC, as the paper's Table 2 does.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from server.features import PAD_FID, SIGNATURE_BITS, SLOT_IDS, FeatureSchema, Slot, shipped_schema, slot_of
from server.table import cuckoo
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.data import DATASET_TITLES, Examples, load_dataset
from trainer.model import TrainerModel, auc
from updater.applier import write_sparse
from server.streams.deltas import DeltaRecord

_BATCH = 1024
# One online micro-batch size for every sync-interval variant, small enough
# for the most frequent (500 syncs over ~50,000 examples: one per batch).
_ONLINE_BATCH = 100
_SYNC_COUNTS = (1, 10, 50, 100, 500)
_HASH_FRACTIONS = (2, 4, 8)
# hashed-8x: 8 times as many rows as FIDs, so about 1 - e^(-1/8) = 11.8% of FIDs share a row,
# the order of the paper's 7.73% (users) and 2.86% (movies) on ML-25M.
_HASH_SPARE = 8
_QUICK_EXAMPLES = 20_000
CROSSED_SCHEMA = Path(__file__).resolve().parent / "crossed_schema.json"
FEATURE_SETS = ("base", "crossed")


def _mix(fids: np.ndarray, salt: int) -> np.ndarray:
    """h(fid ^ salt) per FID: the table's own hash (MurmurHash3's finaliser)."""
    flat = np.ascontiguousarray(fids, dtype=np.uint64).ravel()
    x = np.empty_like(flat)
    cuckoo.mix64_batch(flat, np.uint64((salt * 0x9E3779B97F4A7C15) % 2**64), x)
    return x.reshape(fids.shape)


def _hashed(fids: np.ndarray, buckets, salt: int) -> np.ndarray:
    """Each non-pad FID -> 1 + (h(fid) mod buckets): deliberate collisions. buckets: an int, or
    one per FID (an array of fids' shape)."""
    local = _mix(fids, salt) % np.asarray(buckets, dtype=np.uint64) + np.uint64(1)
    return np.where(fids == PAD_FID, np.uint64(PAD_FID), local)


def _hashed_by_slot(fids: np.ndarray, buckets: np.ndarray, salt: int) -> np.ndarray:
    """Each non-pad FID -> its slot bits | ``_hashed`` into buckets[slot]: a hashed table per slot,
    so FIDs collide only within their slot, and keep its admission and TTL. buckets: int64[SLOT_IDS]."""
    slots = fids >> np.uint64(SIGNATURE_BITS)
    local = _hashed(fids, buckets[slots.astype(np.int64)], salt)
    return np.where(fids == PAD_FID, np.uint64(PAD_FID), (slots << np.uint64(SIGNATURE_BITS)) | local)


def _slot_buckets(distinct: np.ndarray, scale: float) -> np.ndarray:
    """int64[SLOT_IDS]: max(1, scale x the distinct FIDs of each slot)."""
    counts = np.bincount(slot_of(distinct), minlength=SLOT_IDS)
    return np.maximum(1, (counts * scale).astype(np.int64))


def seeded_model(schema: FeatureSchema, seed: int) -> TrainerModel:
    """A fresh trainer model whose dense weights start from ``seed``."""
    seeded = FeatureSchema(schema.slots, {**schema.dense, "seed": seed})
    return TrainerModel(seeded)


def train_span(model: TrainerModel, ex: Examples, user: np.ndarray, items: np.ndarray, start: int,
               stop: int) -> None:
    """One time-ordered pass over examples [start, stop) in batches of 1024 (user/items: their FIDs)."""
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


def collision_rates(distinct: np.ndarray, hashed: np.ndarray, schema: FeatureSchema) -> dict[str, float]:
    """Shares of the distinct FIDs whose hashed row also holds another FID: over all, and over the
    user_id and item_id FIDs alone. ``hashed[i]`` is the row of ``distinct[i]``."""
    _, inverse, counts = np.unique(hashed, return_inverse=True, return_counts=True)
    shared = counts[inverse] > 1
    slots = slot_of(distinct)
    out = {"collision_rate": round(float(shared.mean()), 4) if shared.shape[0] else 0.0}
    for name in ("user_id", "item_id"):
        mine = slots == schema.slot_named(name).slot
        out[f"collision_rate_{name}"] = round(float(shared[mine].mean()), 4) if mine.any() else 0.0
    return out


def crossed_schema() -> FeatureSchema:
    """The shipped schema plus the crossed slots of ``trainer/crossed_schema.json`` (validated as one)."""
    base = shipped_schema()
    try:
        crosses = tuple(Slot(**slot) for slot in json.loads(CROSSED_SCHEMA.read_text())["slots"])
        return FeatureSchema(base.slots + crosses, base.dense)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"experiment schema {CROSSED_SCHEMA}: {exc}") from exc


def experiment_examples(schema: FeatureSchema, dataset: str, quick: bool, examples: Examples | None) -> Examples:
    """``examples``, or the data set loaded; its first 20,000 with ``quick``."""
    ex = examples if examples is not None else load_dataset(dataset, schema)
    return ex.slice(0, _QUICK_EXAMPLES) if quick else ex


def run_collisions(schema: FeatureSchema, seeds: int, quick: bool, examples: Examples | None = None,
                   dataset: str = "ml-100k", features: tuple[str, ...] = ("base",)) -> dict:
    """``features``: "base" trains on ``schema``, "crossed" on ``crossed_schema()`` (rows ``crossed/...``);
    ``examples`` (for ``schema`` only) replaces the loaded data set."""
    rows, distinct_by_features = [], {}
    for feature_set in features:
        if feature_set not in FEATURE_SETS:
            raise ValueError(f"features requires values of {FEATURE_SETS}, got {feature_set!r}")
        crossed = feature_set == "crossed"
        set_schema = crossed_schema() if crossed else schema
        ex = experiment_examples(set_schema, dataset, quick, None if crossed else examples)
        result = _collisions_one(set_schema, ex, seeds, "crossed/" if crossed else "")
        distinct_by_features[feature_set] = result["distinct_fids"]
        for row in result["rows"]:
            row.update(features=feature_set, distinct_fids=result["distinct_fids"])
        rows += result["rows"]
    return {"experiment": "collisions", "rows": rows, "dataset": dataset, "hashing": "per-slot",
            "distinct_fids": distinct_by_features[features[0]], "distinct_fids_by_features": distinct_by_features,
            "train_examples": result["train_examples"], "test_examples": result["test_examples"]}


def _collisions_one(schema: FeatureSchema, ex: Examples, seeds: int, prefix: str) -> dict:
    split = int(len(ex) * 0.8)
    distinct = np.unique(np.concatenate([ex.user_fids.ravel(), ex.item_fids.ravel()]))
    distinct = distinct[distinct != PAD_FID]
    variants = [(f"{prefix}collisionless", None), (f"{prefix}hashed-{_HASH_SPARE}x", _HASH_SPARE)]
    variants += [(f"{prefix}hashed-1/{k}", 1 / k) for k in _HASH_FRACTIONS]
    results: dict[str, list[float]] = {}
    rates: dict[str, list[dict]] = {}
    for seed in range(seeds):
        for name, scale in variants:
            if scale is None:
                hash_ = lambda fids: fids  # noqa: E731
            else:
                hash_ = functools.partial(_hashed_by_slot, buckets=_slot_buckets(distinct, scale), salt=seed)
            user, items = hash_(ex.user_fids), hash_(ex.item_fids)
            rates.setdefault(name, []).append(collision_rates(distinct, hash_(distinct), schema))
            model = seeded_model(schema, seed)
            train_span(model, ex, user, items, 0, split)
            score = auc(ex.labels[split:], model.predict(user[split:], items[split:]))
            results.setdefault(name, []).append(score)
            print(f"[collisions] seed {seed}: {name:<22} AUC {score:.4f} collision rate "
                  f"{rates[name][-1]['collision_rate']:.4f}", file=sys.stderr, flush=True)
    out = _summarize("collisions", results)
    for row in out["rows"]:
        for key in rates[row["variant"]][0]:
            row[key] = round(float(np.mean([r[key] for r in rates[row["variant"]]])), 4)
    out.update({"distinct_fids": int(distinct.shape[0]), "train_examples": split, "test_examples": len(ex) - split})
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


def run_sync_interval(schema: FeatureSchema, seeds: int, quick: bool, examples: Examples | None = None,
                      dataset: str = "ml-100k") -> dict:
    ex = experiment_examples(schema, dataset, quick, examples)
    half = len(ex) // 2
    starts = list(range(half, len(ex), _ONLINE_BATCH))
    # Past 500 micro-batches (ML-1M: 5,000) a sync after every one is a row of its own.
    counts = (1, 10, 50) if quick else _SYNC_COUNTS + ((len(starts),) if len(starts) > _SYNC_COUNTS[-1] else ())
    results: dict[str, list[float]] = {}
    work = Path(tempfile.mkdtemp(prefix="monolith-sync-"))
    try:
        for seed in range(seeds):
            base = seeded_model(schema, seed)
            train_span(base, ex, ex.user_fids, ex.item_fids, 0, half)
            save_checkpoint(work / f"seed{seed}", base, None, 0)
            tail_labels = ex.labels[half:]
            results.setdefault("batch-only", []).append(
                auc(tail_labels, base.predict(ex.user_fids[half:], ex.item_fids[half:])))
            print(f"[sync-interval] seed {seed}: batch-only AUC {results['batch-only'][-1]:.4f}", file=sys.stderr,
                  flush=True)
            trainer = seeded_model(schema, seed)
            load_checkpoint(work / f"seed{seed}", trainer, None)
            trainer.set_learning_rates(sparse=0.05, dense=1e-4)
            trainer.take_delta(0)
            followers = {}
            for k in counts:  # serving side: batch rows + batch dense, then a sync after every len/k batches
                serving = seeded_model(schema, seed)
                load_checkpoint(work / f"seed{seed}", serving, None)
                after = set(np.linspace(0, len(starts), k + 1).astype(int)[1:] - 1)
                followers[k] = _Follower(serving, after)
            live = []
            for index, a in enumerate(starts):
                b = min(len(ex), a + _ONLINE_BATCH)
                for follower in followers.values():
                    follower.served.append(follower.serving.predict(ex.user_fids[a:b], ex.item_fids[a:b]))
                live.append(trainer.predict(ex.user_fids[a:b], ex.item_fids[a:b]))
                train_span(trainer, ex, ex.user_fids, ex.item_fids, a, b)
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
    windows = {k: _sync_windows(ex, starts, followers[k].sync_after) for k in counts}
    for row in out["rows"]:
        row["batch_size"] = _ONLINE_BATCH
        if row["variant"].startswith("online-syncs-"):
            row.update(windows[int(row["variant"].rsplit("-", 1)[1])])
    batch = out["rows"][0]
    out["table2"] = [{"syncs": k, **windows[k], "batch_auc_mean": batch["auc_mean"], "batch_auc_std": batch["auc_std"],
                      "online_auc_mean": row["auc_mean"], "online_auc_std": row["auc_std"]}
                     for k, row in zip(counts, out["rows"][1:])]
    out.update({"dataset": dataset, "windows": "count-based", "batch_examples": half,
                "online_examples": len(ex) - half, "batch_size": _ONLINE_BATCH, "batch_phase_batch_size": _BATCH})
    return out


def _sync_windows(ex: Examples, starts: list[int], sync_after: set[int]) -> dict:
    """Examples per sync window and the median window's span in data time."""
    ends = sorted(sync_after)
    bounds = [starts[0]] + [min(len(ex), starts[i] + _ONLINE_BATCH) for i in ends]
    spans_h = [(ex.times[b - 1] - ex.times[a]) / 3600 for a, b in zip(bounds, bounds[1:])]
    return {"sync_every_examples": round((len(ex) - starts[0]) / len(ends)),
            "median_window_hours": round(float(np.median(spans_h)), 2)}


def format_table(result: dict) -> str:
    title = DATASET_TITLES.get(result.get("dataset", "ml-100k"), result.get("dataset"))
    rates = any("collision_rate" in row for row in result["rows"])
    lines = [f"{result['experiment']} ({title}, time-ordered)", f"  {'variant':<24} {'AUC mean':>9} "
             f"{'std':>7} {'seeds':>6}"]
    if "batch_size" in result:
        lines[1] += f" {'batch_size':>11}"
    if rates:
        lines[1] += f" {'collisions':>10} {'user_id':>8} {'item_id':>8}"
    for row in result["rows"]:
        line = f"  {row['variant']:<24} {row['auc_mean']:>9.4f} {row['auc_std']:>7.4f} {row['seeds']:>6}"
        if "batch_size" in row:
            line += f" {row['batch_size']:>11}"
        if rates:
            line += (f" {row['collision_rate']:>10.2%} {row['collision_rate_user_id']:>8.2%}"
                     f" {row['collision_rate_item_id']:>8.2%}")
        lines.append(line)
    if "table2" in result:
        lines += ["  Table 2 form (sync windows of equal example counts):",
                  f"  {'syncs':>6} {'every N examples':>17} {'median window':>14} {'batch AUC':>16} "
                  f"{'online AUC':>16}"]
        for r in result["table2"]:
            lines.append(f"  {r['syncs']:>6} {r['sync_every_examples']:>17,} {r['median_window_hours']:>12.1f} h "
                         f"{r['batch_auc_mean']:>8.4f} +- {r['batch_auc_std']:.4f} "
                         f"{r['online_auc_mean']:>8.4f} +- {r['online_auc_std']:.4f}")
    return "\n".join(lines)


def output_stem(result: dict) -> str:
    """File name stem of a result's JSON and PNG: the experiment, with the data set unless ML-100K."""
    dataset = result.get("dataset", "ml-100k")
    return result["experiment"] if dataset == "ml-100k" else f"{result['experiment']}-{dataset}"


def write_outputs(result: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    name = result["experiment"]
    stem = output_stem(result)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(result["rows"])), 4))
    labels = [r["variant"] for r in result["rows"]]
    ax.bar(labels, [r["auc_mean"] for r in result["rows"]], yerr=[r["auc_std"] for r in result["rows"]], capsize=4)
    low = min(r["auc_mean"] - r["auc_std"] for r in result["rows"])
    high = max(r["auc_mean"] + r["auc_std"] for r in result["rows"])
    ax.set_ylim(low - 0.01, high + 0.01)
    ax.set_ylabel("AUC (mean +- std over seeds)")
    ax.set_title(f"{name} on {DATASET_TITLES.get(result.get('dataset', 'ml-100k'))}")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}.png", dpi=100)
    plt.close(fig)
