"""Training loops: ``batch`` (one pass over history, then a snapshot to serve
from) and ``online`` (runs beside the server: join, train, emit deltas).

Online loop, one thread, every step bounded:

    poll the joiner            new examples (positives at once, negatives as
                               windows close)
    micro-batch                trains when ``batch_size`` examples wait, or the
                               oldest has waited ``max_batch_delay_s``
    after a trained batch      its rows -> one sparse delta record at once,
                               ``emit_min_gap_s`` after the previous one at the
                               earliest (a flood of clicks: one record per gap,
                               of at most ``batch_size`` examples' rows each)
    every sync interval        the touched rows -> one sparse delta record (the
                               upper bound; the only trigger with emit_on_train off)
    every dense interval       the dense weights -> one dense delta record
    every expiry interval      per-slot TTL eviction (deletes ride the next delta),
                               on the trainer's clock, behind the expiry breaker
    every snapshot interval    sparse and dense deltas emitted first, then a
                               serving snapshot and a trainer checkpoint at
                               that seq, then retention (trainer.retention)
    stop (SIGINT/SIGTERM)      the same as a snapshot, then exit

Waiting: when nothing is to be done before the next timer, the loop waits on
the bus (local logs: server.streams.watch wakes it when a ranker or feedback
instance appends; ``idle_wait_s`` at most), so a click is joined as soon as
it lands and an idle trainer wakes a few times a second; a bus that cannot
wake it is polled every ``poll_interval_s``.

Warm-up: ``warm_up`` runs a join, a train step, a prediction, an expiry
pass, a delta's encoding and a snapshot's table on scratch copies (a scratch log, model and record, nothing the
stream or the checkpoint sees), so numba's and torch's first calls happen
before ``train online`` reports ready, not on the first user's click.

Start: the newest trainer checkpoint is restored, then the stream is made
to agree with it (``reconcile``): records past the checkpoint are undone by
one record of absolute values; a stream that ends before it is refused.

Prequential AUC: each micro-batch is scored before it is trained on.

Clock: a micro-batch is trained (its rows stamped) at the newest time among
its examples, and expiry measures ages from the newest stamp in the table,
so the logs' times drive both; replays of recorded times work unchanged.
Neither ever runs past this host's wall clock + ``max_time_ahead_s``
(the serving window's skew, server.clock), whatever a log says: a record
stamped a month ahead cannot make every row look a month old. An expiry
pass that would still remove more than ``max_expiry_share`` of the table
at once holds emission instead (the expiry breaker, trainer.guard) until
the operator's ``deltas resume``.

Quality guard (trainer.guard, ``guard=False`` turns it off): every joined
example carries the score serving gave it and the delta_seq it was served
at; the guard judges them before training, may hold emission (sparse, dense
and snapshots wait; training goes on without quarantined sources) and
appends rollback records; the operator's ``monolith-rt deltas
hold|resume|rollback`` reach it through <data_dir>/guard/control.json,
polled every 0.5 s.

Bus: the streams come from ``open_streams`` (local files or JetStream). On
JetStream a second trainer (or a zombie of this one) makes the delta
stream refuse this one's next publish (server.streams.jetstream): ``run``
then stops at once, writes nothing more (no snapshot, no checkpoint) and
sets ``fenced`` to the reason.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from server.features import FeatureSchema
from server.streams.snapshots import prune_snapshots, write_snapshot
from server.streams import Streams, open_streams, segment_bytes_from_env
from server.streams.bus import FencedError
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.data import Examples
from trainer.guard import GuardConfig, expiry_breaker
from trainer.guard_owner import TrainerGuard
from server.streams.names import FEATURES, FEEDBACK
from trainer.joiner import COUNTERS, MAX_BUFFER_BYTES, Joiner
from trainer.joiner_metrics import write_joiner_metrics
from trainer.model import TrainerModel, auc
from trainer.retention import apply_retention
from server.streams.deltas import DENSE, DeltaRecord
from server.streams.delta_log import DeltaWriter, read_through

log = logging.getLogger(__name__)

PREQUENTIAL_BATCHES = 2000


@dataclass
class OnlineConfig:
    sync_interval_s: float = 0.2
    dense_interval_s: float = 600.0
    snapshot_interval_s: float = 600.0
    expiry_interval_s: float = 60.0
    batch_size: int = 1024
    max_batch_delay_s: float = 0.005  # a lone click waits this long for company before it is trained
    window_s: float = 30.0
    negative_rate: float = 0.1
    poll_interval_s: float = 0.005
    stats_interval_s: float = 5.0
    # Online steps are small and many: gentler than batch (0.5 / 1e-2). On the
    # MovieLens replay, prequential AUC 0.717 at these vs 0.670 at batch rates
    # (the served dense weights only move every dense interval).
    lr_sparse: float = 0.05
    lr_dense: float = 1e-4
    # Feature/feedback log segments the checkpoint is past are kept this long.
    log_retention_s: float = 3600.0
    # The quality guard (trainer.guard): hold or roll back updates that make served scores worse.
    guard: bool = True
    # The join buffer's memory limit; past it the oldest entries are shed and counted (trainer.joiner).
    join_buffer_bytes: int = MAX_BUFFER_BYTES
    # Training and expiry times never run past the wall clock + this (server.clock's default skew).
    max_time_ahead_s: float = 300.0
    # An expiry pass removing more than this share of the table holds emission (the expiry breaker).
    max_expiry_share: float = 0.2
    # A trained batch's rows leave at once, records at least this far apart; off: the sync timer alone.
    emit_on_train: bool = True
    emit_min_gap_s: float = 0.01
    # The longest wait for new feedback on a bus that wakes the trainer (the local logs).
    idle_wait_s: float = 0.05

    def __post_init__(self):
        if not 0.05 <= self.sync_interval_s <= 86400:
            raise ValueError(f"sync interval requires 50 ms to 24 h, got {self.sync_interval_s} s")
        if self.batch_size < 1 or self.max_batch_delay_s < 0:
            raise ValueError("batch_size requires >= 1 and max_batch_delay_s >= 0")
        if self.log_retention_s < 0:
            raise ValueError(f"log_retention_s requires >= 0, got {self.log_retention_s}")
        if not self.max_time_ahead_s >= 0:
            raise ValueError(f"--max-time-ahead-s requires seconds >= 0 (inf: no limit), got {self.max_time_ahead_s}")
        if not 0 < self.max_expiry_share <= 1:
            raise ValueError(f"--max-expiry-share requires a share in (0, 1] (1: no breaker), got "
                             f"{self.max_expiry_share}")
        if not 0 <= self.emit_min_gap_s <= self.sync_interval_s:
            raise ValueError(f"--emit-min-gap-ms requires 0 to the sync interval ({self.sync_interval_s * 1000:g} "
                             f"ms), got {self.emit_min_gap_s * 1000:g} ms")
        if not 0 < self.idle_wait_s <= 1:
            raise ValueError(f"idle_wait_s requires (0, 1] s, got {self.idle_wait_s}")


def publish(data_dir: Path, model: TrainerModel, writer: DeltaWriter, joiner: Joiner | None,
            counters: dict | None = None, log_retention_s: float | None = None, streams: Streams | None = None) -> int:
    """Flushes pending rows as a sparse delta and the dense weights as a dense
    one, then writes a serving snapshot and a trainer checkpoint at that seq,
    so a server started from the snapshot and one that replayed the stream
    hold the same rows and the same dense weights (and ``streams`` publishes the
    snapshot to other hosts, for a JetStream bus); then, with
    ``log_retention_s``, deletes what no retained snapshot or checkpoint
    needs (trainer.retention). Returns the seq."""
    record = model.take_delta(writer.next_seq)
    if record is not None:
        writer.append(record)
    writer.append(DeltaRecord.dense(writer.next_seq, time.time(), model.dense_state()))
    seq = writer.next_seq - 1
    path = write_snapshot(data_dir, model.serving_table(), model.dense_state(), seq)
    published = True
    if streams is not None:
        try:
            streams.publish_snapshot(path, seq)
        except Exception as exc:  # servers still follow the stream; the next snapshot tries again
            log.error("publishing snapshot %s to the bus failed: %r; no retention this time", path, exc)
            published = False
    prune_snapshots(data_dir, keep=2)
    save_checkpoint(data_dir, model, joiner, seq, counters=counters)
    if log_retention_s is not None and published:  # never drop deltas that no shared snapshot covers
        apply_retention(data_dir, writer, log_retention_s)
    return seq


def reconcile(model: TrainerModel, writer: DeltaWriter, streams: Streams, checkpoint_seq: int) -> str | None:
    """Makes the stream agree with a trainer restored at ``checkpoint_seq``.

    After a kill the stream may hold records past the checkpoint (S+1..S+k,
    already applied by servers) that the restored state knows nothing of.
    Appends one sparse record that undoes them: for every FID they wrote or
    evicted, the restored row (absolute) if the trainer has it, else a
    delete; and the restored dense weights if any of them was dense. Every
    server then holds exactly the trainer's state at S again (absolute
    values: whatever it had applied of S+1..S+k). Returns what it did, or
    None when the stream ends at the checkpoint. Raises ValueError when the
    stream ends before it: records a server may need were lost."""
    last = writer.next_seq - 1
    if last < checkpoint_seq:
        raise ValueError(f"the delta stream ends at seq {last}, behind the trainer checkpoint at seq "
                         f"{checkpoint_seq}: records that servers may need are lost; requires the stream the "
                         f"checkpoint was taken with (restore it, or move the checkpoints in "
                         f"{streams.data_dir / 'trainer'} away to start training afresh)")
    if last == checkpoint_seq:
        return None
    written, dense = [], False
    first = streams.delta_first()
    after = last if first is None else max(checkpoint_seq, first - 1)
    if after > checkpoint_seq:  # retention dropped some: what they wrote cannot be undone from here
        log.warning("reconcile: the delta stream no longer retains seq %d..%d past the trainer checkpoint at seq %d",
                    checkpoint_seq + 1, after, checkpoint_seq)
    reader = streams.open_delta_reader(after)
    try:
        for record in read_through(reader, after, last, where="reconcile: the delta stream"):
            if record.kind == DENSE:
                dense = True
            else:
                written += [record.fids, record.evicted]
    finally:
        reader.close()
    fids = np.unique(np.concatenate(written)) if written else np.empty(0, np.uint64)
    rows, found = model.table.lookup_found(fids)
    writer.append(DeltaRecord.sparse(writer.next_seq, time.time(), fids[found], rows[found, : model.dim],
                                     fids[~found]))
    if dense:
        writer.append(DeltaRecord.dense(writer.next_seq, time.time(), model.dense_state()))
    message = (f"reconciled {last - checkpoint_seq} stream records past the checkpoint (seq {checkpoint_seq + 1}.."
               f"{last}): {int(found.sum())} rows restored, {int((~found).sum())} deleted"
               + (", dense weights restored" if dense else ""))
    log.warning(message)
    return message


def train_batch(schema: FeatureSchema, examples: Examples, data_dir: Path, train_fraction: float = 0.8,
                batch_size: int = 1024, progress: bool = True, bus=None, **model_args) -> tuple[dict, TrainerModel]:
    """One time-ordered pass over the first train_fraction of examples, AUC on
    the rest, then a serving snapshot + trainer checkpoint in data_dir (and the
    snapshot on ``bus``, a BusConfig; default: the environment's).
    Returns the figures and the trained model."""
    from tqdm import tqdm

    split = int(len(examples) * train_fraction)
    model = TrainerModel(schema, **model_args)
    started = time.perf_counter()
    losses = []
    with tqdm(total=split, unit="ex", disable=not progress, file=sys.stderr, desc="batch train") as bar:
        for start in range(0, split, batch_size):
            stop = min(split, start + batch_size)
            losses.append(model.train_step(examples.user_fids[start:stop], examples.item_fids[start:stop],
                                           examples.labels[start:stop], now=float(examples.times[stop - 1])))
            bar.update(stop - start)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    elapsed = time.perf_counter() - started
    tail = examples.slice(split, len(examples))
    holdout_auc = auc(tail.labels, model.predict(tail.user_fids, tail.item_fids)) if len(tail) else float("nan")
    streams = open_streams(data_dir, bus)
    writer = streams.open_delta_writer()
    try:
        seq = publish(Path(data_dir), model, writer, joiner=None, streams=streams)
    finally:
        writer.close()
        streams.close()
    result = {"examples": split, "examples_per_s": round(split / elapsed, 1),
              "loss": round(float(np.mean(losses[-50:])), 4), "holdout_examples": len(tail),
              "holdout_auc": round(holdout_auc, 4), "rows": len(model.table), "delta_seq": seq}
    return result, model


class OnlineTrainer:
    def __init__(self, schema: FeatureSchema, data_dir: str | Path, config: OnlineConfig | None = None,
                 **model_args):
        self.data_dir = Path(data_dir)
        self.config = config or OnlineConfig()
        self.model = TrainerModel(schema, **model_args)
        self.streams = open_streams(self.data_dir)  # the bus: local files or JetStream
        self.fenced: str | None = None
        self.joiner = Joiner(self.data_dir, self.config.window_s, self.config.negative_rate, streams=self.streams,
                             label_range=(schema.label_min, schema.label_max),
                             max_buffer_bytes=self.config.join_buffer_bytes)
        meta = load_checkpoint(self.data_dir, self.model, self.joiner)
        self.model.set_learning_rates(sparse=self.config.lr_sparse, dense=self.config.lr_dense)
        # Logs outlive what a checkpoint may need: two snapshot intervals at least (see the README).
        self.streams.ensure_streams(log_max_age_s=max(self.config.log_retention_s,
                                                      2 * self.config.snapshot_interval_s))
        self.writer = self.streams.open_delta_writer(segment_bytes=segment_bytes_from_env())
        self.start_message = (f"resumed from trainer checkpoint at delta_seq {meta['delta_seq']}" if meta
                              else "no trainer checkpoint: starting from fresh weights")
        try:
            reconciled = reconcile(self.model, self.writer, self.streams, meta["delta_seq"] if meta else 0)
        except BaseException:
            self.close()
            raise
        if reconciled:
            self.start_message += f"; {reconciled}"
        counters = (meta or {}).get("counters", {})
        self.examples = counters.get("examples", 0)
        for name in COUNTERS:
            setattr(self.joiner, name, counters.get(name, 0))
        self.emitted_rows = 0
        self.emitted_records = 0
        self.last_sparse_s = float("-inf")  # time.monotonic() of the last sparse record
        watch_logs = getattr(self.streams, "watch_logs", None)  # before the first poll: no append unnoticed
        self._watch = watch_logs() if watch_logs is not None else None
        # Prequential AUC over the most recent micro-batches only: memory stays bounded.
        self._scores: deque[np.ndarray] = deque(maxlen=PREQUENTIAL_BATCHES)
        self._labels: deque[np.ndarray] = deque(maxlen=PREQUENTIAL_BATCHES)
        self._losses: deque[float] = deque(maxlen=100)
        self._last_stats = (self.examples, self.emitted_rows)
        self.guard = TrainerGuard(self.data_dir, schema, GuardConfig(enabled=self.config.guard), streams=self.streams)
        recovered = self.guard.recover(self.model, self.writer, meta["delta_seq"] if meta else 0, time.time())
        if recovered:
            self.start_message += f"; {recovered}"
        if self.guard.guard.operator_hold:
            self.start_message += "; held by the operator (monolith-rt deltas resume to emit)"

    def run(self, stop: threading.Event, max_seconds: float | None = None) -> None:
        cfg = self.config
        now = time.monotonic()
        deadline = None if max_seconds is None else now + max_seconds
        next_sync = now + cfg.sync_interval_s
        next_dense = now + cfg.dense_interval_s
        next_expiry = now + cfg.expiry_interval_s
        next_snapshot = now + cfg.snapshot_interval_s
        next_stats = now + cfg.stats_interval_s
        waiting: list = []
        waiting_since = None
        try:
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                now = time.monotonic()
                joined = self.joiner.poll(now)
                if len(joined):
                    waiting.append(joined.arrays() + joined.served())
                    waiting_since = waiting_since or now
                pending = sum(w[2].shape[0] for w in waiting)
                if pending and (pending >= cfg.batch_size or now - waiting_since >= cfg.max_batch_delay_s):
                    self._train(waiting)
                    waiting, waiting_since = [], None
                self.guard.poll_control(self.model, self.writer, time.time(), now)
                if self.guard.needs_checkpoint:  # a restart must resume from the rolled-back state
                    if waiting:
                        self._train(waiting)
                        waiting, waiting_since = [], None
                    self.publish()
                # before emitting: a pass's deletes ride the same record, and a pass the breaker holds
                # holds what was trained with it
                if now >= next_expiry or self.guard.expiry_approved:
                    self._expire()
                    next_expiry = now + cfg.expiry_interval_s
                if now >= next_sync or (self._emit_due() and now >= self.last_sparse_s + cfg.emit_min_gap_s):
                    self._emit_sparse()
                    next_sync = now + cfg.sync_interval_s
                if now >= next_dense:
                    self._emit_dense()
                    next_dense = now + cfg.dense_interval_s
                if now >= next_snapshot:
                    if waiting:  # joined examples live in no log any more: train before checkpointing
                        self._train(waiting)
                        waiting, waiting_since = [], None
                    self.publish()
                    next_snapshot = now + cfg.snapshot_interval_s
                if now >= next_stats:
                    self._log_stats(cfg.stats_interval_s)
                    next_stats = now + cfg.stats_interval_s
                if not len(joined):
                    timers = [next_sync, next_dense, next_expiry, next_snapshot, next_stats]
                    if waiting:
                        timers.append(waiting_since + cfg.max_batch_delay_s)
                    if self._emit_due():
                        timers.append(self.last_sparse_s + cfg.emit_min_gap_s)
                    self._wait(stop, min(timers) - time.monotonic())
            if waiting:
                self._train(waiting)
        except FencedError as exc:  # another trainer writes the delta stream now: write nothing more
            self.fenced = str(exc)
            log.error("%s", exc)
        finally:
            if self.fenced is None:
                seq = self.publish()
                log.info("trainer stopped: snapshot and checkpoint at delta_seq %d", seq)

    def counters(self) -> dict:
        return {"examples": self.examples, **self.joiner.counters()}

    def _emit_due(self) -> bool:
        """Trained rows wait that the training trigger sends (and emission is not held)."""
        return self.config.emit_on_train and self.guard.emitting and self.model.pending_rows() > 0

    def _wait(self, stop: threading.Event, timeout_s: float) -> None:
        """Until new feedback may be there or ``timeout_s`` (the next timer) passes, ``idle_wait_s`` at
        most; a bus that cannot wake the trainer is polled."""
        if timeout_s <= 0:
            return
        if self._watch is not None and self._watch.active:
            self._watch.wait(min(timeout_s, self.config.idle_wait_s))
        else:
            stop.wait(min(timeout_s, self.config.poll_interval_s))

    def warm_up(self) -> float:
        """Compiles and runs once what the first click (and the first expiry pass, the first snapshot) costs
        (module docstring), on scratch copies: nothing reaches the stream, the table or
        the checkpoint. Returns the seconds it took."""
        import tempfile

        from server.streams import Streams
        from server.streams.records import FeatureRecord, FeedbackRecord

        started = time.perf_counter()
        schema = self.model.schema
        with tempfile.TemporaryDirectory(prefix="monolith-warm-") as scratch:
            streams = Streams(scratch)
            user, items = schema.encode_request({"user_id": "warm-up"}, [{"item_id": f"warm-{i}"} for i in range(4)])
            at = time.time()
            with streams.open_writer(FEATURES, "warm") as features, streams.open_writer(FEEDBACK, "warm") as actions:
                features.append(FeatureRecord(b"warm", at, 0, user, items, np.full(4, 0.5, np.float32)).encode())
                actions.append(FeedbackRecord(b"warm", at, at, items[:1, 0].copy(), np.ones(1, np.float32)).encode())
            joiner = Joiner(scratch, window_s=1e-3, negative_rate=1.0, streams=streams,
                            label_range=(schema.label_min, schema.label_max))
            try:
                joined = joiner.poll()
                time.sleep(2e-3)
                more = joiner.poll(time.monotonic() + 1.0)
                parts = [j.arrays() for j in (joined, more) if len(j)]
            finally:
                joiner.close()
            user_fids, item_fids, labels, times, rates = (np.concatenate(p) for p in zip(*parts)) if parts else (
                np.repeat(user, 4, axis=0), items, np.ones(4, np.float32), np.full(4, at), np.ones(4, np.float32))
            scratch_model = TrainerModel(schema)
            for _ in range(2):  # the second step runs what the first compiled, with rows present
                scratch_model.predict(user_fids, item_fids)
                scratch_model.train_step(user_fids, item_fids, labels, now=float(times.max()), sample_rates=rates)
            auc(labels, scratch_model.predict(user_fids, item_fids))
            newest = scratch_model.table.newest_stamp  # an expiry pass (every expiry interval) removing all
            scratch_model.count_expired(newest + 1e9)
            scratch_model.evict_expired(newest + 1e9)
            record = scratch_model.take_delta(1)
            if record is not None:
                DeltaRecord.decode(record.encode())
            scratch_model.serving_table()  # what a snapshot copies
        return time.perf_counter() - started

    def publish(self) -> int:
        if not self.guard.emitting:
            # A snapshot would serve the held rows. The last checkpoint stays the restart point: the logs
            # past it are retained, so a restart re-joins and re-trains what came since.
            log.warning("emission held: no snapshot or checkpoint now (%s)", self.guard.describe())
            return self.writer.next_seq - 1
        self.guard.needs_checkpoint = False
        seq = publish(self.data_dir, self.model, self.writer, self.joiner, self.counters(),
                      log_retention_s=self.config.log_retention_s, streams=self.streams)
        self.guard.checkpointed(seq)  # an appended rollback is done for good once a checkpoint covers it
        return seq

    def _train(self, waiting: list) -> None:
        user, items, labels, times, rates, served, seqs = (np.concatenate(parts) for parts in zip(*waiting))
        for start in range(0, labels.shape[0], self.config.batch_size):
            part = slice(start, start + self.config.batch_size)
            self._scores.append(self.model.predict(user[part], items[part]))
            self._labels.append(labels[part])
            now = self.training_time(float(times[part].max()))
            keep = self.guard.observe(self.model, self.writer, served[part], seqs[part], labels[part],
                                      user[part, 0], items[part, 0], now=now, weights=1.0 / rates[part],
                                      times=times[part])
            if not keep.any():
                continue
            self._losses.append(self.model.train_step(user[part][keep], items[part][keep], labels[part][keep],
                                                      now=now, sample_rates=rates[part][keep]))
        self.examples += labels.shape[0]

    def training_time(self, newest_s: float) -> float:
        """The time a micro-batch whose newest example is ``newest_s`` is trained (stamped) at: that
        time, never past the wall clock + max_time_ahead_s."""
        return min(newest_s, time.time() + self.config.max_time_ahead_s)

    def expiry_clock(self) -> float:
        """The time expiry measures ages from: the newest stamp in the table (Monolith's rule, right
        for replays), never past the wall clock + max_time_ahead_s (a stamp restored from an older
        checkpoint may be)."""
        return min(self.model.table.newest_stamp, time.time() + self.config.max_time_ahead_s)

    def _expire(self) -> None:
        """One TTL pass on ``expiry_clock``; its deletes ride the next delta. A pass that would remove
        more than max_expiry_share of the table is not carried out: emission holds until the operator
        resumes (trainer.guard), and then it runs."""
        if self.guard.expiry_held:
            return
        now = self.expiry_clock()
        if not self.guard.take_expiry_approval():
            reason = expiry_breaker(self.model.count_expired(now), len(self.model.table),
                                    self.config.max_expiry_share)
            if reason is not None:
                self.guard.hold_expiry(reason)
                return
        evicted = self.model.evict_expired(now)
        log.info("expiry pass at %.3f: %d rows past their slot's TTL removed, %d remain", now, evicted.shape[0],
                 len(self.model.table))

    def _emit_sparse(self) -> None:
        if not self.guard.emitting:  # held: rows stay pending and go out with the first sync after release
            return
        record = self.model.take_delta(self.writer.next_seq)
        if record is not None:
            self.writer.append(record)
            self.emitted_rows += record.fids.shape[0]
            self.emitted_records += 1
            self.last_sparse_s = time.monotonic()

    def _emit_dense(self) -> None:
        if not self.guard.emitting:
            return
        self._emit_sparse()
        self.writer.append(DeltaRecord.dense(self.writer.next_seq, time.time(), self.model.dense_state()))
        self.emitted_records += 1

    def prequential_auc(self) -> float:
        if not self._labels:
            return float("nan")
        return auc(np.concatenate(self._labels), np.concatenate(self._scores))

    def _log_stats(self, interval_s: float) -> None:
        j = self.joiner
        last = self._last_stats
        self._last_stats = (self.examples, self.emitted_rows)
        log.info("%.0f examples/s, loss %.4f, prequential AUC %.4f, %.0f emitted rows/s; totals: examples %d, "
                 "emitted rows %d (%d records), joined %d, negatives %d, late %d, buffered %d (%.1f of %.0f MB), "
                 "duplicates %d, ambiguous %d, refused labels %d, shed impressions %d, shed actions %d",
                 (self.examples - last[0]) / interval_s,
                 float(np.mean(self._losses)) if self._losses else float("nan"), self.prequential_auc(),
                 (self.emitted_rows - last[1]) / interval_s, self.examples, self.emitted_rows,
                 self.emitted_records, j.joined, j.negatives, j.late, j.buffered, j.buffer_bytes / 2**20,
                 j.max_buffer_bytes / 2**20, j.duplicates, j.ambiguous, j.refused_labels, j.shed_impressions,
                 j.shed_actions)
        write_joiner_metrics(self.data_dir, j)
        log.info("%s", self.guard.describe())
        self.guard.write_state()

    def close(self) -> None:
        if getattr(self, "_watch", None) is not None:  # absent when __init__ failed before it
            self._watch.close()
        self.joiner.close()
        self.writer.close()
        self.streams.close()


def configure_torch() -> None:
    torch.set_num_threads(1)
