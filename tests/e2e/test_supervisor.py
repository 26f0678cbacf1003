"""`monolith-rt serve` keeps tritonserver running: restarts after a kill -9, loses no acknowledged
feedback, leaves no model stub behind, gives up after too many crashes. Real processes."""

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest

from server.client import InferError, RankerClient
from server.features import fid, shipped_schema
from server.host.launcher import TritonServer
from server.procs import group_members
from server.streams.records import FeedbackRecord
from server.streams import SegmentLogReader, SegmentLogWriter
from server.host.supervisor import EXIT_GAVE_UP, ServeProcess
from tests.waiting import wait_until
from updater.tools import SyntheticProducer

SCHEMA = shipped_schema()
USER, ITEMS = SCHEMA.encode_request({"user_id": 3}, [{"item_id": 1}, {"item_id": 2}])
CRASH_BODY = b'{"inputs":[{"name":"x","datatype":"INT64","shape":[10000000000],"data":[0,1,2]}]}'


def writer_lock_free(directory) -> bool:
    try:
        SegmentLogWriter(directory).close()
        return True
    except BlockingIOError:
        return False


def rank_or_none(client):
    try:
        return client.rank(USER, ITEMS, request_id=b"probe")
    except InferError:
        return None


def restarted_pid(serve, after: int) -> int | None:
    """The pid of the tritonserver that serve restarted after ``after`` (from its log)."""
    lines = serve.stderr_path.read_text().splitlines()
    pids = [int(line.split("(pid ")[1].split(",")[0]) for line in lines if "tritonserver restarted (pid" in line]
    later = [p for p in pids if p != after]
    return later[-1] if later else None


def feedback_in_log(data_dir) -> set[bytes]:
    found = set()
    for instance in (data_dir / "feedback_log").iterdir():
        with SegmentLogReader(instance) as reader:
            found |= {FeedbackRecord.decode(payload).request_id for _, payload in reader.read()}
    return found


class FeedbackTraffic:
    """Sends feedback in a bounded loop on a thread, remembering what was acknowledged."""

    def __init__(self, url: str, max_requests: int = 20_000):
        self.acked: list[bytes] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, max_requests), daemon=True)
        self._thread.start()

    def _run(self, url, max_requests):
        with RankerClient(url, "grpc", timeout_s=5.0) as client:
            for n in range(max_requests):
                if self._stop.is_set():
                    return
                rid = b"fb-%d" % n
                try:
                    if client.feedback(rid, [fid(10, n)], [1.0]) == 1:
                        self.acked.append(rid)
                except InferError:
                    self.errors += 1
                    time.sleep(0.02)

    def stop(self):
        self._stop.set()
        self._thread.join(30)


def test_kill_9_of_tritonserver_under_traffic_recovers_and_loses_nothing(tmp_path):
    producer = SyntheticProducer(tmp_path / "deltas", rows_per_s=5000, interval_s=0.05, seed=1)
    for _ in range(20):
        producer.produce_one()
    producer.close()
    with ServeProcess(tmp_path) as serve, RankerClient(serve.grpc_url, "grpc", timeout_s=5.0) as client:
        _, seq_before = wait_until(lambda: (r := rank_or_none(client)) and r[1] == 20 and r, "seq 20 served", 30)
        traffic = FeedbackTraffic(serve.grpc_url)
        wait_until(lambda: len(traffic.acked) > 50, "50 acks", 20)
        old_pid = serve.triton_pid
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        wait_until(lambda: rank_or_none(client) is None, "the kill to be seen", 5)
        answer = wait_until(lambda: rank_or_none(client), "an answer after the restart", 30)
        recovered_s = time.monotonic() - killed_at
        acked_after_restart = len(traffic.acked)
        wait_until(lambda: len(traffic.acked) > acked_after_restart + 50, "50 more acks", 20)
        traffic.stop()
        print(f"\nserving again {recovered_s:.1f} s after kill -9; {len(traffic.acked)} feedback acked, "
              f"{traffic.errors} refused while down")
        assert answer is not None  # recovered_s is printed, not asserted: a timing, not a behaviour
        assert answer[1] >= seq_before
        assert not group_members(old_pid), "a stub of the killed server is still running"
        assert set(traffic.acked) <= feedback_in_log(tmp_path), "acknowledged feedback is missing from the log"
        metrics = urllib.request.urlopen(serve.metrics_url, timeout=10).read().decode()
        assert "monolith_server_restarts_total 1.0" in metrics
        new_pid = restarted_pid(serve, old_pid)
    assert serve.process.returncode == 0
    assert new_pid and not group_members(new_pid)


def test_stubs_exit_on_their_own_when_their_tritonserver_aborts(tmp_path):
    """Without the supervisor (tritonserver started directly, as in the official container)."""
    server = TritonServer(tmp_path).start()
    try:
        pgid = server.process.pid
        assert len(group_members(pgid)) >= 4  # tritonserver + ranker, feedback and baseline stubs
        request = urllib.request.Request(f"http://{server.http_url}/v2/models/ranker/infer", data=CRASH_BODY)
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(request, timeout=10)  # Triton 2.51 aborts on this: why the front exists
        assert server.process.wait(10) != 0
        wait_until(lambda: not group_members(pgid), "no process of the group left", 30)
        for instance in (tmp_path / "feature_log").iterdir():  # the writer lock goes with the stub's last thread
            wait_until(lambda: writer_lock_free(instance), f"{instance} unlocked", 10)
    finally:
        server.kill()


def test_serve_gives_up_after_too_many_crashes_and_leaves_nothing(tmp_path):
    serve = ServeProcess(tmp_path, extra_args=["--max-restarts", "1", "--restart-window-s", "300"]).start()
    try:
        first = serve.triton_pid
        os.kill(first, signal.SIGKILL)
        second = wait_until(lambda: restarted_pid(serve, first), "a restarted tritonserver", 60)
        assert second, "serve did not restart tritonserver"
        os.kill(second, signal.SIGKILL)
        assert serve.process.wait(60) == EXIT_GAVE_UP
        assert "giving up" in serve.stderr_path.read_text()
        assert not group_members(first) and not group_members(second)
    finally:
        serve.stop()


def test_the_front_survives_the_request_that_aborts_a_bare_tritonserver(tmp_path):
    with ServeProcess(tmp_path) as serve:
        pid = serve.triton_pid
        request = urllib.request.Request(f"http://{serve.http_url}/v2/models/ranker/infer", data=CRASH_BODY)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == 400 and "input 'x'" in json.loads(caught.value.read())["error"]
        assert serve.triton_pid == pid and group_members(pid)
        with RankerClient(serve.http_url, "http") as client:
            assert client.rank(USER, ITEMS, request_id=b"after")[0].shape == (2,)


def test_grpc_direct_exposes_tritonservers_own_grpc_port(tmp_path):
    with ServeProcess(tmp_path, extra_args=["--grpc-direct"]) as serve:
        assert serve.grpc_url == serve.triton_grpc_url
        with RankerClient(serve.grpc_url, "grpc") as client:
            assert client.rank(USER, ITEMS, request_id=b"direct")[0].shape == (2,)
