"""A model stub killed under `monolith-rt serve`: Triton never starts it again (the
model would fail every request while /v2/health/ready says ready), so serve
restarts tritonserver. Real processes."""

import os
import signal
import subprocess
import time
import urllib.request

import pytest

from server.client import RankerClient
from server.procs import group_members
from server.host.supervisor import ServeProcess
from tests.e2e.test_supervisor import rank_or_none, restarted_pid
from tests.waiting import wait_until
from updater.tools import SyntheticProducer


def stub_of(triton_pid: int, model: str) -> int:
    out = subprocess.run(["pgrep", "-P", str(triton_pid), "-f", f"/{model}/1/model.py"], capture_output=True,
                         text=True).stdout.split()
    assert len(out) == 1, f"expected one {model} stub under tritonserver {triton_pid}, got {out}"
    return int(out[0])


@pytest.mark.parametrize("model", ["ranker", "feedback"])
def test_a_killed_stub_gets_its_server_restarted(tmp_path, model):
    producer = SyntheticProducer(tmp_path / "deltas", rows_per_s=5000, interval_s=0.05, seed=1)
    for _ in range(10):
        producer.produce_one()
    producer.close()
    with ServeProcess(tmp_path) as serve, RankerClient(serve.grpc_url, "grpc", timeout_s=5.0) as client:
        wait_until(lambda: (r := rank_or_none(client)) and r[1] == 10, "seq 10 served", 30)
        old_pid = serve.triton_pid
        killed_at = time.monotonic()
        os.kill(stub_of(old_pid, model), signal.SIGKILL)
        restarted = wait_until(lambda: restarted_pid(serve, old_pid), "a restarted tritonserver", 30, poll_s=0.1)
        answer = wait_until(lambda: rank_or_none(client), "an answer after the restart", 30)
        recovered_s = time.monotonic() - killed_at
        print(f"\n{model} stub killed: serving again after {recovered_s:.1f} s")
        assert restarted, "serve did not restart tritonserver after its stub died"
        assert answer is not None and answer[1] == 10, "the restarted server does not serve at the stream's seq"
        assert not group_members(old_pid), "a process of the old server is still running"
        metrics = urllib.request.urlopen(serve.metrics_url, timeout=10).read().decode()
        assert "monolith_server_stub_exits_total 1.0" in metrics
        assert "monolith_server_restarts_total 1.0" in metrics
        assert "model stub(s)" in serve.stderr_path.read_text()
    assert serve.process.returncode == 0
