"""``monolith-rt experiment guard``: does the quality guard stop poison and let drift through?

MovieLens-100K in time order. The first half trains a batch model; the
second half (the tail) is replayed through the online path per scenario
and variant, in thirds: before | during | after.

    poison   during the middle third, adversarial feedback worth 40% of the
             real volume: an inverting client (5 sources replaying real
             impressions of the 30 most rated items of the period with the
             label inverted, 30%) and a click bot (3 sources clicking the 5
             items with the lowest positive rate in the head, 10%); both stop
             at the last third. AUC is measured on the real users' examples
             and labels only.
    clean    the tail as it is: the guard's false alarms, and the AUC the
             poisoned replays would have had (``attack_damage`` = clean
             during - poisoned during, per variant).
    drift    from the middle third on, the labels of every Romance rating
             invert, for good: the ground truth changes with them.

Variants: ``frozen`` serves the batch model throughout; ``online`` trains on
every micro-batch (100 examples; the real label-0 ratings are impressions
without an action, kept at ``negative_rate`` and weighted 1/rate, as the
joiner and trainer do; the adversaries' labels are explicit actions, all
joined) and emits each one's rows as
a real delta record into a segment-file delta stream (dense weights every 10
micro-batches), which a separate serving model applies; ``online+guard``
does the same with trainer.guard watching the served scores (of the
examples the trainer receives, observed labels) and acting: while held
nothing is emitted, a rollback appends updater.rollback's records to the
stream and the serving model applies them like any delta.

Every real example is scored by the serving model before the trainer sees
it. Figures: AUC of those scores against the ground truth per third,
``rollbacks``; windowed AUC (last 2,000 real examples, every 500) for the
PNG; ``poison_auc_drop_*`` = auc_before - auc_during; and
``drift_recovery_examples_*`` = examples after the change until the
windowed AUC (over examples after the change only) is back within 0.01 of
its level just before the change (the mean of the last 4 windows before
it); null when it never is. Targets: the guarded drop <= 1/3 of the
unguarded; the guarded recovery <= 1.5x the unguarded.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from server.features import FeatureSchema
from server.streams import DELTAS, Streams
from trainer.data import Examples, load_movielens
from trainer.experiments import apply_delta
from trainer.guard import Guard, GuardConfig
from trainer.guard_owner import roll_back
from trainer.model import TrainerModel, auc
from server.streams.deltas import DeltaRecord
from server.streams.delta_log import FileDeltaWriter

_BATCH = 100
_DENSE_EVERY = 10
_WINDOW = 2000
_STEP = 500
_INVERTED_SHARE = 0.3
_INVERTED_SOURCES = 5
_DEMOTED_ITEMS = 30
_BOT_SHARE = 0.1
_BOT_USERS = 3
_BOT_ITEMS = 5
_DRIFT_GENRE = "Romance"
_RECOVERED_WITHIN = 0.01


def _schema(schema: FeatureSchema, seed: int) -> FeatureSchema:
    return FeatureSchema(schema.slots, {**schema.dense, "seed": seed})


class Scenario:
    """One replay: the tail's features, observed labels, true labels, which rows are real (not bot)."""

    def __init__(self, name: str, ex: Examples, observed: np.ndarray, truth: np.ndarray, real: np.ndarray,
                 change: int, stop: int):
        self.name, self.ex, self.observed, self.truth, self.real = name, ex, observed, truth, real
        self.change, self.stop = change, stop  # in real-example positions


def _concat(parts: list[Examples]) -> Examples:
    return Examples(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                      ("user_fids", "item_fids", "labels", "times", "user_ids", "item_ids")))


