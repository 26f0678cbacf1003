"""The quality guard: hold or roll back updates that make served scores worse,
and let real drift through.

It watches the prequential quality of served scores (trainer.quality: each
joined example's served score and the delta_seq it was served at, before
the trainer learns from it) and decides at every closed block (``block``
examples) over the window of the last ``window`` examples, leaving out
sources in quarantine. Reference: the medians over the last
``reference_windows`` good evaluations (at least 3) of the window AUC and of
the mean and sd of the per-example log loss.

    degraded      reference AUC - window AUC > max(auc_margin, z * se), se the
                  Hanley-McNeil standard error of the window AUC (>= min_class
                  positives and negatives): large *and* significant. With
                  negatives sampled at 0.1 a window of 2,000 holds ~150
                  negatives: se ~0.02, so a drop must pass ~0.06.
    suspect       a source (the user-id FID, first user column) holding at
    sources       least ``source_share`` of the window whose mean log loss is
                  ``source_z`` standard errors (reference sd / sqrt(n)) above
                  the reference mean; suspect items likewise (groups of at
                  least ``min_group_examples``). ``source_share`` and
                  ``item_share``: the parts of the window's excess loss (over
                  the reference mean) on their examples.
    concentrated  suspect sources with source_share >= max(item_share,
                  min_excess_share)

    open  --degraded or concentrated-->  held   sparse and dense emission and
                                                snapshots stop (the trainer keeps
                                                training); suspects are not
                                                trained on (provisional quarantine)
    held  --new concentrated suspects-->  held  one more block, they join the
                                                suspects (up to max_held_blocks)
    held  --poison-->  open   rollback to min(last known good, the seq that
                              served the suspects' first example); suspects
                              stay quarantined for ``quarantine_examples``, and
                              for that long every new suspect is quarantined at
                              once (an incident)
    held  --drift-->   open   suspects released; no window alarm for
                              ``drift_cooldown_examples`` while the model adapts
                              (sources are still screened against the old
                              reference), then a fresh reference
    held  --else-->    open   released (a false alarm)

Poison or drift. Bad feedback comes from somewhere: a bot, a client that
inverts labels. Real drift comes from everywhere: many users change their
taste for some items. So the verdict, one block after the hold:

    poison     concentrated suspects, and the window without them scores an
               AUC at least auc_margin above the same window with them (they
               hurt; a heavy but honest user whose taste the model misses
               does not)
    drift      otherwise, while the window is still degraded: the damage
               follows items across sources

Bad input spread thinly over many sources is not told apart from drift: it
is let through like drift (the limit of this design).

Expiry breaker: the same hold, for the table's size instead of its quality.
An expiry pass that would remove more than ``max_expiry_share`` of the
table at once (a clock gone wrong, a trainer restarted after a long outage)
is not carried out: emission holds (``expiry_breaker`` decides, the
trainer's ``TrainerGuard.hold_expiry`` acts), the rows stay, and the
operator's ``deltas resume`` releases the hold and lets that pass run.

Last known good: after each good evaluation, the seq that served the oldest
example of that window (every state since then was judged). The rollback
itself is ``updater.rollback``: records restoring the state at that seq of
every row and of the dense weights changed since (absolute values), plus
the rows touched and not yet emitted, applied by servers like any delta and
to the trainer's own table (embeddings restored, Adagrad accumulators kept)
so it does not re-emit what was undone; the trainer then checkpoints at
once, so a restart resumes from the rolled-back state.
"""

from __future__ import annotations

import logging
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np

from server.features import FeatureSchema
from trainer.model import TrainerModel
from trainer.quality import QualityMonitor, WindowReport, log_losses, report
from updater.rollback import RestorePlan, plan_rollback

log = logging.getLogger(__name__)

OPEN, HELD = "open", "held"


@dataclass
class GuardConfig:
    window: int = 2000
    block: int = 500
    auc_margin: float = 0.02
    z: float = 3.0
    min_class: int = 50
    reference_windows: int = 8
    source_z: float = 8.0
    source_share: float = 0.025
    max_held_blocks: int = 3
    min_excess_share: float = 0.25
    min_group_examples: int = 8
    quarantine_examples: int = 20_000
    drift_cooldown_examples: int = 6_000
    enabled: bool = True

    def __post_init__(self):
        if not 0 < self.block <= self.window or self.auc_margin < 0 or self.z < 0 or self.reference_windows < 3:
            raise ValueError(f"guard requires 0 < block <= window, auc_margin >= 0, z >= 0, reference_windows >= 3; "
                             f"got block {self.block}, window {self.window}, auc_margin {self.auc_margin}, z {self.z}, "
                             f"reference_windows {self.reference_windows}")


