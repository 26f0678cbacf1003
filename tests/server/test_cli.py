"""``monolith-rt serve`` refuses what it cannot run with at once, in one line, before tritonserver starts."""

import os
import subprocess
import sys
from pathlib import Path

from server.host.launcher import claim_data_dir

ROOT = Path(__file__).resolve().parents[2]


def serve(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Runs serve with a stand-in tritonserver that leaves a mark if it is ever started."""
    mark = tmp_path / "tritonserver-started"
    binary = tmp_path / "tritonserver"
    binary.write_text(f"#!/bin/sh\ntouch '{mark}'\nexit 1\n")
    binary.chmod(0o755)
    result = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--tritonserver", str(binary),
                             "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", *args],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    return result, mark


def test_a_data_directory_another_server_uses_is_refused_at_once(tmp_path):
    data = tmp_path / "data"
    holder = claim_data_dir(data)  # as the tritonserver of a running server holds it
    try:
        result, mark = serve(tmp_path, "--data-dir", str(data))
    finally:
        os.close(holder)
    assert result.returncode == 2 and not mark.exists()
    assert result.stderr.splitlines() == [
        f"monolith-rt serve: data directory {data} is in use by another server (starter pid {os.getpid()}, "
        f"holding {data / 'server.lock'}): one data directory requires one server, got two; stop that server "
        "or choose another data directory"]


def test_a_bad_bus_credentials_file_is_refused_at_once(tmp_path):
    credentials = tmp_path / "creds"
    credentials.write_text("replica\npassword\n")
    credentials.chmod(0o640)
    result, mark = serve(tmp_path, "--data-dir", str(tmp_path / "data"), "--bus", "nats://127.0.0.1:1",
                         "--bus-credentials", str(credentials))
    assert result.returncode == 2 and not mark.exists() and not (tmp_path / "data").exists()
    assert result.stderr.splitlines() == [
        f"monolith-rt serve: bus credentials file {credentials} requires mode 0600 (no access for group or "
        f"others), got 0640; run: chmod 600 {credentials}"]