def poison_scenario(schema: FeatureSchema, head: Examples, tail: Examples, seed: int) -> Scenario:
    rng = np.random.default_rng(seed + 100)
    n = len(tail)
    a, b = n // 3, 2 * n // 3
    items, counts = np.unique(head.item_ids, return_counts=True)
    # The inverting client: a few sources replaying real impressions of the period's most rated items with
    # the label inverted, at _INVERTED_SHARE of the real volume (a uniform inversion over all items would
    # compress scores toward 0.5 and leave the ranking, so AUC, almost as it was).
    period_items, period_counts = np.unique(tail.item_ids[a:b], return_counts=True)
    demoted = period_items[np.argsort(-period_counts)[:_DEMOTED_ITEMS]]
    candidates = a + np.flatnonzero(np.isin(tail.item_ids[a:b], demoted))
    n_inv = int((b - a) * _INVERTED_SHARE)
    copied = rng.choice(candidates, n_inv)
    inv_users = rng.integers(0, _INVERTED_SOURCES, n_inv)
    # The click bot: a few sources clicking the _BOT_ITEMS items with the lowest positive rate in the head.
    rates = np.array([head.labels[head.item_ids == i].mean() for i in items])
    popular = counts >= 20
    targets = items[popular][np.argsort(rates[popular])[:_BOT_ITEMS]]
    item_row = {int(i): head.item_fids[np.flatnonzero(head.item_ids == i)[0]] for i in targets}
    n_bot = int((b - a) * _BOT_SHARE)
    bot_users = _INVERTED_SOURCES + rng.integers(0, _BOT_USERS, n_bot)
    bot_items = rng.choice(targets, n_bot)
    users = np.concatenate([inv_users, bot_users])
    fake = Examples(np.stack([schema.encode({"user_id": 10_000_000 + int(u), "hour": int(u) % 24},
                                            schema.user_slots) for u in users]),
                    np.concatenate([tail.item_fids[copied], np.stack([item_row[int(i)] for i in bot_items])]),
                    np.concatenate([1.0 - tail.labels[copied], np.ones(n_bot, np.float32)]),
                    np.zeros(len(users)), 10_000_000 + users, np.concatenate([tail.item_ids[copied], bot_items]))
    at = np.sort(rng.integers(a, b, len(users)))  # fake rows go before these real positions
    order = np.argsort(np.concatenate([np.arange(n) * 2 + 1, at * 2]), kind="stable")
    ex = _concat([tail, fake])
    ex = Examples(*(getattr(ex, f)[order] for f in ("user_fids", "item_fids", "labels", "times", "user_ids",
                                                     "item_ids")))
    real = np.concatenate([np.ones(n, np.bool_), np.zeros(len(users), np.bool_)])[order]
    return Scenario("poison", ex, ex.labels.copy(), ex.labels.copy(), real, a, b)


