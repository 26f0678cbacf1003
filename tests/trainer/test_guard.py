"""The quality guard on synthetic served scores (clean, poison, drift), and its rollback of a real trainer
through a real delta stream (no Triton; tests/e2e/test_rollback_serving.py drives servers)."""

import threading
import time

import numpy as np
import pytest

from server.features import shipped_schema
from server.streams import DELTAS, Streams
from server.tensor_io import encode_tensors
from trainer.guard import Guard, GuardConfig
from trainer.guard_owner import TrainerGuard, roll_back
from tests.stream_state import stream_state
from trainer.model import TrainerModel
from trainer.online import OnlineTrainer
from updater.rollback import read_state, rollback_now, write_control
from server.streams.delta_log import FileDeltaWriter

SCHEMA = shipped_schema()
NEGATIVE_RATE = 0.1


class Stream:
    """Impressions of 20,000 users x 2,000 items; click probability from item and user effects; the
    served score is that probability seen through a model's error (logit noise). Negatives are kept at
    0.1 (what the joiner hands the trainer); a new delta seq every 100 impressions."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.item_logit = self.rng.normal(0, 1.2, 2000)
        self.user_logit = self.rng.normal(0, 0.5, 20_000)
        self.seq = 0
        self.flipped = np.zeros(2000, np.bool_)  # the users' taste for these items turned over
        self.learned = np.zeros(2000, np.bool_)  # ... and the served model knows it

    def batch(self, n=1000, bad_sources=0, bad_share=0.0):
        self.seq += n // 100
        users = self.rng.integers(0, 20_000, n)
        items = self.rng.integers(0, 2000, n)
        logit = self.item_logit[items] + self.user_logit[users]
        p = 1 / (1 + np.exp(-logit))
        served = 1 / (1 + np.exp(-(np.where(self.learned[items], -1, 1) * logit + self.rng.normal(0, 0.5, n))))
        labels = (self.rng.random(n) < np.where(self.flipped[items], 1 - p, p)).astype(np.float32)
        explicit = np.zeros(n, np.bool_)
        if bad_sources:  # an inverting client: a few sources, explicit labels, the opposite of the truth
            m = int(n * bad_share)
            users[:m] = 1_000_000 + self.rng.integers(0, bad_sources, m)
            labels[:m] = (self.rng.random(m) >= p[:m]).astype(np.float32)
            explicit[:m] = True
        keep = (labels > 0) | explicit | (self.rng.random(n) < NEGATIVE_RATE)
        return (served[keep], labels[keep], np.full(int(keep.sum()), self.seq), users[keep].astype(np.uint64),
                items[keep].astype(np.uint64))


def replay(guard, stream, batches, **bad):
    decisions = []
    for _ in range(batches):
        decisions += guard.observe(*stream.batch(**bad))
    return decisions


def test_a_long_clean_replay_raises_no_rollback_and_few_holds():
    guard, stream = Guard(), Stream(0)
    decisions = replay(guard, stream, 300)  # 300,000 impressions, ~330 evaluations
    assert guard.evaluations > 300
    assert guard.rollbacks == 0, decisions
    assert guard.holds / guard.evaluations < 0.02, f"{guard.holds} holds in {guard.evaluations} evaluations"
    assert guard.emitting and not guard.quarantine


def test_an_inverting_client_is_held_rolled_back_and_quarantined():
    guard, stream = Guard(), Stream(1)
    replay(guard, stream, 20)
    assert guard.holds == 0
    seq_before = stream.seq
    decisions = replay(guard, stream, 10, bad_sources=5, bad_share=0.3)
    actions = [d.action for d in decisions]
    assert actions[0] == "hold" and "rollback" in actions, decisions
    rollback = decisions[actions.index("rollback")]
    assert rollback.to_seq <= seq_before  # a state from before the first bad example was trained on
    assert set(guard.quarantine) >= {1_000_000 + s for s in range(5)}
    assert all(q >= 1_000_000 for q in guard.quarantine)  # no real user quarantined
    served, labels, seqs, sources, items = stream.batch(bad_sources=5, bad_share=0.3)
    assert not guard.keep(sources)[sources >= 1_000_000].any()  # their feedback is not trained on
    assert guard.keep(sources)[sources < 1_000_000].all()
    assert not guard.emitting and guard.rollback_to == rollback.to_seq  # held until the rollback is applied
    guard.rollback_failed("the bus is down")
    assert not guard.emitting and guard.observe(*stream.batch()) == []  # still held, nothing judged meanwhile
    guard.rollback_applied(10)
    assert guard.emitting and guard.rows_rolled_back == 10


def test_an_inverting_client_whose_own_scores_the_model_lowered_is_rolled_back():
    """Live, the model learns a per-source bias for an inverting client: its examples (mostly explicit
    negatives) are served low, so putting them back raises the window's AUC and the pooled test sees no
    harm; their own ranking is inverted (loadtest guard: held 4 and 5 times, released each time, before
    the verdict looked at it)."""
    guard, stream = Guard(), Stream(4)
    replay(guard, stream, 20)

    def learned_bias(batch):
        served, labels, seqs, sources, items = batch
        bad = sources >= 1_000_000
        logit = np.log(served[bad] / (1 - served[bad]))
        served[bad] = 1 / (1 + np.exp(-(logit - 3.0)))  # served low, their order among themselves kept
        return served, labels, seqs, sources, items

    decisions = []
    for _ in range(12):
        decisions += guard.observe(*learned_bias(stream.batch(bad_sources=3, bad_share=0.3)))
    actions = [d.action for d in decisions]
    assert actions[0] == "hold" and "rollback" in actions, decisions
    assert "inverted" in decisions[actions.index("rollback")].reason
    assert "release" not in actions[: actions.index("rollback")]


def test_a_change_in_taste_the_model_learns_is_let_through():
    guard, stream = Guard(), Stream(2)
    replay(guard, stream, 20)
    stream.flipped[:600] = True  # every user turns over on 600 of 2,000 items
    decisions = replay(guard, stream, 3)  # served scores lag 3,000 impressions behind
    stream.learned[:600] = True
    decisions += replay(guard, stream, 40)
    assert guard.rollbacks == 0, decisions
    assert guard.emitting and not guard.quarantine


def test_a_change_in_taste_not_yet_learned_is_held_then_released_as_drift():
    guard, stream = Guard(GuardConfig(drift_cooldown_examples=4000)), Stream(3)
    replay(guard, stream, 20)
    stream.flipped[:600] = True
    decisions = replay(guard, stream, 20)
    actions = [d.action for d in decisions]
    assert "hold" in actions and "drift" in actions, decisions
    assert "rollback" not in actions
    assert guard.emitting and not guard.quarantine


def test_config_is_validated():
    with pytest.raises(ValueError, match="requires 0 < block <= window"):
        GuardConfig(window=100, block=500)


def served_rows(data_dir):
    return stream_state(Streams(data_dir).path(DELTAS))[0]


USERS = np.stack([SCHEMA.encode({"user_id": u}, SCHEMA.user_slots) for u in range(50)])
ITEMS = np.stack([SCHEMA.encode({"item_id": i}, SCHEMA.item_slots) for i in range(6000)])


def train_and_emit(model, writer, rng, steps, items=3000):
    for _ in range(steps):
        u, i = rng.integers(0, len(USERS), 64), rng.integers(0, items, 64)
        model.train_step(USERS[u], ITEMS[i], rng.integers(0, 2, 64).astype(np.float32), now=time.time())
        writer.append(model.take_delta(writer.next_seq))


def test_roll_back_restores_servers_and_the_trainer_to_the_state_at_s(tmp_path):
    model, rng = TrainerModel(SCHEMA), np.random.default_rng(0)
    with FileDeltaWriter(Streams(tmp_path).path(DELTAS)) as writer:
        train_and_emit(model, writer, rng, 5)
        s = writer.next_seq - 1
        at_s = served_rows(tmp_path)
        train_and_emit(model, writer, rng, 5, items=6000)  # new rows too
        model.train_step(USERS[7:8], np.stack([SCHEMA.encode({"item_id": 99_999}, SCHEMA.item_slots)]),
                         np.ones(1, np.float32), now=time.time())  # touched, never emitted (held)
        plan = roll_back(model, writer, tmp_path, SCHEMA, s, now=time.time())
        assert plan.to_seq == s and (~plan.found).any()
        assert served_rows(tmp_path) == at_s  # byte for byte, rows created after S deleted
        rows, found = model.table.lookup_found(np.array(list(at_s), np.uint64))
        assert found.all()
        assert all(rows[k, : SCHEMA.dim].tobytes() == v for k, v in enumerate(at_s.values()))
        assert len(model.table) == len(at_s)
        assert model.take_delta(writer.next_seq) is None  # nothing held is emitted afterwards


def test_operator_control_reaches_a_trainer_guard(tmp_path):
    model, rng = TrainerModel(SCHEMA), np.random.default_rng(1)
    write_control(tmp_path, hold=True)
    guard = TrainerGuard(tmp_path, SCHEMA)
    assert not guard.emitting  # a trainer started after `deltas hold` starts held
    with FileDeltaWriter(Streams(tmp_path).path(DELTAS)) as writer:
        train_and_emit(model, writer, rng, 4)
        at_2 = stream_state(Streams(tmp_path).path(DELTAS), until_seq=2)[0]
        write_control(tmp_path, hold=False)
        guard.poll_control(model, writer, time.time(), monotonic_s=1.0)
        assert guard.emitting and read_state(tmp_path)["request"] == 2
        write_control(tmp_path, rollback_to_seq=99)
        guard.poll_control(model, writer, time.time(), monotonic_s=2.0)
        assert "refused" in read_state(tmp_path)["last_action"] and "0..4" in read_state(tmp_path)["last_action"]
        write_control(tmp_path, rollback_to_seq=2)
        guard.poll_control(model, writer, time.time(), monotonic_s=3.0)
        state = read_state(tmp_path)
        assert state["request"] == 4 and state["last_action"].startswith("rollback to seq 2")
        assert served_rows(tmp_path) == at_2
    metrics = (tmp_path / "guard" / "metrics.prom").read_text()
    assert f"monolith_guard_rows_rolled_back_total {float(state['rows_rolled_back'])}" in metrics
    assert "monolith_guard_state 0.0" in metrics


def test_a_rollback_made_while_no_trainer_runs_is_adopted_by_the_next_one(tmp_path):
    """Offline `deltas rollback`: the restarted trainer first reconciles the stream to its checkpoint (which
    undoes the rollback), then carries out the recorded rollback: servers and trainer end at the state at S."""
    rng = np.random.default_rng(2)
    trainer = OnlineTrainer(SCHEMA, tmp_path)
    try:
        train_and_emit(trainer.model, trainer.writer, rng, 3)
        s = trainer.writer.next_seq - 1
        train_and_emit(trainer.model, trainer.writer, rng, 2, items=6000)
        trainer.publish()  # checkpoint past S
        train_and_emit(trainer.model, trainer.writer, rng, 2, items=6000)  # records past the checkpoint
    finally:
        trainer.close()  # as after a kill: no publish
    at_s = stream_state(Streams(tmp_path).path(DELTAS), until_seq=s)
    assert "no trainer running" in rollback_now(tmp_path, s, SCHEMA)
    restarted = OnlineTrainer(SCHEMA, tmp_path)
    try:
        assert "reconciled" in restarted.start_message
        restarted.run(threading.Event(), max_seconds=0.3)
        assert "rollback to seq" in read_state(tmp_path)["last_action"]
        rows, dense = stream_state(Streams(tmp_path).path(DELTAS))
        assert rows == at_s[0]
        assert dense_bytes(dense) == dense_bytes(at_s[1])
        stored, found = restarted.model.table.lookup_found(np.array(list(rows), np.uint64))
        assert found.all() and len(restarted.model.table) == len(rows)
        assert all(stored[k, : SCHEMA.dim].tobytes() == v for k, v in enumerate(rows.values()))
    finally:
        restarted.close()
    again = TrainerGuard(tmp_path, SCHEMA)  # the rollback is not carried out a second time
    assert again.rollback_request == read_state(tmp_path)["rollback_request"] == 1


def dense_bytes(state: dict) -> bytes:
    """A dense state's names, order, dtypes, shapes and bytes, as one string to compare."""
    return encode_tensors(state)


