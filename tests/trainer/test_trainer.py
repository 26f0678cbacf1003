"""Trainer: training step, deltas, admission/expiry, joiner, checkpoints, and end to end with Triton."""

import json
import threading

import numpy as np
import pytest
import torch

from tests.logs import write_action, write_feature
from server.features import PAD_FID, FeatureSchema, Slot, fid, shipped_schema
from server.streams.records import FeatureRecord, FeedbackRecord
from server.streams import SegmentLogWriter
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.joiner import Joiner
from trainer.model import TrainerModel, auc
from trainer.online import OnlineConfig, OnlineTrainer

SCHEMA = shipped_schema()


def batch(n, user_id=1, first_item=0):
    user, items = SCHEMA.encode_request({"user_id": user_id, "hour": 3},
                                        [{"item_id": first_item + i, "item_genres": ["Drama"]} for i in range(n)])
    return np.repeat(user[None], n, axis=0), items


def test_auc_matches_pairwise_definition(rng):
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 20, 300).astype(float)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auc(labels, scores) == pytest.approx(pairwise)


def test_step_changes_exactly_the_touched_rows_and_the_delta_carries_them():
    model = TrainerModel(SCHEMA)
    user, items = batch(8)
    model.train_step(user, items, np.ones(8, np.float32), now=10.0)
    before = {int(f): r.copy() for fids, rows, _ in model.table.items() for f, r in zip(fids, rows)}
    model.take_delta(1)
    user2, items2 = batch(4, user_id=2, first_item=100)  # shares genre and hour FIDs with the first batch
    model.train_step(user2, items2, np.zeros(4, np.float32), now=11.0)
    after = {int(f): r for fids, rows, _ in model.table.items() for f, r in zip(fids, rows)}
    touched = set(np.unique(np.concatenate([user2, items2], axis=1)).tolist()) - {PAD_FID}
    assert touched <= set(after)
    for f in set(after) - touched:
        np.testing.assert_array_equal(after[f], before[f])  # untouched rows: bit for bit the same
    changed = {f for f in touched if f not in before or not np.array_equal(after[f], before[f])}
    assert changed == touched
    record = model.take_delta(2)
    assert record.seq == 2 and set(record.fids.tolist()) == touched
    for f, row in zip(record.fids.tolist(), record.values):
        np.testing.assert_array_equal(row, after[f][: SCHEMA.dim])  # serving gets the embedding half
    assert model.take_delta(3) is None


def test_admission_and_expiry_per_slot():
    schema = FeatureSchema((Slot("u", 1, "user", 4, ttl_s=100.0), Slot("i", 2, "item", 4, min_count=3, ttl_s=10.0)))
    model = TrainerModel(schema)
    user = np.array([[fid(1, "a")]], np.uint64)
    item = np.array([[fid(2, "x")]], np.uint64)
    for step in range(2):
        model.train_step(user, item, np.ones(1, np.float32), now=float(step))
        assert not model.table.contains(item[0])[0], "admitted before its third sighting"
    assert model.table.contains(user[0])[0]
    model.train_step(user, item, np.ones(1, np.float32), now=2.0)
    assert model.table.contains(item[0])[0]
    model.take_delta(1)
    model.train_step(user, np.array([[fid(2, "y")]], np.uint64), np.ones(1, np.float32), now=50.0)
    evicted = model.evict_expired()  # newest update 50: items older than 40 go, users (ttl 100) stay
    assert evicted.tolist() == [fid(2, "x")]
    record = model.take_delta(2)
    assert fid(2, "x") in record.evicted.tolist() and fid(2, "x") not in record.fids.tolist()


def test_a_step_that_would_write_nan_is_skipped():
    model = TrainerModel(SCHEMA)
    user, items = batch(4)
    model.train_step(user, items, np.ones(4, np.float32), now=1.0)
    model.take_delta(1)
    dense_before = model.dense_state()
    model.table.upsert(items[:1, 0], np.full((1, 2 * SCHEMA.dim), np.inf, np.float32), now=2.0)  # a row gone bad
    assert np.isnan(model.train_step(user, items, np.ones(4, np.float32), now=3.0))
    assert model.skipped_steps == 1 and model.take_delta(2) is None
    for name, array in model.dense_state().items():
        assert array.tobytes() == dense_before[name].tobytes(), name


