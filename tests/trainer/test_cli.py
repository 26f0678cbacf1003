"""``monolith-rt train online`` refuses a bad bus credentials file in one line naming the file and the fault."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("content, mode, fault", [
    ("trainer\npassword\n", 0o640, "requires mode 0600 (no access for group or others), got 0640"),
    ("trainer-and-no-password\n", 0o600, "requires a .creds file or two lines (user, password), got 1"),
    (None, None, ": No such file or directory"),
], ids=["group-readable", "one-line", "missing"])
def test_a_bad_bus_credentials_file_is_one_line(tmp_path, content, mode, fault):
    credentials = tmp_path / "creds"
    if content is not None:
        credentials.write_text(content)
        credentials.chmod(mode)
    result = subprocess.run([sys.executable, "-m", "server.cli", "train", "online", "--data-dir",
                             str(tmp_path / "data"), "--bus", "nats://127.0.0.1:1", "--bus-credentials",
                             str(credentials), "--max-seconds", "1"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.splitlines()  # one line, no traceback
    assert line.startswith(f"monolith-rt train online: bus credentials file {credentials}") and fault in line