def test_a_rollback_restores_the_dense_weights_at_s_when_no_dense_record_followed(tmp_path):
    """The dense interval is long: the trainer's dense weights moved on the poison without being emitted.
    After the rollback and the checkpoint that follows it, servers hold the dense weights at S byte for byte."""
    trainer, rng = OnlineTrainer(SCHEMA, tmp_path), np.random.default_rng(3)
    try:
        train_and_emit(trainer.model, trainer.writer, rng, 3)
        trainer.publish()  # sparse + dense + snapshot at S
        s = trainer.writer.next_seq - 1
        at_s = stream_state(Streams(tmp_path).path(DELTAS), until_seq=s)
        train_and_emit(trainer.model, trainer.writer, rng, 6, items=6000)  # sparse only: no dense record after S
        assert dense_bytes(trainer.model.dense_state()) != dense_bytes(at_s[1])
        plan = roll_back(trainer.model, trainer.writer, tmp_path, SCHEMA, s, now=time.time())
        assert plan.dense_state is not None
        assert dense_bytes(trainer.model.dense_state()) == dense_bytes(at_s[1])
        trainer.publish()  # the checkpoint right after a rollback publishes the dense weights again
        rows, dense = stream_state(Streams(tmp_path).path(DELTAS))
        assert rows == at_s[0] and dense_bytes(dense) == dense_bytes(at_s[1])
    finally:
        trainer.close()


