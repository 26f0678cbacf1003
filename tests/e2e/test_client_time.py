"""Time comes from the server (server.clock, trainer.online): through `monolith-rt serve` and `train online`
with the defaults (negatives sampled as shipped), a warmed model keeps its rows and its scores when a client
sends a request stamped a month ahead and one a year behind (and feedback likewise), while traffic goes on
past expiry passes. Before the window, the month-ahead click moved the trainer's newest stamp a month ahead
and the next expiry pass deleted every row, on the trainer and on the server."""

import functools
import time

import numpy as np
import pytest

from loadtest.stack import spawn_stack, wait_trainer_ready
from server.client import InferError, RankerClient
from server.features import shipped_schema
from server.streams.deltas import SPARSE
from tests import waiting
from updater.tools import scan

SCHEMA = shipped_schema()
DAY_S = 86400.0
WARM_USERS = 150
EXPIRY_INTERVAL_S = 2  # the default is 60: passes every 2 s keep the test short, the rule is the same
wait_until = functools.partial(waiting.wait_until, timeout_s=90.0, poll_s=0.1)


def request(user: int, items) -> tuple[np.ndarray, np.ndarray]:
    """User and item ids only (no shared context rows): a pair whose rows are missing scores the untrained
    default, which stays put while the dense weights do (the dense interval is 600 s)."""
    return SCHEMA.encode_request({"user_id": user}, [{"item_id": i} for i in items])


def expiry_passes(data) -> int:
    log = data / "logs" / "trainer.log"
    return log.read_text().count("expiry pass at") if log.exists() else 0


def test_far_future_and_past_times_are_refused_and_the_model_keeps_its_rows(tmp_path):
    data = tmp_path / "data"
    with spawn_stack(data, trainer_args=("--expiry-interval-s", str(EXPIRY_INTERVAL_S))) as (server, trainer), \
            RankerClient(server.grpc_url, "grpc") as client:
        wait_trainer_ready(data, trainer)
        default = float(client.rank(*request(10**9, [10**9]), request_id=b"cold")[0][0])
        warm = []
        for k in range(WARM_USERS):
            user, items = request(k, range(10 * k, 10 * k + 10))
            rid = f"warm-{k}".encode()
            client.rank(user, items, request_id=rid)
            client.feedback(rid, items[:1, 0], [1.0])
            warm.append((user, items[:1]))

        def warm_scores() -> np.ndarray:
            return np.array([client.rank(u, i, request_id=b"check")[0][0] for u, i in warm])

        wait_until(lambda: (warm_scores() != default).all(), "every warmed pair served from trained rows")

        user, items = warm[0][0], request(0, range(10))[1]
        for days in (40.0, -365.0):
            with pytest.raises(InferError, match="'timestamp' requires a time within 300 s ahead of and 86400 s "
                                                 "behind the server's clock"):
                client.rank(user, items, request_id=b"skewed", timestamp_s=time.time() + days * DAY_S)
            client.rank(user, items, request_id=f"skewed-click-{days}".encode())
            with pytest.raises(InferError, match="'event_time' requires a time within"):
                client.feedback(f"skewed-click-{days}".encode(), items[:1, 0], [1.0],
                                event_time_s=time.time() + days * DAY_S)

        passes, k = expiry_passes(data), WARM_USERS
        while expiry_passes(data) < passes + 2:  # traffic goes on past two expiry passes
            user, items = request(k, range(10 * k, 10 * k + 10))
            rid = f"live-{k}".encode()
            client.rank(user, items, request_id=rid)
            client.feedback(rid, items[:1, 0], [1.0])
            k += 1
            assert k < WARM_USERS + 20_000, "no expiry pass in the trainer's log"
        wait_until(lambda: client.rank(*warm[-1], request_id=b"seq")[1] >= last_seq(data),
                   "the server applied every delta emitted so far")
        scores = warm_scores()
    assert (scores != default).all(), f"{int((scores == default).sum())} warmed pairs score the untrained default"
    evicted = {int(f) for _, _, _, record in scan(data / "deltas") if record.kind == SPARSE for f in record.evicted}
    warm_fids = {int(f) for u, i in warm for f in (u[0], i[0, 0])}
    assert not evicted & warm_fids, f"{len(evicted & warm_fids)} warmed rows deleted"


def last_seq(data) -> int:
    return max((record.seq for _, _, _, record in scan(data / "deltas")), default=0)
