"""The data directory lock (server.launcher.claim_data_dir): one server per data directory."""

import os

import pytest

from server.launcher import DataDirInUse, claim_data_dir


def test_the_lock_refuses_a_second_claim_until_its_holder_lets_go(tmp_path):
    first = claim_data_dir(tmp_path / "data")
    with pytest.raises(DataDirInUse, match=f"starter pid {os.getpid()}.*one data directory requires one server"):
        claim_data_dir(tmp_path / "data")
    os.close(first)  # as when the tritonserver holding it exits, however it dies
    os.close(claim_data_dir(tmp_path / "data"))