def test_a_rollback_killed_before_its_checkpoint_is_carried_out_again_exactly_once(tmp_path):
    """kill -9 after the rollback was appended, before the checkpoint that makes it durable: the restarted
    trainer reconciles the stream to its older (poisoned) checkpoint, then finishes the rollback; a second
    restart, past a checkpoint, recognises it done. The guard's own state comes back too."""
    rng = np.random.default_rng(4)
    trainer = OnlineTrainer(SCHEMA, tmp_path)
    try:
        train_and_emit(trainer.model, trainer.writer, rng, 3)
        s = trainer.writer.next_seq - 1
        train_and_emit(trainer.model, trainer.writer, rng, 2, items=6000)  # the poison, emitted ...
        trainer.publish()  # ... and in the checkpoint
        train_and_emit(trainer.model, trainer.writer, rng, 2, items=6000)
        trainer.guard.guard.quarantine[777] = 10**9  # guard state that must survive the restart
        trainer.guard.guard.holds = 3
        write_control(tmp_path, rollback_to_seq=s)
        trainer.guard.poll_control(trainer.model, trainer.writer, time.time(), monotonic_s=1.0)
        assert trainer.guard.needs_checkpoint and read_state(tmp_path)["rollback_request"] == 1
    finally:
        trainer.close()  # killed: no publish, no checkpoint after the rollback
    at_s = stream_state(Streams(tmp_path).path(DELTAS), until_seq=s)
    restarted = OnlineTrainer(SCHEMA, tmp_path)
    try:
        assert "reconciled" in restarted.start_message and "carried out again" in restarted.start_message
        assert stream_state(Streams(tmp_path).path(DELTAS))[0] == at_s[0]
        assert restarted.guard.guard.quarantine.get(777) == 10**9 and restarted.guard.guard.holds == 3
        rolled = read_state(tmp_path)["rows_rolled_back"]
        restarted.publish()  # now durable
    finally:
        restarted.close()
    again = OnlineTrainer(SCHEMA, tmp_path)
    try:
        assert "carried out again" not in again.start_message and "reconciled" not in again.start_message
        assert again.guard.unconfirmed is None and again.guard.guard.rows_rolled_back == rolled
        assert stream_state(Streams(tmp_path).path(DELTAS))[0] == at_s[0]
    finally:
        again.close()