@dataclass
class Decision:
    action: str  # "hold" | "rollback" | "drift" | "release"
    reason: str
    to_seq: int | None = None
    report: dict = field(default_factory=dict)


@dataclass
class Attribution:
    sources: np.ndarray  # suspect source FIDs
    items: np.ndarray  # suspect item FIDs
    source_share: float
    item_share: float


def _suspects(groups: np.ndarray, loss: np.ndarray, mean: float, sd: float, z: float, min_n: int) -> np.ndarray:
    """Groups whose mean loss exceeds ``mean`` by more than z standard errors (sd / sqrt(n))."""
    keys, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, loss) / counts
    score = (means - mean) / ((sd or 1.0) / np.sqrt(counts))
    return keys[(counts >= min_n) & (score > z)]


def attribute(labels, scores, sources, items, reference_loss: float, reference_sd: float, z: float,
              min_source_n: int, min_item_n: int) -> Attribution:
    """Suspect sources and items against the reference loss (mean, sd per example), and the shares
    of the excess loss on their examples."""
    loss = log_losses(labels, scores)
    bad_sources = _suspects(sources, loss, reference_loss, reference_sd, z, min_source_n)
    bad_items = _suspects(items, loss, reference_loss, reference_sd, z, min_item_n)
    excess = np.maximum(loss - reference_loss, 0.0)
    total = excess.sum() or 1.0
    return Attribution(bad_sources, bad_items, float(excess[np.isin(sources, bad_sources)].sum() / total),
                       float(excess[np.isin(items, bad_items)].sum() / total))


