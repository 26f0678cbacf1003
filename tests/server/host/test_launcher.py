"""The data directory lock (server.host.launcher.claim_data_dir): one server per data directory."""

import os
import subprocess
import sys

import pytest

from server.host.launcher import DataDirInUse, claim_data_dir


def test_the_lock_refuses_a_second_claim_until_its_holder_lets_go(tmp_path):
    first = claim_data_dir(tmp_path / "data")
    with pytest.raises(DataDirInUse, match=f"starter pid {os.getpid()}.*one data directory requires one server"):
        claim_data_dir(tmp_path / "data")
    os.close(first)  # as when the tritonserver holding it exits, however it dies
    os.close(claim_data_dir(tmp_path / "data"))


def test_a_claim_waits_for_the_stubs_of_a_dead_holder_but_not_for_a_live_one(tmp_path):
    data = tmp_path / "data"
    fd = claim_data_dir(data)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.pwrite(fd, f"tritonserver pid {dead.pid}\n".encode().ljust(64), 0)  # its server died ...
    stub = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"], pass_fds=(fd,))
    os.close(fd)  # ... and a stub it left still holds the lock, for half a second
    os.close(claim_data_dir(data))  # waited for the stub
    assert stub.wait() == 0
    live = claim_data_dir(data)  # records this (live) process
    with pytest.raises(DataDirInUse):
        claim_data_dir(data, orphan_wait_s=30.0)  # refused at once, not after 30 s: the holder lives
    os.close(live)