def test_the_guard_state_survives_a_json_round_trip_mid_verdict():
    """Guard.to_state/from_state (what the owner writes to state.json): a guard restored while holding reaches
    the same verdict as the one that never stopped, fed the same examples. The suspects' examples from before
    the hold are the verdict's evidence (quarantined, their new ones never enter the window), so the window
    goes with the state while a verdict is pending: without it the restored guard released the poison as a
    false alarm (found by `loadtest guard`, a kill -9 of the trainer during the hold)."""
    import json

    guard, stream = Guard(), Stream(1)
    replay(guard, stream, 20)
    decisions = []
    while not decisions:
        decisions = guard.observe(*stream.batch(n=200, bad_sources=2, bad_share=0.3))
    assert guard.state_name == "held" and [d.action for d in decisions] == ["hold"]
    assert "2 suspect sources" in decisions[0].reason  # every bad source held at once: none left to learn from
    restored = Guard.from_state(None, json.loads(json.dumps(guard.to_state())))
    assert restored.to_state() == json.loads(json.dumps(guard.to_state()))
    batches = [stream.batch(n=200, bad_sources=2, bad_share=0.3) for _ in range(30)]
    original = [d.action for b in batches for d in guard.observe(*b)]
    again = [d.action for b in batches for d in restored.observe(*b)]
    assert original == again and "rollback" in original
    assert restored.rollback_to == guard.rollback_to is not None and not restored.emitting


def test_a_restarted_trainer_guard_does_not_judge_again_what_it_judged_before(tmp_path):
    """A restarted trainer re-joins the logs from its checkpoint: the guard skips the examples it judged
    before the restart (at or before the newest time saved with its state), so old scores of a model trained
    further since do not pass for a drop in quality (found by `loadtest guard`: a kill -9 during a hold was
    followed by a 'drift' verdict on the re-joined warm-up examples, and the poison released). Newer ones
    are judged."""
    stream, model = Stream(3), TrainerModel(SCHEMA)

    def feed(owner, batch, t):
        served, labels, seqs, sources, items = batch
        owner.observe(model, None, served, seqs, labels, sources, items, now=t, times=np.full(len(labels), t))

    owner = TrainerGuard(tmp_path, SCHEMA)
    batches = [stream.batch() for _ in range(3)]
    for k, batch in enumerate(batches):
        feed(owner, batch, 100.0 + k)
    owner.write_state()
    judged = owner.guard.examples
    restarted = TrainerGuard(tmp_path, SCHEMA)
    for k, batch in enumerate(batches):  # the same examples, joined again
        feed(restarted, batch, 100.0 + k)
    assert restarted.guard.examples == judged
    newer = stream.batch()
    feed(restarted, newer, 200.0)
    assert restarted.guard.examples == judged + len(newer[1])