def test_joiner_joins_out_of_order_counts_late_and_samples_negatives(tmp_path):
    features = SegmentLogWriter(tmp_path / "feature_log" / "ranker_0")
    feedback = SegmentLogWriter(tmp_path / "feedback_log" / "feedback_0")
    joiner = Joiner(tmp_path, window_s=10.0, negative_rate=0.25, seed=1)
    write_action(feedback, b"early", 7)  # the action is read before its request
    assert len(joiner.poll(now_s=0.0)) == 0
    write_feature(features, b"early", [6, 7, 8])
    out = joiner.poll(now_s=1.0)
    assert out.labels == [1.0] and out.item_fids[0][0] == np.uint64(fid(10, 7))
    write_feature(features, b"r2", [1, 2])
    write_action(feedback, b"r2", 2, label=0.5)
    write_action(feedback, b"r2", 99)  # not a candidate
    out = joiner.poll(now_s=2.0)
    assert out.labels == [0.5] and joiner.unmatched == 1
    state = joiner.state()
    restored = Joiner(tmp_path, window_s=10.0, negative_rate=0.25)
    restored.restore(state, now_s=2.0)
    assert restored.buffered == 2 and restored.state() == state
    assert len(joiner.poll(now_s=11.5)) + len(joiner.poll(now_s=12.5)) <= 3  # windows close: negatives only
    write_action(feedback, b"r2", 1)  # after its window
    joiner.poll(now_s=13.0)
    assert joiner.late == 1
    for k in range(1000):
        write_feature(features, f"n{k}".encode(), [1, 2, 3, 4])
    joiner.poll(now_s=20.0)
    negatives = len(joiner.poll(now_s=40.0))
    assert abs(negatives - 1000) < 5 * np.sqrt(4000 * 0.25 * 0.75)  # 4000 impressions at rate 0.25
    out = Joiner(tmp_path, window_s=1.0, negative_rate=0.25).poll(now_s=0.0)
    assert len(out) >= 2  # a fresh joiner re-reads the logs from the start
    explicit_only = Joiner(tmp_path, window_s=1.0, negative_rate=0.0)
    explicit_only.poll(now_s=0.0)
    assert len(explicit_only.poll(now_s=5.0)) == 0 and explicit_only.negatives == 0  # rate 0: actions only


def test_after_a_backlog_every_click_is_joined_as_a_positive(tmp_path):
    """The trainer was down for many windows under traffic: the logs hold
    40,000 requests and a click on every fourth. Each poll reads at most
    10,000 records of a log and the clock passes a whole window between
    polls (training the backlog is slow), yet no click expires before its
    impression is read and no clicked impression becomes a negative."""
    n, window_s = 40_000, 1.0
    clicked = set(range(0, n, 4))
    with SegmentLogWriter(tmp_path / "feature_log" / "ranker_0", fsync="never") as features, \
            SegmentLogWriter(tmp_path / "feedback_log" / "feedback_0", fsync="never") as feedback:
        for k in range(n):
            t = 1_700_000_000.0 + k * 0.005
            user = np.array([fid(1, k)] + [PAD_FID] * (SCHEMA.user_width - 1), np.uint64)
            items = np.zeros((2, SCHEMA.item_width), np.uint64)
            items[:, 0] = [fid(10, 2 * k), fid(10, 2 * k + 1)]
            features.append(FeatureRecord(f"r{k}".encode(), t, 0, user, items, np.zeros(2, np.float32)).encode())
            if k in clicked:
                feedback.append(FeedbackRecord(f"r{k}".encode(), t + 0.002, t + 0.002, items[:1, 0],
                                               np.ones(1, np.float32)).encode())
    joiner = Joiner(tmp_path, window_s=window_s, negative_rate=0.1, seed=3)
    labels_by_user: dict[int, list[float]] = {}
    for step in range(12):
        out = joiner.poll(now_s=step * 1.5 * window_s)
        for user, label in zip(out.user_fids, out.labels):
            labels_by_user.setdefault(int(user[0]), []).append(label)
    assert joiner.buffered == 0 and joiner.late == 0 and joiner.orphans == 0
    assert joiner.joined == len(clicked)
    for k in range(n):
        labels = labels_by_user.get(fid(1, k), [])
        positives = 1 if k in clicked else 0
        assert labels.count(1.0) == positives and labels.count(0.0) <= 2 - positives, (k, labels)
    negatives = sum(labels.count(0.0) for labels in labels_by_user.values())
    expected = 0.1 * (2 * n - len(clicked))
    assert abs(negatives - expected) < 5 * np.sqrt(expected)


def test_restored_joiner_samples_the_same_negatives(tmp_path):
    with SegmentLogWriter(tmp_path / "feature_log" / "ranker_0") as features:
        for k in range(50):
            write_feature(features, f"a{k}".encode(), [1, 2, 3, 4])
        joiner = Joiner(tmp_path, window_s=1.0, negative_rate=0.3, seed=5)
        joiner.poll(now_s=0.0)
        first = joiner.poll(now_s=2.0)  # the sampler has drawn 200 times
        for k in range(50):
            write_feature(features, f"b{k}".encode(), [1, 2, 3, 4])
    restored = Joiner(tmp_path, window_s=1.0, negative_rate=0.3, seed=5)
    restored.restore(joiner.state(), now_s=2.0)
    assert len(first) > 0
    for j in (joiner, restored):
        j.poll(now_s=3.0)
    a, b = joiner.poll(now_s=5.0), restored.poll(now_s=5.0)
    assert len(a) > 0 and np.array_equal(np.stack(a.item_fids), np.stack(b.item_fids))


def test_trainer_refuses_a_stream_behind_its_checkpoint(tmp_path):
    from server.streams.deltas import DeltaRecord
    from server.streams.delta_log import FileDeltaWriter

    model = TrainerModel(SCHEMA)
    save_checkpoint(tmp_path, model, None, delta_seq=3)
    with FileDeltaWriter(tmp_path / "deltas") as deltas:  # records 2 and 3 were lost
        deltas.append(DeltaRecord.dense(1, 0.0, model.dense_state()))
    with pytest.raises(ValueError, match="ends at seq 1, behind the trainer checkpoint at seq 3"):
        OnlineTrainer(SCHEMA, tmp_path)


