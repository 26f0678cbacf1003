"""The online trainer as a process beside a real server: feedback reaches serving; kill -9 loses nothing."""

import json
import threading
import time


from tests.logs import write_action, write_feature
from tests.waiting import wait_until
from server.client import RankerClient
from server.features import shipped_schema
from server.host.launcher import TritonServer
from server.streams import SegmentLogWriter
from trainer.online import OnlineConfig, OnlineTrainer

SCHEMA = shipped_schema()


def test_positive_feedback_raises_the_items_score_within_seconds(tmp_path):
    """Server + online trainer: a burst of clicks on one item shows in its score."""
    data = tmp_path / "data"
    with TritonServer(data) as server, RankerClient(server.grpc_url, "grpc") as client:
        # A fresh model at the online default rate (0.05) moves a cold item's
        # score only in the fourth decimal; the batch rate makes the rise
        # unmistakable. The mechanism under test is the same either way (the
        # freshness load test runs the defaults). Every probe below is an
        # impression of its own (issue 20: the reused request_id no longer
        # merges them) whose candidates, item 0 included, would become sampled
        # negatives: so no sampling (rate 0), and each burst labels its
        # candidates explicitly (item 0 clicked, the others not), trained one
        # request per step (batch_size 5) as the closing windows did.
        trainer = OnlineTrainer(SCHEMA, data, OnlineConfig(sync_interval_s=0.2, window_s=2.0, negative_rate=0.0,
                                                           max_batch_delay_s=0.01, lr_sparse=0.5, batch_size=5))
        stop = threading.Event()
        thread = threading.Thread(target=trainer.run, args=(stop,))
        thread.start()
        try:
            user, items = SCHEMA.encode_request({"user_id": 77, "hour": 12},
                                                [{"item_id": 500 + i, "item_genres": ["Comedy"]} for i in range(5)])
            before, seq0 = client.rank(user, items, request_id=b"probe-0")
            clicked_at = time.monotonic()
            for k in range(40):
                rid = f"burst-{k}".encode()
                client.rank(user, items, request_id=rid)
                client.feedback(rid, items[:, 0], [1.0, 0.0, 0.0, 0.0, 0.0])
            deadline = clicked_at + 10.0
            while True:
                scores, seq = client.rank(user, items, request_id=b"probe")
                if seq > seq0 and scores[0] > before[0] + 0.05:
                    break
                assert time.monotonic() < deadline, f"score {scores[0]:.3f} (was {before[0]:.3f}) at seq {seq}"
                time.sleep(0.05)
            print(f"score of the clicked item {before[0]:.3f} -> {scores[0]:.3f} at seq {seq}, "
                  f"{time.monotonic() - clicked_at:.2f} s after the first click")
            assert scores[0] > scores[1:].max(), "the clicked item should now rank first"
            while trainer.joiner.joined < 200:  # the last clicks may still be on their way
                assert time.monotonic() < deadline, f"only {trainer.joiner.joined} of 200 labels joined"
                time.sleep(0.05)
        finally:
            stop.set()
            thread.join()
            trainer.close()
    assert trainer.joiner.joined >= 200



def test_kill_9_trainer_mid_run_loses_no_joined_example(tmp_path):
    """Logs stream in while the trainer is SIGKILLed and restarted: in the end
    every impression became exactly one example (negative_rate 1) and every
    action was joined once, counted across the restart by the checkpoints."""
    import os
    import signal
    import subprocess
    import sys

    data = tmp_path / "data"
    requests, candidates, actions = 240, 3, 120

    def write_logs():
        with SegmentLogWriter(data / "feature_log" / "ranker_0") as features, \
                SegmentLogWriter(data / "feedback_log" / "feedback_0") as feedback:
            for k in range(requests):
                rid = f"r{k}".encode()
                write_feature(features, rid, [k * 10 + c for c in range(candidates)])
                if k % 2 == 0:
                    write_action(feedback, rid, k * 10)
                time.sleep(8.0 / requests)

    def start():
        return subprocess.Popen([sys.executable, "-m", "server.cli", "train", "online", "--data-dir", str(data),
                                 "--window-s", "1", "--negative-rate", "1", "--snapshot-interval-s", "0.3",
                                 "--sync-interval-ms", "100"], stderr=subprocess.PIPE, text=True)

    writer = threading.Thread(target=write_logs)
    writer.start()
    trainer = start()
    deadline = time.monotonic() + 60
    while not any((data / "trainer").glob("0*")):  # first checkpoint written
        assert time.monotonic() < deadline and trainer.poll() is None, "trainer never checkpointed"
        time.sleep(0.05)
    time.sleep(0.4)  # mid-run: between checkpoints, logs still streaming
    assert writer.is_alive(), "logs finished before the kill: make them longer"
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait()
    trainer = start()
    writer.join()

    def checkpointed_examples() -> int:  # of the newest checkpoint (written every 0.3 s), -1 while in flux
        try:
            newest = sorted(p for p in (data / "trainer").iterdir() if p.name.startswith("0"))[-1]
            return json.loads((newest / "meta.json").read_text())["counters"]["examples"]
        except (OSError, IndexError, ValueError, KeyError):
            return -1

    # every window (1 s) closes and is trained; waiting on the trainer's own checkpoints, not a clock
    wait_until(lambda: checkpointed_examples() >= requests * candidates, "every impression trained",
               timeout_s=120)
    trainer.send_signal(signal.SIGTERM)
    _, err = trainer.communicate(timeout=60)
    assert trainer.returncode == 0, err[-2000:]
    assert "resumed from trainer checkpoint" in err
    checkpoint = sorted((data / "trainer").iterdir())[-1]
    counters = json.loads((checkpoint / "meta.json").read_text())["counters"]
    assert counters["joined"] == actions
    assert counters["examples"] == requests * candidates
    assert counters["negatives"] == requests * candidates - actions
    assert counters["late"] == 0
