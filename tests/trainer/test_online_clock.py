"""The online trainer's clock and its expiry breaker (trainer.online, trainer.guard): a log record stamped a
month ahead cannot make every row look a month old, and an expiry pass that would remove most of the table
holds emission until the operator resumes, then runs."""

import functools
import threading
import time

import numpy as np
import pytest

from server.features import shipped_schema
from server.streams import SegmentLogWriter
from server.streams.deltas import SPARSE
from server.streams.records import FeatureRecord, FeedbackRecord
from tests import waiting
from trainer.guard import Guard, expiry_breaker
from trainer.online import OnlineConfig, OnlineTrainer
from updater.rollback import write_control
from updater.tools import scan

SCHEMA = shipped_schema()
DAY_S = 86400.0
wait_until = functools.partial(waiting.wait_until, timeout_s=60.0, poll_s=0.02)


def write_traffic(data, first: int, n: int, t: float) -> np.ndarray:
    """n requests (a new user each, 3 new items each, a click on the first) stamped ``t``; returns the
    FIDs every one of them trains for sure: its user and its clicked item (not the context slots, which
    every request shares, nor the candidates that may be sampled as negatives)."""
    fids = []
    with SegmentLogWriter(data / "feature_log" / "ranker_0") as features, \
            SegmentLogWriter(data / "feedback_log" / "feedback_0") as feedback:
        for k in range(first, first + n):
            rid = f"r{k}".encode()
            user, items = SCHEMA.encode_request({"user_id": k, "hour": 3},
                                                [{"item_id": 10_000 + 3 * k + c} for c in range(3)])
            features.append(FeatureRecord(rid, t, 0, user, items, np.full(3, 0.5, np.float32)).encode())
            feedback.append(FeedbackRecord(rid, t, t, items[:1, 0].copy(), np.ones(1, np.float32)).encode())
            fids += [user[:1], items[:1, 0]]
    return np.concatenate(fids)


def run_until(trainer: OnlineTrainer, predicate, what: str) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=trainer.run, args=(stop,))
    thread.start()
    try:
        wait_until(predicate, what)
    finally:
        stop.set()
        thread.join()


def evicted_in_stream(data) -> set[int]:
    return {int(f) for _, _, _, record in scan(data / "deltas") if record.kind == SPARSE for f in record.evicted}


@pytest.fixture
def trainer_on(tmp_path):
    made = []

    def make(**config) -> OnlineTrainer:
        made.append(OnlineTrainer(SCHEMA, tmp_path, OnlineConfig(window_s=0.05, max_batch_delay_s=0.0, **config)))
        return made[-1]

    yield make
    for trainer in made:
        trainer.close()


def test_a_record_stamped_a_month_ahead_moves_neither_the_stamps_nor_expiry(tmp_path, trainer_on):
    now = time.time()
    warm = write_traffic(tmp_path, 0, 300, now)
    trainer = trainer_on()
    run_until(trainer, lambda: trainer.examples >= 300, "the warm traffic trained")
    rows = len(trainer.model.table)
    write_traffic(tmp_path, 300, 1, now + 40 * DAY_S)  # a click on a candidate of a request a month ahead
    run_until(trainer, lambda: trainer.examples >= 301, "the future request trained")
    assert trainer.model.table.newest_stamp <= time.time() + 300.0  # the default --max-time-ahead-s
    trainer.config.expiry_interval_s = 0.0  # an expiry pass at every turn of the loop
    trainer.run(threading.Event(), max_seconds=0.3)
    assert trainer.model.table.contains(warm).all(), "warm rows were expired"
    assert len(trainer.model.table) >= rows
    assert not evicted_in_stream(tmp_path) & {int(f) for f in warm}
    assert trainer.guard.emitting


def test_the_expiry_breaker_holds_a_pass_that_would_empty_the_table_until_resumed(tmp_path, trainer_on):
    """Rows last trained 40 days ago, then traffic again (a trainer back after a long outage): the pass that
    would remove them all holds; the operator's resume lets it run and its deletes go out."""
    old = write_traffic(tmp_path, 0, 300, time.time() - 40 * DAY_S)
    trainer = trainer_on()
    # every window closed (buffered 0): no negative of the old traffic is trained beside the new one later
    run_until(trainer, lambda: trainer.examples >= 300 and trainer.joiner.buffered == 0, "the old traffic trained")
    write_traffic(tmp_path, 300, 20, time.time())
    run_until(trainer, lambda: trainer.examples >= 320, "the new traffic trained")
    trainer.publish()
    last_seq = trainer.writer.next_seq - 1
    rows = len(trainer.model.table)

    trainer.config.expiry_interval_s = 0.0
    trainer.run(threading.Event(), max_seconds=0.3)
    assert trainer.guard.guard.state_name == "held (expiry breaker)"
    assert "would remove" in trainer.guard.guard.expiry_hold
    assert trainer.model.table.contains(old).all() and len(trainer.model.table) >= rows
    assert trainer.writer.next_seq - 1 == last_seq, "emitted while the breaker held"
    metrics = (tmp_path / "guard" / "metrics.prom").read_text()
    assert "monolith_guard_expiry_holds_total 1.0" in metrics and "monolith_guard_state 3.0" in metrics

    write_control(tmp_path, hold=False)  # what `monolith-rt deltas resume` records
    run_until(trainer, lambda: {int(f) for f in old} <= evicted_in_stream(tmp_path), "the held pass emitted")
    assert trainer.guard.emitting and trainer.guard.guard.expiry_holds == 1
    assert not trainer.model.table.contains(old).any()


def test_expiry_breaker_decides_on_the_share_removed():
    assert expiry_breaker(20, 100, 0.2) is None
    assert expiry_breaker(0, 0, 0.2) is None
    reason = expiry_breaker(21, 100, 0.2)
    assert "21 of 100 rows (21%)" in reason and "--max-expiry-share 0.2" in reason
    assert expiry_breaker(100, 100, 1.0) is None


def test_an_expiry_hold_stops_emission_like_a_quality_hold():
    guard = Guard()
    assert guard.emitting
    guard.expiry_hold = "why"
    assert not guard.emitting and guard.state_name == "held (expiry breaker)"
    assert guard.status()["expiry_hold"] == "why"


def test_config_refuses_a_breaker_share_outside_0_to_1():
    with pytest.raises(ValueError, match="--max-expiry-share requires a share in \\(0, 1\\]"):
        OnlineConfig(max_expiry_share=0.0)
    with pytest.raises(ValueError, match="--max-time-ahead-s requires seconds >= 0"):
        OnlineConfig(max_time_ahead_s=-1.0)
