"""Emission triggered by training (trainer.online, issue 23): a trained click's rows reach a serving
instance long before the sync timer would send them; under a flood of clicks, sparse records stay at
least the minimum gap apart."""

import functools
import threading

import numpy as np

from server.features import shipped_schema
from server.streams import SegmentLogWriter
from server.streams.deltas import SPARSE
from server.streams.records import FeatureRecord, FeedbackRecord
from tests import waiting
from trainer.online import OnlineConfig, OnlineTrainer
from updater.tools import scan

SCHEMA = shipped_schema()
wait_until = functools.partial(waiting.wait_until, timeout_s=30.0, poll_s=0.02)


def write_clicks(data, first: int, n: int) -> np.ndarray:
    """n requests (a new user and 2 new items each, a click on the first); returns the clicked items' FIDs."""
    clicked = []
    with SegmentLogWriter(data / "feature_log" / "ranker_0") as features, \
            SegmentLogWriter(data / "feedback_log" / "feedback_0") as feedback:
        for k in range(first, first + n):
            rid = f"r{k}".encode()
            user, items = SCHEMA.encode_request({"user_id": f"u{k}"}, [{"item_id": f"i{k}-{c}"} for c in range(2)])
            features.append(FeatureRecord(rid, 1.0, 0, user, items, np.full(2, 0.5, np.float32)).encode())
            feedback.append(FeedbackRecord(rid, 1.0, 1.0, items[:1, 0].copy(), np.ones(1, np.float32)).encode())
            clicked.append(items[0, 0])
    return np.array(clicked, np.uint64)


def sparse_records(data) -> list:
    return [record for _, _, _, record in scan(data / "deltas") if record.kind == SPARSE]


class Running:
    """An OnlineTrainer's run loop on a thread, stopped (snapshot and checkpoint) on exit."""

    def __init__(self, trainer: OnlineTrainer):
        self.trainer, self.stop = trainer, threading.Event()
        self.thread = threading.Thread(target=trainer.run, args=(self.stop,))

    def __enter__(self):
        self.thread.start()
        return self.trainer

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.trainer.close()


def test_a_trained_click_reaches_a_serving_instance_long_before_the_sync_timer(tmp_path):
    """The sync timer is an hour: on timer-only emission nothing would be sent during this test."""
    from server.runtime.ranker import RankerRuntime
    from updater.applier import DeltaApplier

    data = tmp_path / "data"
    config = OnlineConfig(sync_interval_s=3600.0, guard=False)
    trainer = OnlineTrainer(SCHEMA, data, config)
    server = RankerRuntime(SCHEMA, data, "serving", make_applier=DeltaApplier.following)
    applier = server.updater
    try:
        with Running(trainer):
            clicked = write_clicks(data, 0, 1)
            wait_until(lambda: server.table.contains(clicked)[0], "the click's row in the serving table")
            more = write_clicks(data, 1, 3)  # the trainer is idle in its wait now: the append wakes it
            wait_until(lambda: server.table.contains(more).all(), "the next clicks' rows in the serving table")
    finally:
        server.close(snapshot=False)
    assert applier.halted_reason is None


def test_timer_only_emission_leaves_trained_rows_for_the_sync(tmp_path):
    """``emit_on_train=False`` is the old behaviour: trained rows wait for the timer."""
    data = tmp_path / "data"
    trainer = OnlineTrainer(SCHEMA, data, OnlineConfig(sync_interval_s=3600.0, guard=False, emit_on_train=False))
    with Running(trainer):
        write_clicks(data, 0, 5)
        wait_until(lambda: trainer.examples >= 5, "the clicks trained")
        assert trainer.model.pending_rows() > 0 and trainer.emitted_records == 0


def test_the_minimum_gap_holds_under_a_flood_of_clicks(tmp_path):
    """Thousands of clicks in micro-batches of 16 become records at least ``emit_min_gap_s`` apart."""
    data = tmp_path / "data"
    gap_s = 0.2
    config = OnlineConfig(sync_interval_s=3600.0, emit_min_gap_s=gap_s, batch_size=16, max_batch_delay_s=0.0,
                          guard=False)
    trainer = OnlineTrainer(SCHEMA, data, config)
    with Running(trainer):
        clicked = np.concatenate([write_clicks(data, 600 * r, 600) for r in range(4)])
        wait_until(lambda: trainer.examples >= clicked.shape[0], "the flood trained", timeout_s=120.0)
        wait_until(lambda: trainer.model.pending_rows() == 0, "the last rows emitted")
    records = sparse_records(data)
    created = np.array([r.created_s for r in records[:-1]])  # the last one is the stop's publish
    batches = clicked.shape[0] // 16
    assert len(records) < batches / 4, f"{len(records)} records for {batches} micro-batches"
    assert np.all(np.diff(created) >= gap_s * 0.95), f"records closer than {gap_s} s: {np.diff(created).min()}"
    emitted = np.concatenate([r.fids for r in records])
    assert np.isin(clicked, emitted).all(), "every clicked row was emitted"
    seqs = [r.seq for _, _, _, r in scan(data / "deltas")]
    assert seqs == list(range(1, len(seqs) + 1)), "in order, no gap"

