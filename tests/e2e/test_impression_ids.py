"""Issue 20, part 3, through `monolith-rt serve` and the online trainer: a client that sends one
request_id on every request trains the same share of negatives as one with unique ids, and a
retried feedback request trains once."""

import threading

import numpy as np
import pytest

from server.client import InferError, RankerClient
from server.features import shipped_schema
from server.host.supervisor import ServeProcess
from tests.waiting import wait_until
from trainer.joiner_metrics import JOINER_DIR, METRICS_FILE
from trainer.online import OnlineConfig, OnlineTrainer

SCHEMA = shipped_schema()
REQUESTS, CANDIDATES, CLICK_EVERY = 300, 10, 5


def send(client: RankerClient, first: int, request_id, retries: int) -> None:
    """REQUESTS requests of their own user and items (never re-touched), a click on every fifth,
    each click sent 1 + ``retries`` times."""
    for k in range(first, first + REQUESTS):
        rid = request_id(k)
        user, items = SCHEMA.encode_request({"user_id": 5_000_000 + k},
                                            [{"item_id": k * 100 + c} for c in range(CANDIDATES)])
        ranked = client.rank(user, items, request_id=rid)
        scores, _ = ranked  # the tuple every caller unpacks is unchanged
        assert scores.shape == (CANDIDATES,) and len(ranked.impression_id) == 32
        if k % CLICK_EVERY == 0:
            for _ in range(1 + retries):  # the client echoes the impression id it was given for rid
                assert client.feedback(rid, items[:1, 0], [1.0]) == 1


def settled(trainer: OnlineTrainer, candidates: int) -> bool:
    j = trainer.joiner
    return j.buffered == 0 and j.joined + j.negatives + j.dropped_negatives >= candidates


def test_one_request_id_for_every_request_trains_like_unique_ids_and_retries_train_once(tmp_path):
    data = tmp_path / "data"
    clicks = REQUESTS // CLICK_EVERY
    unlabelled = REQUESTS * CANDIDATES - clicks
    with ServeProcess(data) as serve:
        trainer = OnlineTrainer(SCHEMA, data, OnlineConfig(window_s=1.0, stats_interval_s=0.5, guard=False))
        assert trainer.config.negative_rate == 0.1  # the shipped default
        stop = threading.Event()
        thread = threading.Thread(target=trainer.run, args=(stop,))
        thread.start()
        try:
            with RankerClient(serve.http_url, "http") as client:
                send(client, 0, lambda k: f"unique-{k}".encode(), retries=0)
            wait_until(lambda: settled(trainer, REQUESTS * CANDIDATES), "the unique-id requests to be joined",
                       timeout_s=60)
            unique = trainer.counters()
            with RankerClient(serve.grpc_url, "grpc") as client:
                send(client, REQUESTS, lambda k: b"same", retries=2)
                with pytest.raises(InferError, match=r"'labels' requires values in \[0, 1\]"):
                    client.feedback(b"same", [1], [2.0])
            wait_until(lambda: settled(trainer, 2 * REQUESTS * CANDIDATES), "the one-id requests to be joined",
                       timeout_s=60)
            wait_until(lambda: (data / JOINER_DIR / METRICS_FILE).exists(), "the joiner's metrics")
        finally:
            stop.set()
            thread.join()
            trainer.close()
    same = {name: value - unique[name] for name, value in trainer.counters().items()}
    print(f"unique ids: {unique}\none id: {same}")
    for counts in (unique, same):
        assert counts["joined"] == clicks and counts["unmatched"] == counts["late"] == counts["ambiguous"] == 0
        assert counts["negatives"] + counts["dropped_negatives"] == unlabelled
    assert same["duplicates"] == 2 * clicks and unique["duplicates"] == 0
    expected, sd = 0.1 * unlabelled, np.sqrt(unlabelled * 0.1 * 0.9)
    for counts in (unique, same):
        assert abs(counts["negatives"] - expected) < 5 * sd, (counts["negatives"], expected)
    assert trainer.examples == 2 * clicks + unique["negatives"] + same["negatives"]
    metrics = (data / JOINER_DIR / METRICS_FILE).read_text()
    assert "monolith_joiner_buffer_limit_bytes" in metrics and 'counter="shed_impressions"' in metrics
