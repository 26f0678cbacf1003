"""`monolith-rt deltas hold|resume|rollback` reach a running online trainer (a process) through the control
file: nothing is emitted while held, what was held goes out on resume, and the rollback the trainer appends
puts the stream's state back at S exactly, rows it held included."""

import functools
import json
import re
import signal
import subprocess
import sys
import threading
import time

from server.streams import SegmentLogWriter
from tests import waiting
from tests.logs import write_action, write_feature
from tests.stream_state import stream_state
from updater.tools import scan

SECONDS = 14.0


def last_seq(data):
    return max((record.seq for _, _, _, record in scan(data / "deltas")), default=0)


def state(data, until_seq):
    return stream_state(data / "deltas", until_seq)[0]


def deltas_cli(data, *args):
    done = subprocess.run([sys.executable, "-m", "server.cli", "deltas", *args, "--data-dir", str(data)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


wait_until = functools.partial(waiting.wait_until, timeout_s=30.0, poll_s=0.05)


def test_hold_resume_and_rollback_through_a_running_trainer(tmp_path):
    data = tmp_path / "data"
    stop = threading.Event()

    def write_logs():  # every request a new user's clicks on new items: every sync writes new rows
        with SegmentLogWriter(data / "feature_log" / "ranker_0") as features, \
                SegmentLogWriter(data / "feedback_log" / "feedback_0") as feedback:
            k = 0
            started = time.monotonic()
            while not stop.is_set() and time.monotonic() - started < SECONDS:
                rid = f"r{k}".encode()
                write_feature(features, rid, [k * 10 + c for c in range(3)], t=time.time())
                write_action(feedback, rid, k * 10)
                k += 1
                time.sleep(0.02)

    writer = threading.Thread(target=write_logs)
    writer.start()
    trainer = subprocess.Popen([sys.executable, "-m", "server.cli", "train", "online", "--data-dir", str(data),
                                "--window-s", "1", "--sync-interval-ms", "100", "--snapshot-interval-s", "600"],
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (data / "deltas").is_dir() and last_seq(data) >= 3, "the trainer never emitted")
        out = deltas_cli(data, "hold")
        assert out.startswith("hold: operator hold"), out
        held_at = last_seq(data)
        time.sleep(1.5)  # feedback keeps coming and is trained on
        assert last_seq(data) == held_at, "emitted while held"
        guard_state = json.loads((data / "guard" / "state.json").read_text())
        assert guard_state["state"] == "held (operator)"
        assert "monolith_guard_state 2.0" in (data / "guard" / "metrics.prom").read_text()

        out = deltas_cli(data, "resume")
        assert out.startswith("resume: operator resume"), out
        wait_until(lambda: last_seq(data) > held_at, "nothing emitted after resume")
        time.sleep(0.5)
        s = held_at
        out = deltas_cli(data, "rollback", "--to-seq", str(s))
        assert f"trainer running: rollback to seq {s}" in out, out
        appended = int(re.search(r"appended up to seq (\d+)", out).group(1))
        assert state(data, appended) == state(data, s)  # the state at S, byte for byte
        assert int(re.search(r"(\d+) deleted", out).group(1)) > 0  # rows created after S, held ones too
    finally:
        stop.set()
        writer.join()
        trainer.send_signal(signal.SIGTERM)
        _, err = trainer.communicate(timeout=60)
    assert trainer.returncode == 0, err[-2000:]
    assert "operator hold" in err and "operator resume" in err and f"rollback to seq {s}" in err