def clean_scenario(tail: Examples) -> Scenario:
    n = len(tail)
    return Scenario("clean", tail, tail.labels, tail.labels, np.ones(n, np.bool_), n // 3, 2 * n // 3)


def drift_scenario(schema: FeatureSchema, tail: Examples) -> Scenario:
    n = len(tail)
    genre = schema.encode({"item_id": 0, "item_genres": [_DRIFT_GENRE]}, schema.item_slots)[1]
    changed = (tail.item_fids == genre).any(axis=1) & (np.arange(n) >= n // 3)
    labels = tail.labels.copy()
    labels[changed] = 1.0 - labels[changed]
    return Scenario("drift", tail, labels, labels, np.ones(n, np.bool_), n // 3, 2 * n // 3)


def replay(schema: FeatureSchema, base: TrainerModel, scenario: Scenario, variant: str, negative_rate: float,
           seed: int, work: Path, guard_config: GuardConfig | None = None) -> dict:
    """One pass; the served scores of the real examples and what the guard did."""
    ex = scenario.ex
    if variant == "frozen":
        scores = base.predict(ex.user_fids[scenario.real], ex.item_fids[scenario.real])
        return {"scores": scores, "rollbacks": 0, "decisions": []}
    data_dir = work / f"{scenario.name}-{variant.replace('+', '-')}-{seed}"
    shutil.rmtree(data_dir, ignore_errors=True)
    trainer, serving = _clone(schema, base), _clone(schema, base)
    trainer.set_learning_rates(sparse=0.05, dense=1e-4)
    guard = Guard(guard_config) if variant == "online+guard" else None
    rng = np.random.default_rng(seed + 7)
    served, decisions, rows_rolled_back = [], [], 0
    seq = 0
    with FileDeltaWriter(Streams(data_dir).path(DELTAS)) as writer:
        for record in _initial_records(base, writer.next_seq):
            writer.append(record)
            seq = record.seq
        for index, a in enumerate(range(0, len(ex), _BATCH)):
            b = min(len(ex), a + _BATCH)
            scores = serving.predict(ex.user_fids[a:b], ex.item_fids[a:b])
            served.append(scores[scenario.real[a:b]])
            y = scenario.observed[a:b]
            # What the joiner hands the trainer: every action (clicks, and the adversaries' explicit labels),
            # impressions without one as negatives kept at negative_rate.
            implicit = (y <= 0) & scenario.real[a:b]
            keep = ~implicit | (rng.random(b - a) < negative_rate)
            rates = np.where(implicit, negative_rate, 1.0).astype(np.float32)
            sources, items = ex.user_fids[a:b, 0], ex.item_fids[a:b, 0]
            if guard is not None:
                for decision in guard.observe(scores[keep], y[keep], np.full(int(keep.sum()), seq), sources[keep],
                                              items[keep], 1.0 / rates[keep]):
                    decisions.append({"at": a, "action": decision.action, "reason": decision.reason})
                    if decision.action == "rollback":
                        plan = roll_back(trainer, writer, data_dir, schema, decision.to_seq, float(b))
                        rows_rolled_back += plan.fids.shape[0]
                        guard.rollback_applied(plan.fids.shape[0])
                        seq = _apply_new(serving, data_dir, seq)
                keep &= guard.keep(sources)
            if keep.any():
                trainer.train_step(ex.user_fids[a:b][keep], ex.item_fids[a:b][keep], y[keep], now=float(b),
                                   sample_rates=rates[keep])
            if guard is None or guard.emitting:
                record = trainer.take_delta(writer.next_seq, created_s=float(b))
                if record is not None:
                    writer.append(record)
                if index % _DENSE_EVERY == _DENSE_EVERY - 1:
                    writer.append(DeltaRecord.dense(writer.next_seq, float(b), trainer.dense_state()))
                seq = _apply_new(serving, data_dir, seq)
    shutil.rmtree(data_dir, ignore_errors=True)
    return {"scores": np.concatenate(served), "rollbacks": guard.rollbacks if guard else 0,
            "holds": guard.holds if guard else 0, "drifts": guard.drifts if guard else 0,
            "rows_rolled_back": rows_rolled_back, "decisions": decisions,
            "evaluations": guard.evaluations if guard else 0}


def _clone(schema: FeatureSchema, base: TrainerModel) -> TrainerModel:
    model = TrainerModel(schema)
    for fids, rows, stamps in base.table.items():
        model.table.upsert(fids, rows, now=stamps)
    model.dense.load_state_dict(base.dense.state_dict())
    return model


def _initial_records(base: TrainerModel, seq: int) -> list[DeltaRecord]:
    parts = list(base.table.items())
    fids = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts])[:, : base.dim]
    return [DeltaRecord.sparse(seq, 0.0, fids, rows), DeltaRecord.dense(seq + 1, 0.0, base.dense_state())]


def _apply_new(serving: TrainerModel, data_dir: Path, seq: int) -> int:
    """Serving applies the stream's records after ``seq`` (the updater's path: read, CRC, decode, apply)."""
    from server.streams.delta_log import FileDeltaReader

    reader = FileDeltaReader(Streams(data_dir).path(DELTAS), after_seq=seq)
    try:
        while records := reader.read(max_records=64):
            for record in records:
                if record.kind == 2:
                    serving.dense.load_state_dict(record.dense_state)
                else:
                    apply_delta(serving, record)
                seq = record.seq
    finally:
        reader.close()
    return seq


def windowed_auc(truth: np.ndarray, scores: np.ndarray, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(window end positions, AUC of the last _WINDOW examples) every _STEP, windows starting at >= start."""
    ends = np.arange(start + _WINDOW, truth.shape[0] + 1, _STEP)
    return ends, np.array([auc(truth[e - _WINDOW:e], scores[e - _WINDOW:e]) for e in ends])


def recovery_examples(truth: np.ndarray, scores: np.ndarray, change: int) -> int | None:
    before_ends, before = windowed_auc(truth[:change], scores[:change])
    level = float(np.mean(before[-4:]))
    ends, after = windowed_auc(truth, scores, start=change)
    back = np.flatnonzero(after >= level - _RECOVERED_WITHIN)
    return int(ends[back[0]] - change) if back.shape[0] else None


def run_guard(schema: FeatureSchema, seeds: int = 1, quick: bool = False, negative_rate: float = 0.1,
              examples: Examples | None = None, guard_config: GuardConfig | None = None) -> dict:
    ex = examples or load_movielens(schema)
    half = len(ex) // 2
    head, tail = ex.slice(0, half), ex.slice(half, min(len(ex), half + 24_000) if quick else len(ex))
    work = Path(tempfile.mkdtemp(prefix="monolith-guard-"))
    rows, curves = [], {}
    started = time.perf_counter()
    try:
        for seed in range(seeds):
            seeded = _schema(schema, seed)
            base = TrainerModel(seeded)
            for s in range(0, half, 1024):
                e = min(half, s + 1024)
                base.train_step(head.user_fids[s:e], head.item_fids[s:e], head.labels[s:e], now=float(e))
            for scenario in (clean_scenario(tail), poison_scenario(seeded, head, tail, seed),
                             drift_scenario(seeded, tail)):
                truth = scenario.truth[scenario.real]
                thirds = (slice(0, scenario.change), slice(scenario.change, scenario.stop),
                          slice(scenario.stop, truth.shape[0]))
                for variant in ("frozen", "online", "online+guard") if scenario.name != "clean" else \
                        ("online", "online+guard"):
                    out = replay(seeded, base, scenario, variant, negative_rate, seed, work, guard_config)
                    s = out["scores"]
                    row = {"scenario": scenario.name, "variant": variant, "seed": seed,
                           **{f"auc_{k}": round(auc(truth[p], s[p]), 4) if p.stop > p.start else None
                              for k, p in zip(("before", "during", "after"), thirds)},
                           "rollbacks": out["rollbacks"], "holds": out.get("holds", 0), "drifts": out.get("drifts", 0),
                           "rows_rolled_back": out.get("rows_rolled_back", 0),
                           "evaluations": out.get("evaluations", 0)}
                    if scenario.name == "drift":
                        row["recovery_examples"] = recovery_examples(truth, s, scenario.change)
                    rows.append(row)
                    curves.setdefault((scenario.name, variant), []).append(windowed_auc(truth, s))
                    print(f"[guard] seed {seed} {scenario.name:<6} {variant:<13} AUC before {row['auc_before']} "
                          f"during {row['auc_during']} after {row['auc_after']} rollbacks {row['rollbacks']} holds "
                          f"{row['holds']} drifts {row['drifts']}" + (f" recovery {row['recovery_examples']}"
                                                                      if "recovery_examples" in row else ""),
                          file=sys.stderr, flush=True)
                    for d in out["decisions"]:
                        print(f"[guard]   at {d['at']}: {d['action']}: {d['reason']}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _summarize(rows, curves, len(head), len(tail), seeds, negative_rate, time.perf_counter() - started)


def _mean(values):
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 4) if values else None


def _summarize(rows, curves, head_n, tail_n, seeds, negative_rate, elapsed_s) -> dict:
    def pick(scenario, variant, key):
        return [r[key] for r in rows if r["scenario"] == scenario and r["variant"] == variant]

    drop = {v: _mean([b - d for b, d in zip(pick("poison", v, "auc_before"), pick("poison", v, "auc_during"))])
            for v in ("online", "online+guard")}
    damage = {v: _mean([c - d for c, d in zip(pick("clean", v, "auc_during"), pick("poison", v, "auc_during"))])
              for v in ("online", "online+guard")}
    alarms = sum(pick("clean", "online+guard", "holds"))
    evaluations = sum(pick("clean", "online+guard", "evaluations"))
    recovery = {v: pick("drift", v, "recovery_examples") for v in ("online", "online+guard")}
    rec_mean = {v: (None if any(x is None for x in r) else _mean(r)) for v, r in recovery.items()}
    out = {"experiment": "guard", "rows": rows,
           "poison_auc_drop_guarded": drop["online+guard"], "poison_auc_drop_unguarded": drop["online"],
           "drift_recovery_examples_guarded": rec_mean["online+guard"],
           "drift_recovery_examples_unguarded": rec_mean["online"],
           "poison_attack_damage_guarded": damage["online+guard"], "poison_attack_damage_unguarded": damage["online"],
           "clean_false_alarms": alarms, "clean_evaluations": evaluations,
           "clean_false_alarm_rate": round(alarms / evaluations, 4) if evaluations else None,
           "batch_examples": head_n, "tail_examples": tail_n, "seeds": seeds, "negative_rate": negative_rate,
           "elapsed_s": round(elapsed_s, 1)}
    g, u = out["poison_auc_drop_guarded"], out["poison_auc_drop_unguarded"]
    # Without a drop when unguarded there is nothing to guard against: the target is not measurable.
    out["poison_target_met"] = None if g is None or u is None or u <= 0 else bool(g <= u / 3)
    g, u = out["drift_recovery_examples_guarded"], out["drift_recovery_examples_unguarded"]
    out["drift_target_met"] = None if g is None or u is None else bool(g <= 1.5 * u)
    out["curves"] = {f"{s}/{v}": {"end": c[0][0].tolist(), "auc": [round(float(x), 4) for x in
                                                                  np.mean([w[1] for w in c], axis=0)]}
                     for (s, v), c in curves.items()}
    return out


def format_guard(result: dict) -> str:
    lines = ["guard on MovieLens-100K (AUC of served scores against the ground truth, per third of the tail)",
             f"  {'scenario':<8} {'variant':<13} {'seed':>4} {'before':>7} {'during':>7} {'after':>7} {'rollbacks':>9}"
             f" {'holds':>5} {'recovery':>9}"]
    for r in result["rows"]:
        lines.append(f"  {r['scenario']:<8} {r['variant']:<13} {r['seed']:>4} {str(r['auc_before']):>7} "
                     f"{str(r['auc_during']):>7} {str(r['auc_after']):>7} {r['rollbacks']:>9} {r['holds']:>5} "
                     f"{str(r.get('recovery_examples', '')):>9}")
    lines.append(f"  poison AUC drop: guarded {result['poison_auc_drop_guarded']} vs unguarded "
                 f"{result['poison_auc_drop_unguarded']} (target <= 1/3: {result['poison_target_met']})")
    lines.append(f"  poison damage (clean during - poisoned during): guarded {result['poison_attack_damage_guarded']} "
                 f"vs unguarded {result['poison_attack_damage_unguarded']}")
    lines.append(f"  clean replay: {result['clean_false_alarms']} holds in {result['clean_evaluations']} evaluations "
                 f"(false-alarm rate {result['clean_false_alarm_rate']})")
    lines.append(f"  drift recovery examples: guarded {result['drift_recovery_examples_guarded']} vs unguarded "
                 f"{result['drift_recovery_examples_unguarded']} (target <= 1.5x: {result['drift_target_met']})")
    return "\n".join(lines)


def write_guard_outputs(result: dict, out_dir: Path) -> None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "guard.json").write_text(json.dumps(result, indent=2))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4), sharey=True)
    for ax, scenario in zip(axes, ("poison", "drift", "clean")):
        for key, curve in result["curves"].items():
            if key.startswith(scenario + "/"):
                ax.plot(curve["end"], curve["auc"], label=key.split("/", 1)[1])
        change = [r for r in result["rows"] if r["scenario"] == scenario]
        n = result["tail_examples"]
        for x in {"poison": (n // 3, 2 * n // 3), "drift": (n // 3,)}.get(scenario, ()):
            ax.axvline(x, color="grey", linestyle=":")
        ax.set_title(f"{scenario}: windowed AUC (last {_WINDOW} examples)" if change else scenario)
        ax.set_xlabel("real examples into the tail")
        ax.legend()
    axes[0].set_ylabel("AUC vs ground truth")
    fig.tight_layout()
    fig.savefig(out_dir / "guard.png", dpi=100)
    plt.close(fig)
