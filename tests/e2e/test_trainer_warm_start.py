"""`train online` warms up before it reports ready (issue 23): started on empty caches (a numba cache
directory of its own), its first batch of clicks is trained and emitted in well under a second after
the ready line, not after seconds of compiling."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from server.streams import Streams
from tests.trainer.test_online_emission import write_clicks
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
FIRST_BATCH_S = 0.5  # the bound; without the warm-up the first batch took seconds here


def sparse_records(data: Path) -> int:
    reader = Streams(data).open_delta_reader(0)
    try:
        return len(reader.read())
    finally:
        reader.close()


def test_first_batch_after_ready_on_empty_caches(tmp_path):
    data, log = tmp_path / "data", tmp_path / "trainer.log"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache"), "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        trainer = subprocess.Popen([sys.executable, "-m", "server.cli", "train", "online", "--data-dir", str(data)],
                                   cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: trainer.poll() is not None or "online trainer on" in log.read_text(),
                   "the trainer's ready line", timeout_s=120.0, poll_s=0.005)
        assert trainer.poll() is None, log.read_text()[-2000:]
        clicked_at = time.monotonic()
        write_clicks(data, 0, 1)
        wait_until(lambda: sparse_records(data) > 0, "the first batch's delta record", timeout_s=60.0, poll_s=0.005)
        first_batch_s = time.monotonic() - clicked_at
    finally:
        trainer.send_signal(signal.SIGTERM)
        trainer.wait(60)
    assert first_batch_s < FIRST_BATCH_S, f"first batch after ready took {first_batch_s:.2f} s: {log.read_text()}"


def test_the_first_click_on_empty_caches_reaches_serving_fresh(tmp_path, monkeypatch):
    """serve and the trainer on an empty numba cache: the first probe is as fresh as the rest (the serving
    updater compiled its write path before ready; it used to compile on the first delta, 2-4 s here)."""
    from loadtest.freshness import run_freshness
    from server.features import shipped_schema

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba-cache"))
    result = run_freshness(None, "grpc", probes=2, timeout_s=10.0, sync_interval_ms=200.0, schema=shipped_schema())
    assert result["failed"] == 0 and result["max_s"] < 1.0, result
