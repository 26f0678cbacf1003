"""Secret files: one rule (no access for group or others) and one message, for every secret file."""

import os
import stat

import pytest

from server.front.auth import ApiKeyError, load_api_key
from server.secret_files import SecretFileError, read_secret_file
from server.streams.bus import BusConfig, BusError, read_credentials

OPEN_MODES = [0o640, 0o620, 0o610, 0o604, 0o602, 0o644, 0o660, 0o440]


def secret(tmp_path, mode: int, content: str = "replica\n0123456789abcdef0123\n"):
    path = tmp_path / "secret"
    path.write_text(content)
    path.chmod(mode)
    return path


def load_tls_key(path):
    BusConfig(url="nats://h:4222", tls_cert=str(path), tls_key=str(path)).connect_options()


# every reader of a secret file: (what it is called, the reader, the error it raises)
READERS = {
    "API key file": (load_api_key, ApiKeyError),
    "bus credentials file": (read_credentials, BusError),
    "bus TLS key file": (load_tls_key, BusError),
}


@pytest.mark.parametrize("mode", OPEN_MODES, ids=oct)
@pytest.mark.parametrize("what", list(READERS))
def test_group_or_other_access_is_refused_with_one_message(tmp_path, what, mode):
    path = secret(tmp_path, mode)
    reader, error = READERS[what]
    with pytest.raises(error) as caught:
        reader(path)
    assert str(caught.value) == (f"{what} {path} requires mode 0600 (no access for group or others), "
                                 f"got {mode:04o}; run: chmod 600 {path}")


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_files_are_read(tmp_path, mode):
    path = secret(tmp_path, mode)
    assert read_secret_file(path, "x") == b"replica\n0123456789abcdef0123\n"
    assert load_api_key(secret(tmp_path, 0o600, "0123456789abcdef0123")) == b"0123456789abcdef0123"


def test_missing_files_and_fifos_are_refused_without_waiting(tmp_path):
    with pytest.raises(SecretFileError, match=f"API key file {tmp_path / 'missing'}: No such file"):
        read_secret_file(tmp_path / "missing", "API key file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)  # nobody writes to it: a plain open would block for ever
    with pytest.raises(SecretFileError, match="requires a regular file"):
        read_secret_file(fifo, "API key file")
    assert stat.S_ISFIFO(fifo.stat().st_mode)