class Guard:
    """Decides from served scores; the caller carries out (emission hold, rollback records)."""

    def __init__(self, config: GuardConfig | None = None):
        self.config = c = config or GuardConfig()
        self.monitor = QualityMonitor(c.window, c.block)
        self.state = OPEN
        self.operator_hold = False
        self.expiry_hold: str | None = None  # why the expiry breaker holds, until the operator resumes
        self.expiry_holds = 0
        self.good_seq = 0
        self.holds = self.rollbacks = self.rows_rolled_back = self.drifts = self.false_alarms = 0
        self.evaluations = 0
        self.examples = 0
        self.quarantine: dict[int, int] = {}  # source FID -> examples count at which it ends
        self.last_report: WindowReport | None = None
        self._reference: list[tuple[float, float, float]] = []  # (auc, loss mean, loss sd) of good windows
        self._cooldown_until = 0
        self._incident_until = 0
        self._pending: Attribution | None = None
        self._pending_first_seq: int | None = None
        self._held_blocks = 0

    @property
    def emitting(self) -> bool:
        return not self.operator_hold and self.state != HELD and self.expiry_hold is None

    @property
    def state_name(self) -> str:
        if self.operator_hold:
            return "held (operator)"
        return "held (expiry breaker)" if self.expiry_hold is not None else self.state

    def keep(self, sources: np.ndarray) -> np.ndarray:
        """Mask of the examples whose source is not quarantined (the rest are not trained on)."""
        if not self.quarantine:
            return np.ones(len(sources), np.bool_)
        return ~np.isin(sources, np.fromiter(self.quarantine, np.uint64, len(self.quarantine)))

    def observe(self, scores, labels, seqs, sources, items, weights=None) -> list[Decision]:
        """Served scores of joined examples (before training on them; ``weights``: 1 / sample rate);
        returns what to do."""
        self.examples += len(labels)
        if not self.config.enabled:
            return []
        keep = self.keep(np.asarray(sources, np.uint64))
        decisions = []
        weights = np.ones(len(labels)) if weights is None else weights
        arrays = [np.asarray(a)[keep] for a in (scores, labels, seqs, sources, items, weights)]
        for _ in self.monitor.add(*arrays):
            decision = self._evaluate()
            if decision is not None:
                log.warning("guard %s: %s", decision.action, decision.reason)
                decisions.append(decision)
        return decisions

    # ------------------------------------------------------------ evaluation

    def _window(self):
        """The monitor's window without quarantined sources: scores, labels, seqs, sources, items, weights."""
        arrays = self.monitor.arrays()
        keep = self.keep(arrays[3])
        return tuple(a[keep] for a in arrays)

    def _reference_level(self) -> tuple[float, float, float] | None:
        """Medians of (AUC, loss mean, loss sd) over recent good windows; None before 3 of them."""
        if len(self._reference) < 3:
            return None
        ref = np.array(self._reference[-self.config.reference_windows:])
        return tuple(float(x) for x in np.median(ref, axis=0))

    def _degraded(self, r: WindowReport, ref) -> bool:
        """Window AUC below the reference by more than auc_margin and z standard errors."""
        return ref[0] - r.auc > max(self.config.auc_margin, self.config.z * r.auc_se)

    def _attribute(self, window, ref) -> Attribution:
        scores, labels, _, sources, items, _ = window
        c = self.config
        return attribute(labels, scores, sources, items, ref[1], ref[2], c.source_z,
                         max(c.min_group_examples, int(np.ceil(c.source_share * labels.shape[0]))),
                         c.min_group_examples)

    def _evaluate(self) -> Decision | None:
        c = self.config
        self.evaluations += 1
        for source in [s for s, until in self.quarantine.items() if until <= self.examples]:
            del self.quarantine[source]
        window = self._window()
        scores, labels, seqs, sources, items, weights = window
        r = report(scores, labels, seqs, weights)
        self.last_report = r
        if r.positives < c.min_class or r.examples - r.positives < c.min_class:
            return None
        ref = self._reference_level()
        if ref is None:
            self._remember_good(r, window)
            return None
        found = self._attribute(window, ref)
        if self.examples < self._incident_until:
            self._quarantine(found.sources, self._incident_until)
        if self.state == HELD:
            return self._confirm(r, ref, window)
        degraded = self._degraded(r, ref)
        concentrated = (len(found.sources) > 0 and found.source_share >= max(found.item_share, c.min_excess_share))
        if self.examples < self._cooldown_until:
            if not concentrated:
                return None
        elif self._cooldown_until:  # the model has had its time to adapt: a fresh reference from here
            self._cooldown_until = 0
            self._reference.clear()
            self._remember_good(r, window)
            return None
        if not degraded and not concentrated:
            self._remember_good(r, window)
            return None
        self._pending = found
        self._pending_first_seq = int(seqs[np.isin(sources, found.sources)].min()) if len(found.sources) else None
        self._quarantine(found.sources, self.examples + c.quarantine_examples)
        self.state = HELD
        self.holds += 1
        return Decision("hold", f"window AUC {r.auc:.4f} (se {r.auc_se:.4f}, {r.examples} examples, served at seq "
                        f"{r.seq_lo}..{r.seq_hi}) against reference {ref[0]:.4f}"
                        f"{'' if degraded else ' (within the margin)'}; {len(found.sources)} suspect sources "
                        f"(excess-loss share {found.source_share:.2f}), {len(found.items)} suspect items (share "
                        f"{found.item_share:.2f})", report=r.as_dict())

    def _auc_with(self, sources: np.ndarray) -> float:
        """AUC of the window with ``sources`` put back in (other quarantined sources still out)."""
        scores, labels, seqs, all_sources, _, _ = self.monitor.arrays()
        keep = self.keep(all_sources) | np.isin(all_sources, sources)
        return report(scores[keep], labels[keep], seqs[keep]).auc

    def _remember_good(self, r: WindowReport, window) -> None:
        loss = log_losses(window[1], window[0])  # unweighted, as the per-group z-tests use it
        self._reference.append((r.auc, float(loss.mean()), float(loss.std())))
        del self._reference[:-self.config.reference_windows]
        self.good_seq = max(self.good_seq, r.seq_lo)

    def _confirm(self, r: WindowReport, ref, window) -> Decision | None:
        """One block after a hold: the window now leaves the suspects out (quarantined). New concentrated
        suspects (the bad input may have just begun) extend the hold by a block, up to ``max_held_blocks``."""
        c = self.config
        pending = self._pending
        still = self._degraded(r, ref)
        found = self._attribute(window, ref)
        if len(found.sources) and found.source_share >= max(found.item_share, c.min_excess_share) \
                and self._held_blocks < c.max_held_blocks:
            self._held_blocks += 1
            self._quarantine(found.sources, self.examples + c.quarantine_examples)
            first = int(window[2][np.isin(window[3], found.sources)].min())
            self._pending = Attribution(np.union1d(pending.sources, found.sources), pending.items,
                                        max(pending.source_share, found.source_share), pending.item_share)
            self._pending_first_seq = first if self._pending_first_seq is None else min(first, self._pending_first_seq)
            return None
        self._pending, self._held_blocks = None, 0
        self.state = OPEN
        with_them = self._auc_with(pending.sources)
        improved = r.auc - with_them >= c.auc_margin
        if len(pending.sources) and improved and pending.source_share >= max(pending.item_share, c.min_excess_share):
            self.rollbacks += 1
            self._incident_until = self.examples + c.quarantine_examples
            self.monitor.clear()
            to_seq = self.good_seq if self._pending_first_seq is None else min(self.good_seq, self._pending_first_seq)
            return Decision("rollback", f"confirmed: without {len(pending.sources)} quarantined sources the window AUC "
                            f"is {r.auc:.4f} ({with_them:.4f} with them, reference {ref[0]:.4f}); the damage "
                            f"follows sources (share "
                            f"{pending.source_share:.2f} vs items {pending.item_share:.2f}): rolling back to seq "
                            f"{to_seq}", to_seq=to_seq, report=r.as_dict())
        for source in pending.sources.tolist():
            self.quarantine.pop(source, None)
        if still:
            self.drifts += 1
            self._cooldown_until = self.examples + c.drift_cooldown_examples
            return Decision("drift", f"window AUC {r.auc:.4f} against reference {ref[0]:.4f}, still degraded with "
                            f"the suspect sources left out: the damage is not theirs (a change in taste): released, "
                            f"no window alarm for {c.drift_cooldown_examples} examples while the model adapts",
                            report=r.as_dict())
        self.false_alarms += 1
        return Decision("release", f"window AUC {r.auc:.4f} is back within the margin of the reference "
                        f"{ref[0]:.4f}: released", report=r.as_dict())

    def _quarantine(self, sources: np.ndarray, until: int) -> None:
        for source in sources.tolist():
            self.quarantine[source] = max(self.quarantine.get(source, 0), until)

    def status(self) -> dict:
        r = self.last_report
        return {"state": self.state_name, "good_seq": self.good_seq, "holds": self.holds, "rollbacks": self.rollbacks,
                "rows_rolled_back": self.rows_rolled_back, "drifts": self.drifts, "false_alarms": self.false_alarms,
                "evaluations": self.evaluations, "quarantined_sources": len(self.quarantine),
                "expiry_holds": self.expiry_holds, "expiry_hold": self.expiry_hold,
                "window": r.as_dict() if r else None,
                "by_seq_range": [b.as_dict() for b in list(self.monitor.blocks)[-4:]]}


