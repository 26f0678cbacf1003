"""The quality guard's owner inside the online trainer: it feeds trainer.guard's state machine, polls
the operator's control file, carries out rollbacks (updater.rollback) on whatever bus the trainer
writes, and writes the guard's state and metrics.

Rollback, crash-safe and idempotent:

    decided (guard or operator) -> planned from the bus's own history -> appended (absolute
    values, through the bus's writer) -> trainer's rows and dense weights restored -> checkpoint

A guard's rollback that cannot be done (bus unreachable, target no longer retained) keeps the
hold (the guard's ``rollback_to``), counts a failure, logs why and is tried again every
ROLLBACK_RETRY_S; it never releases what it held. An appended rollback stays "unconfirmed" in
``<data_dir>/guard/state.json`` until a checkpoint at or past its last record exists: a restart
before then (kill -9, a snapshot write that failed) reconciles the stream to the older checkpoint
and carries the rollback out again (``recover``), exactly once: every value in it is absolute, and
a checkpoint at or past it means it was done. The guard's own state (reference, quarantine,
verdict in progress, counters) is written with every change (Guard.to_state) and restored at start.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from server.features import FeatureSchema
from server.streams.bus import FencedError
from trainer.guard import HELD, Guard, GuardConfig
from trainer.model import TrainerModel
from updater.rollback import RestorePlan, history_of, plan_rollback

log = logging.getLogger(__name__)


def roll_back(model: TrainerModel, writer, data_dir, schema: FeatureSchema, to_seq: int, now: float,
              streams=None) -> RestorePlan:
    """Appends records restoring the state at ``to_seq`` (rows touched since the last emission included,
    so nothing held goes out afterwards; the dense weights at to_seq always) and puts the trainer's own
    rows and dense weights back to it. The past is read from ``streams`` (a JetStream bus: its object
    store and DELTAS stream) or the local files. Raises updater.rollback.RollbackRangeError when to_seq
    is no longer retained, BusError/OSError when the history cannot be read; nothing pending is lost
    then (a later try includes it)."""
    history = history_of(data_dir, streams, writer.next_seq - 1)
    plan = plan_rollback(history, to_seq, schema, model.pending_fids())
    for record in plan.records(writer.next_seq):
        writer.append(record)
    model.take_delta(writer.next_seq)  # held or not yet synced: restored above, never emitted as they were
    restore_model(model, plan, now)
    return plan


def restore_model(model: TrainerModel, plan: RestorePlan, now: float) -> None:
    """The plan's rows into the trainer's table: embeddings as at plan.to_seq, the Adagrad accumulators
    kept (the initial one for rows that come back); rows absent then are deleted; dense weights restored
    (Adam's moments kept: README, "What a rollback restores")."""
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
    ROLLBACK_RETRY_S = 5.0

    def __init__(self, data_dir, schema: FeatureSchema, config: GuardConfig | None = None, streams=None):
        from prometheus_client import CollectorRegistry, Gauge

        from updater.rollback import read_control, read_state

        self.data_dir = Path(data_dir)
        self.schema = schema
        self.streams = streams
        done = read_state(self.data_dir) or {}
        self.guard = Guard.from_state(config, done["guard"]) if done.get("guard") else Guard(config)
        self.request, self.rollback_request = int(done.get("request", 0)), int(done.get("rollback_request", 0))
        # An appended rollback no checkpoint covers yet: {"to_seq", "end_seq"} (module docstring).
        self.unconfirmed: dict | None = done.get("unconfirmed_rollback")
        self.rollback_failures = int(done.get("rollback_failures", 0))
        # The newest example time judged (saved with the state). A restarted trainer re-joins the logs from
        # its checkpoint: what the guard judged before the restart is not judged again (it would fill the
        # window with old scores of a model since trained further and pass for a drop in quality).
        self.observed_until: float | None = done.get("observed_until")
        self._judged_until = self.observed_until
        self.needs_checkpoint = False  # set by a rollback: the trainer checkpoints at once
        self.expiry_approved = False  # set by a resume of an expiry hold: the held pass runs, once
        self.last_action = "started"
        self._next_poll = self._next_retry = 0.0
        self._control_mtime = None
        self.registry = CollectorRegistry()
        self._gauges = {name: Gauge(f"monolith_guard_{name}", text, registry=self.registry) for name, text in (
            ("holds_total", "quality holds of sparse emission"), ("rollbacks_total", "rollbacks emitted"),
            ("rows_rolled_back_total", "rows restored or deleted by rollbacks"),
            ("state", "0 open, 1 held by the guard, 2 held by the operator, 3 held by the expiry breaker"),
            ("rollback_pending", "1 while a rollback the guard decided is not done (emission stays held)"),
            ("rollback_failures_total", "tries at a rollback that failed (bus, range); the hold stays"),
            ("expiry_holds_total", "expiry passes held by the breaker (more than --max-expiry-share of the table)"),
            ("quarantined_sources", "sources whose feedback is not trained on"),
            ("window_auc", "AUC of served scores over the window"),
            ("window_log_loss", "mean log loss of served scores over the window"),
            ("window_calibration", "mean served score / observed rate over the window"),
            ("good_seq", "last known-good delta seq"))}
        self.guard.operator_hold = bool(read_control(self.data_dir)["hold"])

    @property
    def emitting(self) -> bool:
        return self.guard.emitting

    @property
    def expiry_held(self) -> bool:
        return self.guard.expiry_hold is not None

    def hold_expiry(self, reason: str) -> None:
        """The expiry breaker tripped: emission holds until the operator resumes."""
        self.guard.hold_expiry(reason)
        self.last_action = f"expiry breaker: {reason}"
        log.error("guard: %s", self.last_action)
        self.write_state()

    def take_expiry_approval(self) -> bool:
        """True once after the operator resumed an expiry hold: the next pass runs whatever it removes."""
        approved, self.expiry_approved = self.expiry_approved, False
        return approved

    def observe(self, model: TrainerModel, writer, scores, seqs, labels, sources, items, now: float,
                weights=None, times=None) -> np.ndarray:
        """Served scores of a micro-batch before training (``times``: each example's time); acts on
        decisions; returns the mask to train on. Examples at or before the newest time judged before a
        restart are not judged again (an unjoined impression from then is skipped with them: judged
        neither time)."""
        columns = [np.asarray(a) for a in (scores, labels, seqs, sources, items)]
        weights = np.ones(len(columns[1])) if weights is None else np.asarray(weights)
        if times is not None and len(times):
            times = np.asarray(times, np.float64)
            if self._judged_until is not None:
                new = times > self._judged_until
                columns, weights = [c[new] for c in columns], weights[new]
            self.observed_until = max(float(times.max()), self.observed_until or float("-inf"))
        for decision in self.guard.observe(*columns, weights):
            self.last_action = f"{decision.action}: {decision.reason}"
            if decision.action == "rollback":
                self._roll_back(model, writer, decision.to_seq, now, decided=True)
            self.write_state()
        return self.guard.keep(sources)

    def recover(self, model: TrainerModel, writer, checkpoint_seq: int, now: float) -> str | None:
        """At start, after the stream was reconciled to the checkpoint at ``checkpoint_seq``: finishes a
        rollback that was appended but not yet durable, or recognises that it was. Returns what it did."""
        if self.unconfirmed is None:
            return None
        to_seq, end_seq = int(self.unconfirmed["to_seq"]), int(self.unconfirmed["end_seq"])
        if checkpoint_seq >= end_seq:
            self.unconfirmed = None
            message = f"rollback to seq {to_seq} was durable (checkpoint at seq {checkpoint_seq} >= {end_seq})"
        elif self._roll_back(model, writer, to_seq, now, redo=True):
            message = (f"rollback to seq {to_seq} carried out again: appended up to seq {end_seq} before the "
                       f"restart, not yet in a checkpoint (at seq {checkpoint_seq})")
        else:
            message = f"rollback to seq {to_seq} not yet durable and not redone: {self.last_action}"
        self.last_action = message
        log.warning("guard: %s", message)
        self.write_state()
        return message

    def checkpointed(self, seq: int) -> None:
        """A checkpoint at ``seq`` is on disk: an appended rollback up to there is done for good."""
        if self.unconfirmed is not None and seq >= int(self.unconfirmed["end_seq"]):
            self.unconfirmed = None
            self.write_state()

    def poll_control(self, model: TrainerModel, writer, now: float, monotonic_s: float) -> None:
        """Acts on a changed control file (checked every CONTROL_POLL_S); tries a rollback the guard
        decided and could not do again every ROLLBACK_RETRY_S."""
        from updater.rollback import CONTROL, GUARD_DIR, read_control

        if self.guard.rollback_to is not None and monotonic_s >= self._next_retry:
            self._next_retry = monotonic_s + self.ROLLBACK_RETRY_S
            self._roll_back(model, writer, self.guard.rollback_to, now, decided=True)
            self.write_state()
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
        expiry_held = self.guard.expiry_hold is not None
        for change in self.guard.operator_command(bool(control["hold"])):
            self.last_action = change
            log.warning("guard: %s", change)
        self.expiry_approved |= expiry_held and self.guard.expiry_hold is None
        if control["rollback_request"] > self.rollback_request:
            self.rollback_request = control["rollback_request"]
            self._roll_back(model, writer, int(control["rollback_to_seq"]), now)
        self.write_state()

    def _roll_back(self, model: TrainerModel, writer, to_seq: int, now: float, decided: bool = False,
                   redo: bool = False) -> bool:
        """Carries out a rollback; True when appended. ``decided``: the guard's own (a failure keeps the
        hold); ``redo``: one appended before a restart (not counted twice)."""
        from updater.rollback import RollbackRangeError

        try:
            plan = roll_back(model, writer, self.data_dir, self.schema, to_seq, now, self.streams)
        except FencedError:
            raise
        except RollbackRangeError as exc:
            self._failed(to_seq, decided or redo, "refused", exc)
            return False
        except Exception as exc:  # the bus or the disk: the history could not be read or the records not written
            self._failed(to_seq, decided or redo, "failed", exc)
            return False
        rows = 0 if redo else plan.fids.shape[0]
        if decided or self.guard.rollback_to is not None and self.guard.rollback_to == to_seq:
            self.guard.rollback_applied(rows)
        else:
            self.guard.rows_rolled_back += rows
        self.unconfirmed = {"to_seq": int(to_seq), "end_seq": int(writer.next_seq - 1)}
        self.needs_checkpoint = True
        self.last_action = f"{plan.summary()}; appended up to seq {writer.next_seq - 1}"
        log.warning("guard: %s", self.last_action)
        return True

    def _failed(self, to_seq: int, holds: bool, verb: str, exc: Exception) -> None:
        self.rollback_failures += 1
        if holds:
            self.guard.rollback_failed(f"{type(exc).__name__}: {exc}")
            self.last_action = (f"rollback to seq {to_seq} {verb}: {exc}; emission stays held, tried again every "
                                f"{self.ROLLBACK_RETRY_S:.0f} s (`monolith-rt deltas resume` drops it)")
        else:
            self.last_action = f"rollback to seq {to_seq} {verb}: {exc}"
        log.error("guard: %s", self.last_action)

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
                                    "last_action": self.last_action, "unconfirmed_rollback": self.unconfirmed,
                                    "rollback_failures": self.rollback_failures, "observed_until": self.observed_until,
                                    "guard": self.guard.to_state()})
        g = self._gauges
        g["holds_total"].set(status["holds"])
        g["rollbacks_total"].set(status["rollbacks"])
        g["rows_rolled_back_total"].set(status["rows_rolled_back"])
        g["state"].set(2 if self.guard.operator_hold else 3 if self.guard.expiry_hold is not None
                       else 1 if self.guard.state == HELD else 0)
        g["rollback_pending"].set(0 if self.guard.rollback_to is None else 1)
        g["rollback_failures_total"].set(self.rollback_failures)
        g["expiry_holds_total"].set(status["expiry_holds"])
        g["quarantined_sources"].set(status["quarantined_sources"])
        g["good_seq"].set(status["good_seq"])
        for key in ("auc", "log_loss", "calibration"):
            g[f"window_{key}"].set((status["window"] or {}).get(key, float("nan")))
        write_to_textfile(str(self.data_dir / GUARD_DIR / "metrics.prom"), self.registry)