def test_checkpoint_keeps_the_admission_sketch(tmp_path):
    schema = FeatureSchema((Slot("u", 1, "user", 4), Slot("i", 2, "item", 4, min_count=3)))
    model = TrainerModel(schema)
    user, item = np.array([[fid(1, "a")]], np.uint64), np.array([[fid(2, "x")]], np.uint64)
    for step in range(2):
        model.train_step(user, item, np.ones(1, np.float32), now=float(step))
    save_checkpoint(tmp_path, model, None, delta_seq=1)
    restored = TrainerModel(schema)
    load_checkpoint(tmp_path, restored, None)
    restored.train_step(user, item, np.ones(1, np.float32), now=2.0)
    assert restored.table.contains(item[0])[0], "the third sighting admits, across the restart"


def test_retention_keeps_disk_bounded_and_a_server_left_behind_heals_from_a_snapshot(tmp_path, monkeypatch):
    """Rounds of traffic, each trained and published: logs and deltas past
    every kept checkpoint and snapshot are deleted, so disk stops growing; a
    server whose position fell behind the deleted deltas loads a snapshot."""
    import time as clock

    from server.runtime.ranker import RankerRuntime
    from server.streams.snapshots import list_snapshots, load_latest_snapshot
    from updater.applier import DeltaApplier
    from server.streams.delta_log import FileDeltaReader

    monkeypatch.setenv("MONOLITH_SEGMENT_BYTES", "8192")
    data = tmp_path / "data"
    config = OnlineConfig(window_s=0.05, negative_rate=0.1, log_retention_s=0.0, max_batch_delay_s=0.0)
    late_server, sizes, k = None, [], 0
    for round_ in range(6):
        with SegmentLogWriter(data / "feature_log" / "ranker_0", segment_bytes=8192) as features, \
                SegmentLogWriter(data / "feedback_log" / "feedback_0", segment_bytes=8192) as feedback:
            for _ in range(150):
                rid = f"r{k}".encode()
                write_feature(features, rid, [10 * k, 10 * k + 1])
                write_action(feedback, rid, 10 * k)
                k += 1
        trainer = OnlineTrainer(SCHEMA, data, config)
        stop = threading.Event()
        trainer.joiner.poll()
        clock.sleep(0.06)  # every window of this round closes at the next poll
        trainer.run(stop, max_seconds=0.05)
        trainer.close()
        if round_ == 0:
            late_server = RankerRuntime(SCHEMA, data, "late")
        sizes.append(sum(f.stat().st_size for f in data.rglob("*.seg")))
    checkpoints = sorted((data / "trainer").glob("0*"))
    oldest_positions = json.loads((checkpoints[0] / "meta.json").read_text())["positions"]
    for key, position in oldest_positions.items():
        firsts = sorted(int(p.stem) for p in (data / key).glob("*.seg"))
        assert len(firsts) == 1 or firsts[1] > position, f"{key}: a segment before {position} survived"
    oldest_kept = min(int(p.name) for p in list_snapshots(data) + checkpoints)
    delta_firsts = sorted(int(p.stem) for p in (data / "deltas").glob("*.seg"))
    assert delta_firsts[0] > 0 and (len(delta_firsts) == 1 or delta_firsts[1] > oldest_kept)
    assert sizes[-1] < 1.5 * sizes[2], f"disk keeps growing: {sizes}"

    last = load_latest_snapshot(data).delta_seq
    assert late_server.delta_seq < delta_firsts[0], "the late server is not behind retention"
    applier = DeltaApplier(late_server, lambda after: FileDeltaReader(data / "deltas", after),
                           load_snapshot=lambda: load_latest_snapshot(data), retry_delays_s=(0.01,)).start()
    try:
        deadline = clock.monotonic() + 20
        while late_server.delta_seq < last:
            assert clock.monotonic() < deadline, f"stuck at {late_server.delta_seq}: {applier.halted_reason}"
            clock.sleep(0.01)
    finally:
        applier.stop()
        late_server.close(snapshot=False)
    assert applier.snapshot_reloads == 1


def test_checkpoint_round_trip(tmp_path):
    model = TrainerModel(SCHEMA)
    user, items = batch(16)
    for step in range(3):
        model.train_step(user, items, np.ones(16, np.float32), now=float(step))
    save_checkpoint(tmp_path, model, None, delta_seq=5)
    other = TrainerModel(SCHEMA)
    assert load_checkpoint(tmp_path, other, None)["delta_seq"] == 5
    np.testing.assert_array_equal(other.predict(user, items), model.predict(user, items))
    model.train_step(user, items, np.ones(16, np.float32), now=9.0)
    other.train_step(user, items, np.ones(16, np.float32), now=9.0)
    for k, v in model.dense.state_dict().items():
        assert torch.allclose(other.dense.state_dict()[k], v), k  # Adam state restored too