def expiry_breaker(would_evict: int, rows: int, max_share: float) -> str | None:
    """Why an expiry pass that would remove ``would_evict`` of the table's ``rows`` must wait for the operator
    (more than ``max_share`` of them), or None when it may run."""
    if rows <= 0 or would_evict <= max_share * rows:
        return None
    return (f"an expiry pass would remove {would_evict} of {rows} rows ({would_evict / rows:.0%}), more than "
            f"--max-expiry-share {max_share:g}: not carried out, emission held; check the clocks (the newest "
            f"update time against the trainer's), then `monolith-rt deltas resume` runs it")


def roll_back(model: TrainerModel, writer, data_dir, schema: FeatureSchema, to_seq: int, now: float) -> RestorePlan:
    """Appends records restoring the state at ``to_seq`` (rows touched since the last emission included,
    so nothing held goes out afterwards) and puts the trainer's own rows and dense weights back to it.
    Raises updater.rollback.RollbackRangeError when to_seq is no longer retained, or when the delta
    stream is not the local one (the state at to_seq is rebuilt from local snapshots and segments)."""
    from updater.rollback import RollbackRangeError
    from server.streams.delta_log import FileDeltaWriter

    if not isinstance(writer, FileDeltaWriter):
        raise RollbackRangeError(f"rollbacks rebuild the state at a seq from the local delta stream and snapshots; "
                                 f"this trainer writes {type(writer).__name__} (the JetStream bus), where they "
                                 f"are not supported yet: hold emission and restart serving from a snapshot")
    pending = model.take_delta(writer.next_seq)  # held or not yet synced: restored, never emitted as they are
    extra = () if pending is None else np.concatenate([pending.fids, pending.evicted])
    plan = plan_rollback(data_dir, to_seq, schema, extra)
    for record in plan.records(writer.next_seq):
        writer.append(record)
    restore_model(model, plan, now)
    return plan


