"""API keys on both protocols (real server): required where set, health open, never leaked."""

import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from server.client import InferError, RankerClient
from server.features import shipped_schema
from server.front.auth import ENV_API_KEY_FILE, ApiKeyError, api_key_file_from, load_api_key
from server.procs import group_members
from server.streams.records import FeatureRecord
from server.host.supervisor import ServeProcess
from tests.logs import logged, read_log

SCHEMA = shipped_schema()
USER, ITEMS = SCHEMA.encode_request({"user_id": 3}, [{"item_id": 1}, {"item_id": 2}])
KEY = secrets.token_hex(24)


def key_file(directory: Path, content: str = KEY, mode: int = 0o600) -> Path:
    path = directory / "api.key"
    path.write_text(content + "\n")
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    with ServeProcess(directory / "data", extra_args=["--api-key-file", str(key_file(directory))]) as srv:
        yield srv


def get(url: str, headers=None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def refused_unauthorized(serve) -> float:
    for line in urllib.request.urlopen(serve.metrics_url, timeout=10).read().decode().splitlines():
        if line.startswith('monolith_front_refused_total{reason="unauthorized"}'):
            return float(line.split()[-1])
    raise AssertionError("no unauthorized counter in the metrics")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_inference_requires_the_key(serve, protocol):
    url = serve.http_url if protocol == "http" else serve.grpc_url
    before = refused_unauthorized(serve)
    for key in (None, "wrong-" + KEY, KEY[:-1]):
        with RankerClient(url, protocol, api_key=key) as client, pytest.raises(InferError, match="API key"):
            client.rank(USER, ITEMS, request_id=f"nokey-{protocol}".encode())
    with RankerClient(url, protocol, api_key=KEY) as client:
        scores, _ = client.rank(USER, ITEMS, request_id=f"withkey-{protocol}".encode())
        assert scores.shape == (2,)
        assert client.statistics("ranker")["name"] == "ranker"
    assert refused_unauthorized(serve) == before + 3


def test_health_is_open_and_metadata_is_not(serve):
    base = f"http://{serve.http_url}"
    assert get(f"{base}/v2/health/ready") == 200
    assert get(f"{base}/v2/models/ranker/ready") == 200
    assert get(f"{base}/v2/models/ranker") == 401
    assert get(f"{base}/v2/models/ranker", {"Authorization": f"Bearer {KEY}"}) == 200
    with RankerClient(serve.grpc_url, "grpc") as client:
        assert client.raw.is_server_live() and client.raw.is_model_ready("ranker")
        with pytest.raises(Exception, match="API key"):
            client.raw.get_model_metadata("ranker")
        assert client.raw.get_model_metadata("ranker", headers={"authorization": f"Bearer {KEY}"}).name == "ranker"


def test_refused_requests_are_not_logged(serve):
    with RankerClient(serve.grpc_url, "grpc", api_key=KEY) as client:
        client.rank(USER, ITEMS, request_id=b"marker-after")  # flushes after the refused ones
    assert logged(serve.data_dir / "feature_log", FeatureRecord.decode, b"marker-after")
    request_ids = {r.request_id for r in read_log(serve.data_dir / "feature_log", FeatureRecord.decode)}
    assert not {b"nokey-http", b"nokey-grpc"} & request_ids


def test_the_key_never_appears_in_argv_environment_or_logs(serve):
    pids = [serve.process.pid, *group_members(serve.triton_pid)]
    for pid in pids:
        assert KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert KEY.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    for log in (serve.stderr_path, serve.data_dir / "logs" / "tritonserver.log"):
        assert KEY not in log.read_text(errors="replace")


def test_a_world_readable_key_file_is_refused(tmp_path):
    path = key_file(tmp_path, mode=0o644)
    with pytest.raises(ApiKeyError, match="chmod 600"):
        load_api_key(path)
    result = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--data-dir", str(tmp_path / "d"),
                             "--api-key-file", str(path), "--http-port", "0", "--grpc-port", "0",
                             "--metrics-port", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "chmod 600" in result.stderr and KEY not in result.stderr
    assert not (tmp_path / "d").exists()  # refused before anything started


def test_keys_and_grpc_direct_do_not_mix(tmp_path):
    result = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--data-dir", str(tmp_path / "d"),
                             "--api-key-file", str(key_file(tmp_path)), "--grpc-direct"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--grpc-direct cannot check API keys" in result.stderr


@pytest.mark.parametrize("content", ["short", "has space inside the key value", ""])
def test_weak_or_malformed_keys_are_refused(tmp_path, content):
    with pytest.raises(ApiKeyError, match="at least 16 printable"):
        load_api_key(key_file(tmp_path, content))


def test_the_environment_variable_names_the_file(tmp_path, monkeypatch):
    path = key_file(tmp_path)
    monkeypatch.setenv(ENV_API_KEY_FILE, str(path))
    assert api_key_file_from(None) == path and load_api_key(api_key_file_from(None)) == KEY.encode()
    assert api_key_file_from(str(tmp_path / "flag")) == tmp_path / "flag"
    monkeypatch.delenv(ENV_API_KEY_FILE)
    assert api_key_file_from(None) is None and os.environ.get(ENV_API_KEY_FILE) is None
