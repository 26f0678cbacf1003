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

    poison     concentrated suspects, and either the window without them
               scores an AUC at least auc_margin above the same window with
               them (they hurt; a heavy but honest user whose taste the model
               misses does not), or their own examples rank inverted: AUC
               below 0.5 by more than max(auc_margin, inverted_z * se). Live,
               an inverting client's examples are mostly explicit negatives
               among sampled ones, so they raise the pooled AUC while their
               own ranking runs against everyone else's (``loadtest guard``:
               0.72 with them, 0.70 without, 0.40 to 0.45 within them)
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
example of that window (every state since then was judged).

A rollback decided here keeps the hold until its owner reports it applied
(``rollback_applied``): a rollback that cannot be done (``rollback_failed``:
the bus unreachable, the target no longer retained) leaves emission held,
never released, until it succeeds or the operator resumes.

This module decides and does no I/O: ``Guard`` is a state machine fed with
served scores and the owner's reports, and ``to_state``/``from_state`` carry
it across a restart. Its owner in the online trainer
(trainer.guard_owner.TrainerGuard) polls the operator's control file,
carries out rollbacks (updater.rollback) and writes state and metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from trainer.quality import QualityMonitor, WindowReport, log_losses, report

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
    inverted_z: float = 2.0
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
class _OwnRanking:
    auc: float
    se: float
    examples: int
    inverted: bool


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
        self.rollback_to: int | None = None  # a rollback decided and not yet applied: the hold stays
        self.rollback_error: str | None = None  # why the last try at it failed

    @property
    def emitting(self) -> bool:
        return not self.operator_hold and self.state != HELD and self.expiry_hold is None

    @property
    def state_name(self) -> str:
        if self.operator_hold:
            return "held (operator)"
        if self.expiry_hold is not None:
            return "held (expiry breaker)"
        return "held (rollback not done)" if self.rollback_to is not None else self.state

    # ------------------------------------------------------------ the owner's reports and the operator

    def rollback_applied(self, rows: int) -> None:
        """The owner appended the rollback (``rows`` restored or deleted): a rollback hold is released."""
        self.rows_rolled_back += rows
        if self.rollback_to is not None:
            self.rollback_to, self.state = None, OPEN
        self.rollback_error = None

    def rollback_failed(self, reason: str) -> None:
        """The owner could not carry out ``rollback_to``: emission stays held (it retries)."""
        self.rollback_error = reason

    def hold_expiry(self, reason: str) -> None:
        """The expiry breaker tripped: emission holds until the operator resumes."""
        self.expiry_hold = reason
        self.expiry_holds += 1

    def operator_command(self, hold: bool) -> list[str]:
        """The operator's hold or resume; returns what changed. A resume also approves a held expiry pass
        (``expiry_approved``) and releases a hold whose rollback could not be done (the operator's call)."""
        changed = []
        if hold != self.operator_hold:
            self.operator_hold = hold
            changed.append("operator hold: sparse and dense emission stopped" if hold else
                           "operator resume: emission goes on with the next sync")
        if not hold and self.expiry_hold is not None:
            self.expiry_hold = None
            changed.append("operator resume: the held expiry pass runs now, then emission goes on")
        if not hold and self.rollback_to is not None:
            changed.append(f"operator resume: the rollback to seq {self.rollback_to} that could not be done "
                           f"({self.rollback_error}) is dropped and the guard's hold released")
            self.rollback_to, self.rollback_error, self.state = None, None, OPEN
        return changed

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
        if self.rollback_to is not None:  # held until the rollback is applied: nothing to judge yet
            return None
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

    def _own_ranking(self, sources: np.ndarray) -> "_OwnRanking":
        """How the served scores rank the suspects' own examples in the window (those from before the
        hold). Inverted: AUC below 0.5 by more than auc_margin and inverted_z standard errors, with
        min_class examples of each label. Their labels then run against what every other source taught
        the model, as an inverting client's do; a heavy honest user whose taste the model misses ranks
        near 0.5. (Their pooled effect says nothing here: mostly explicit negatives with low scores,
        they raise the window's AUC while their own ranking is inverted.)"""
        scores, labels, seqs, all_sources, _, _ = self.monitor.arrays()
        mine = np.isin(all_sources, sources)
        r = report(scores[mine], labels[mine], seqs[mine])
        c = self.config
        enough = min(r.positives, r.examples - r.positives) >= c.min_class
        inverted = enough and 0.5 - r.auc > max(c.auc_margin, c.inverted_z * r.auc_se)
        return _OwnRanking(r.auc, r.auc_se, r.examples, bool(inverted))

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
        with_them = self._auc_with(pending.sources)
        own = self._own_ranking(pending.sources)
        improved = r.auc - with_them >= c.auc_margin
        if len(pending.sources) and (improved or own.inverted) \
                and pending.source_share >= max(pending.item_share, c.min_excess_share):
            self.rollbacks += 1
            self._incident_until = self.examples + c.quarantine_examples
            self.monitor.clear()
            to_seq = self.good_seq if self._pending_first_seq is None else min(self.good_seq, self._pending_first_seq)
            self.rollback_to = to_seq  # the hold stays until the owner reports the rollback applied
            return Decision("rollback", f"confirmed: without {len(pending.sources)} quarantined sources the window AUC "
                            f"is {r.auc:.4f} ({with_them:.4f} with them, reference {ref[0]:.4f}); their own "
                            f"examples rank at AUC {own.auc:.4f} (se {own.se:.4f}, {own.examples} examples)"
                            f"{', inverted' if own.inverted else ''}; the damage follows sources (share "
                            f"{pending.source_share:.2f} vs items {pending.item_share:.2f}): rolling back to seq "
                            f"{to_seq}", to_seq=to_seq, report=r.as_dict())
        self.state = OPEN
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
                        f"{ref[0]:.4f} ({with_them:.4f} with the {len(pending.sources)} suspect sources put back, "
                        f"less than {c.auc_margin} apart: no poison shown): released", report=r.as_dict())

    def _quarantine(self, sources: np.ndarray, until: int) -> None:
        for source in sources.tolist():
            self.quarantine[source] = max(self.quarantine.get(source, 0), until)

    def status(self) -> dict:
        r = self.last_report
        return {"state": self.state_name, "good_seq": self.good_seq, "holds": self.holds, "rollbacks": self.rollbacks,
                "rows_rolled_back": self.rows_rolled_back, "drifts": self.drifts, "false_alarms": self.false_alarms,
                "evaluations": self.evaluations, "quarantined_sources": len(self.quarantine),
                "expiry_holds": self.expiry_holds, "expiry_hold": self.expiry_hold,
                "rollback_to": self.rollback_to, "rollback_error": self.rollback_error,
                "window": r.as_dict() if r else None,
                "by_seq_range": [b.as_dict() for b in list(self.monitor.blocks)[-4:]]}

    # ------------------------------------------------------------ across a restart

    _SCALARS = ("state", "expiry_hold", "expiry_holds", "good_seq", "holds", "rollbacks", "rows_rolled_back",
                "drifts", "false_alarms", "evaluations", "examples", "rollback_to", "rollback_error")

    def to_state(self) -> dict:
        """What a restarted guard needs (JSON-able): state, counters, reference, quarantine, the pending
        verdict and rollback; and while a verdict is pending the window, its evidence (the suspects'
        examples from before the hold: quarantined, their new ones never enter it). Otherwise the
        window is not kept: it fills again from new examples."""
        p = self._pending
        return {**{k: getattr(self, k) for k in self._SCALARS},
                "reference": [list(r) for r in self._reference], "quarantine": [[int(k), int(v)] for k, v in self.quarantine.items()],
                "cooldown_until": self._cooldown_until, "incident_until": self._incident_until,
                "held_blocks": self._held_blocks, "pending_first_seq": self._pending_first_seq,
                "pending": None if p is None else {"sources": p.sources.tolist(), "items": p.items.tolist(),
                                                   "source_share": p.source_share, "item_share": p.item_share},
                "window": None if p is None else self.monitor.to_state()}

    @classmethod
    def from_state(cls, config: GuardConfig | None, state: dict) -> "Guard":
        guard = cls(config)
        for key in cls._SCALARS:
            if key in state:
                setattr(guard, key, state[key])
        guard._reference = [tuple(r) for r in state.get("reference", [])]
        guard.quarantine = {int(k): int(v) for k, v in state.get("quarantine", [])}
        guard._cooldown_until = state.get("cooldown_until", 0)
        guard._incident_until = state.get("incident_until", 0)
        guard._held_blocks = state.get("held_blocks", 0)
        guard._pending_first_seq = state.get("pending_first_seq")
        p = state.get("pending")
        if p is not None:
            guard._pending = Attribution(np.asarray(p["sources"], np.uint64), np.asarray(p["items"], np.uint64),
                                         p["source_share"], p["item_share"])
            if state.get("window"):
                guard.monitor.restore(state["window"])
        elif guard.state == HELD and guard.rollback_to is None:  # held with no verdict to wait for: judge afresh
            guard.state = OPEN
        return guard


def expiry_breaker(would_evict: int, rows: int, max_share: float) -> str | None:
    """Why an expiry pass that would remove ``would_evict`` of the table's ``rows`` must wait for the operator
    (more than ``max_share`` of them), or None when it may run."""
    if rows <= 0 or would_evict <= max_share * rows:
        return None
    return (f"an expiry pass would remove {would_evict} of {rows} rows ({would_evict / rows:.0%}), more than "
            f"--max-expiry-share {max_share:g}: not carried out, emission held; check the clocks (the newest "
            f"update time against the trainer's), then `monolith-rt deltas resume` runs it")