def restore_model(model: TrainerModel, plan: RestorePlan, now: float) -> None:
    """The plan's rows into the trainer's table: embeddings as at plan.to_seq, the Adagrad accumulators
    kept (the initial one for rows that come back); rows absent then are deleted; dense weights restored
    (Adam's moments kept)."""
    stored, found = model.table.lookup_found(plan.fids)
    rows = stored.copy()
    rows[~found, model.dim:] = model.adagrad_init
    rows[:, : model.dim] = plan.rows
    if plan.found.any():
        model.table.upsert(plan.fids[plan.found], rows[plan.found], now=now)
    if (~plan.found).any():
        model.table.delete(plan.fids[~plan.found])
    if plan.dense_state is not None:
        model.dense.load_state_dict(plan.dense_state)


class TrainerGuard:
    """The guard inside the online trainer: acts on its decisions and on the operator's control file
    (updater.rollback), and reports its state in ``<data_dir>/guard/state.json`` and as Prometheus
    metrics in ``<data_dir>/guard/metrics.prom`` (text format, for a node-exporter textfile collector),
    both written atomically."""

    CONTROL_POLL_S = 0.5

    def __init__(self, data_dir, schema: FeatureSchema, config: GuardConfig | None = None):
        from prometheus_client import CollectorRegistry, Gauge

        from updater.rollback import read_control, read_state

        self.data_dir = Path(data_dir)
        self.schema = schema
        self.guard = Guard(config)
        self.request = 0
        self.needs_checkpoint = False  # set by a rollback: the trainer checkpoints at once
        self.expiry_approved = False  # set by a resume of an expiry hold: the held pass runs, once
        self.last_action = "started"
        self._next_poll = 0.0
        self._control_mtime = None
        self.registry = CollectorRegistry()
        self._gauges = {name: Gauge(f"monolith_guard_{name}", text, registry=self.registry) for name, text in (
            ("holds_total", "quality holds of sparse emission"), ("rollbacks_total", "rollbacks emitted"),
            ("rows_rolled_back_total", "rows restored or deleted by rollbacks"),
            ("state", "0 open, 1 held by the guard, 2 held by the operator, 3 held by the expiry breaker"),
            ("expiry_holds_total", "expiry passes held by the breaker (more than --max-expiry-share of the table)"),
            ("quarantined_sources", "sources whose feedback is not trained on"),
            ("window_auc", "AUC of served scores over the window"),
            ("window_log_loss", "mean log loss of served scores over the window"),
            ("window_calibration", "mean served score / observed rate over the window"),
            ("good_seq", "last known-good delta seq"))}
        done = read_state(self.data_dir) or {}
        self.request, self.rollback_request = int(done.get("request", 0)), int(done.get("rollback_request", 0))
        self.guard.operator_hold = bool(read_control(self.data_dir)["hold"])

    @property
    def emitting(self) -> bool:
        return self.guard.emitting

    @property
    def expiry_held(self) -> bool:
        return self.guard.expiry_hold is not None

    def hold_expiry(self, reason: str) -> None:
        """The expiry breaker tripped: emission holds until the operator resumes."""
        self.guard.expiry_hold = reason
        self.guard.expiry_holds += 1
        self.last_action = f"expiry breaker: {reason}"
        log.error("guard: %s", self.last_action)
        self.write_state()

    def take_expiry_approval(self) -> bool:
        """True once after the operator resumed an expiry hold: the next pass runs whatever it removes."""
        approved, self.expiry_approved = self.expiry_approved, False
        return approved

    def observe(self, model: TrainerModel, writer, scores, seqs, labels, sources, items, now: float,
                weights=None) -> np.ndarray:
        """Served scores of a micro-batch before training; acts on decisions; returns the mask to train on."""
        for decision in self.guard.observe(scores, labels, seqs, sources, items, weights):
            self.last_action = f"{decision.action}: {decision.reason}"
            if decision.action == "rollback":
                self._roll_back(model, writer, decision.to_seq, now)
            self.write_state()
        return self.guard.keep(sources)

    def poll_control(self, model: TrainerModel, writer, now: float, monotonic_s: float) -> None:
        """Acts on a changed control file (checked every CONTROL_POLL_S)."""
        from updater.rollback import CONTROL, GUARD_DIR, read_control

        if monotonic_s < self._next_poll:
            return
        self._next_poll = monotonic_s + self.CONTROL_POLL_S
        path = self.data_dir / GUARD_DIR / CONTROL
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._control_mtime:
            return
        self._control_mtime = mtime
        try:
            control = read_control(self.data_dir)
        except ValueError as exc:
            log.error("guard control: %s", exc)
            return
        if control["request"] <= self.request:
            return
        self.request = control["request"]
        if control["hold"] != self.guard.operator_hold:
            self.guard.operator_hold = bool(control["hold"])
            self.last_action = ("operator hold: sparse and dense emission stopped" if control["hold"] else
                                "operator resume: emission goes on with the next sync")
            log.warning("guard: %s", self.last_action)
        if not control["hold"] and self.guard.expiry_hold is not None:
            self.guard.expiry_hold, self.expiry_approved = None, True
            self.last_action = "operator resume: the held expiry pass runs now, then emission goes on"
            log.warning("guard: %s", self.last_action)
        if control["rollback_request"] > self.rollback_request:
            self.rollback_request = control["rollback_request"]
            self._roll_back(model, writer, int(control["rollback_to_seq"]), now)
        self.write_state()

    def _roll_back(self, model: TrainerModel, writer, to_seq: int, now: float) -> None:
        from updater.rollback import RollbackRangeError

        try:
            plan = roll_back(model, writer, self.data_dir, self.schema, to_seq, now)
        except RollbackRangeError as exc:
            self.last_action = f"rollback to seq {to_seq} refused: {exc}"
            log.error("guard: %s", self.last_action)
            return
        self.guard.rows_rolled_back += plan.fids.shape[0]
        self.needs_checkpoint = True
        self.last_action = f"{plan.summary()}; appended up to seq {writer.next_seq - 1}"
        log.warning("guard: %s", self.last_action)

    def describe(self) -> str:
        s = self.guard.status()
        w = s["window"] or {}
        return (f"guard {s['state']}: window AUC {w.get('auc', float('nan'))}, log loss "
                f"{w.get('log_loss', float('nan'))}, calibration {w.get('calibration', float('nan'))} over "
                f"{w.get('examples', 0)} examples served at seq {w.get('seq_lo', 0)}..{w.get('seq_hi', 0)}; "
                f"good seq {s['good_seq']}, holds {s['holds']}, rollbacks {s['rollbacks']} "
                f"({s['rows_rolled_back']} rows), quarantined sources {s['quarantined_sources']}")

    def write_state(self) -> None:
        from prometheus_client import write_to_textfile

        from updater.rollback import GUARD_DIR, write_state

        status = self.guard.status()
        write_state(self.data_dir, {**status, "request": self.request, "rollback_request": self.rollback_request,
                                    "last_action": self.last_action})
        g = self._gauges
        g["holds_total"].set(status["holds"])
        g["rollbacks_total"].set(status["rollbacks"])
        g["rows_rolled_back_total"].set(status["rows_rolled_back"])
        g["state"].set(2 if self.guard.operator_hold else 3 if self.guard.expiry_hold is not None
                       else 1 if self.guard.state == HELD else 0)
        g["expiry_holds_total"].set(status["expiry_holds"])
        g["quarantined_sources"].set(status["quarantined_sources"])
        g["good_seq"].set(status["good_seq"])
        for key in ("auc", "log_loss", "calibration"):
            g[f"window_{key}"].set((status["window"] or {}).get(key, float("nan")))
        write_to_textfile(str(self.data_dir / GUARD_DIR / "metrics.prom"), self.registry)
