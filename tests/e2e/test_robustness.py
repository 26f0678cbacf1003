"""Bad input, fuzzed over HTTP (JSON and binary) and gRPC, through the fronts callers reach
(`monolith-rt serve`); security defaults. One real server."""

import gzip
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.client import InferError, RankerClient, rank_tensors
from server.features import fid, shipped_schema
from server.procs import group_members
from server.streams.records import FeatureRecord, FeedbackRecord
from server.streams import FEATURES, FEEDBACK, Streams
from server.host.supervisor import ServeProcess
from tests.logs import logged

SCHEMA = shipped_schema()
USER, ITEMS = SCHEMA.encode_request({"user_id": 3}, [{"item_id": 1}, {"item_id": 2}])
CASES = {"count": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServeProcess(tmp_path_factory.mktemp("robust")) as srv:
        yield srv
    print(f"\nbad requests sent: {CASES['count']}")


def server_rss_mb(server) -> float:
    """Resident memory of tritonserver and its model stubs."""
    total_kb = 0
    for pid in group_members(server.triton_pid):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


@pytest.fixture
def unharmed(server, clients):
    """Checks after the test: the same tritonserver runs, a good request succeeds
    on both protocols, and the server's memory did not jump."""
    before = server_rss_mb(server)
    yield
    for client in clients.values():
        still_serving(client)
    assert server.process.poll() is None and group_members(server.triton_pid), "tritonserver died"
    assert server_rss_mb(server) - before < 64, f"RSS grew from {before:.0f} MB to {server_rss_mb(server):.0f} MB"


@pytest.fixture(scope="module")
def clients(server):
    with RankerClient(server.http_url, "http") as h, RankerClient(server.grpc_url, "grpc") as g:
        yield {"http": h, "grpc": g}


def still_serving(client):
    scores, _ = client.rank(USER, ITEMS, request_id=b"canary")
    assert scores.shape == (2,)


DTYPES = [np.uint64, np.int64, np.int32, np.float32, np.float64, np.bool_, np.object_]
NAMES = ["user_fids", "item_fids", "request_id", "timestamp", "labels", "item_fids", "x", "", "scores"]
SPECIAL = [0, 2**64 - 1, 1, fid(10, 1), 2**63]


@st.composite
def tensor(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=4)))
    size = int(np.prod(shape))
    if dtype is np.object_:
        values = draw(st.lists(st.binary(max_size=300), min_size=size, max_size=size))
        return np.array(values + [b""], dtype=np.object_)[:size].reshape(shape)
    if dtype is np.uint64:
        values = draw(st.lists(st.sampled_from(SPECIAL) | st.integers(0, 2**64 - 1), min_size=size, max_size=size))
        return np.array(values, dtype=np.uint64).reshape(shape)
    if dtype in (np.float32, np.float64):
        values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=size,
                               max_size=size))
        return np.array(values, dtype=dtype).reshape(shape)
    if dtype is np.bool_:
        return np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size)), dtype=np.bool_).reshape(shape)
    info = np.iinfo(dtype)
    values = draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=size, max_size=size))
    return np.array(values, dtype=dtype).reshape(shape)


@st.composite
def requests(draw):
    names = draw(st.lists(st.sampled_from(NAMES), min_size=0, max_size=5, unique=True))
    return draw(st.sampled_from(["ranker", "feedback"])), {n: draw(tensor()) for n in names}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(request=requests())
def test_fuzzed_tensors_get_an_answer_or_an_error(clients, unharmed, protocol, request):
    model, tensors = request
    client = clients[protocol]
    CASES["count"] += 1
    outputs = ["scores", "delta_seq"] if model == "ranker" else ["accepted"]
    try:
        client.infer(model, tensors, outputs)
    except InferError:
        pass
    still_serving(client)


def _input(name, datatype, shape, **rest):
    return {"name": name, "datatype": datatype, "shape": shape, **rest}


GOOD_JSON_INPUTS = [_input("user_fids", "UINT64", [1, 7], data=USER.tolist()),
                    _input("item_fids", "UINT64", [1, 2, 8], data=ITEMS.ravel().tolist()),
                    _input("request_id", "BYTES", [1, 1], data=["r"])]


def with_good(*bad):
    """A body whose other inputs are fine, so only the bad one can be at fault."""
    names = {b["name"] for b in bad}
    return json.dumps({"inputs": [*bad, *(g for g in GOOD_JSON_INPUTS if g["name"] not in names)]}).encode()


HOSTILE_SHAPES = [[10**10], [2**40, 5000], [2**63], [2**63 - 1], [1, -7], [-1], [2**32, 2**32, 2**32], [1, 0]]
RAW_HTTP = {
    "the-issue's-request": (b'{"inputs":[{"name":"x","datatype":"INT64","shape":[10000000000],"data":[0,1,2]}]}', 400),
    **{f"shape-{shape}": (with_good(_input("user_fids", "UINT64", shape, data=[1, 2, 3])), 400)
       for shape in HOSTILE_SHAPES},
    "bytes-shape-1e10": (with_good(_input("request_id", "BYTES", [1, 10**10], data=["a"])), 400),
    "not-json": (b"{not json", 400),
    "nested-100k": (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
    "unknown-datatype": (with_good(_input("user_fids", "NOPE", [1, 7], data=[0] * 7)), 400),
    "inputs-not-a-list": (b'{"inputs": "x"}', 400),
    "nul-request-id-is-data": (with_good(_input("request_id", "BYTES", [1, 1], data=["\u0000" * 5])), 200),
    "shared-memory": (with_good(_input("user_fids", "UINT64", [1, 7], parameters={
        "shared_memory_region": "evil", "shared_memory_byte_size": 56})), 400),
}


def post(server, body: bytes, headers=None, path="/v2/models/ranker/infer"):
    """(status, parsed error) of a raw POST to the HTTP front."""
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=body, method="POST",
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["error"]


@pytest.mark.parametrize("case", list(RAW_HTTP), ids=list(RAW_HTTP))
def test_hostile_http_bodies_are_refused_by_name(server, unharmed, case):
    body, expected = RAW_HTTP[case]
    CASES["count"] += 1
    status, error = post(server, body)
    assert status == expected and (error or status == 200), (status, error)


@pytest.mark.parametrize("declared", [56 - 8, 56 + 8, 10**9])
def test_binary_sizes_that_lie_either_way_are_refused(server, unharmed, declared):
    CASES["count"] += 1
    header = json.dumps({"inputs": [{"name": "user_fids", "datatype": "UINT64", "shape": [1, 7],
                                     "parameters": {"binary_data_size": declared}}]}).encode()
    status, error = post(server, header + b"\0" * 56, {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "user_fids" in error


@pytest.mark.parametrize("header_length", ["0", "-5", "999999999", "abc"])
def test_header_lengths_that_lie_are_refused(server, unharmed, header_length):
    CASES["count"] += 1
    status, error = post(server, with_good(), {"Inference-Header-Content-Length": header_length})
    assert status == 400 and "Inference-Header-Content-Length" in error


def test_a_50_mb_json_body_is_refused_before_it_is_read(server, unharmed):
    CASES["count"] += 1
    body = b'{"inputs": [{"name": "user_fids", "datatype": "UINT64", "shape": [1, 7], "data": [' + \
        b"0, " * ((50 << 20) // 3) + b"0]}]}"
    host, port = server.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /v2/models/ranker/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        answer = conn.recv(4096)  # the front answers from the headers alone
        assert answer.startswith(b"HTTP/1.1 413") and b"at most" in answer
        try:
            conn.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # and closed the connection


def test_a_gzip_bomb_is_refused(server, unharmed):
    CASES["count"] += 1
    bomb = gzip.compress(b"[" + b" " * (64 << 20) + b"]")
    status, error = post(server, bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "decompressed" in error
    status, error = post(server, gzip.compress(with_good()), {"Content-Encoding": "gzip"})
    assert status == 200, error


def test_a_chunked_body_past_the_limit_is_refused(server, unharmed):
    CASES["count"] += 1
    host, port = server.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /v2/models/ranker/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * (1 << 20)
        try:
            for _ in range(16):
                conn.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the front closed the connection after its 413
        assert conn.recv(4096).startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize("path", ["/v2/systemsharedmemory/region/x/register", "/v2/logging", "/v2/trace/setting",
                                  "/v2/repository/models/ranker/unload", "/v2/models/ranker/generate"])
def test_apis_outside_the_allow_list_are_not_forwarded(server, unharmed, path):
    CASES["count"] += 1
    status, error = post(server, b"{}", path=path)
    assert status in (404, 405) and "not served here" in error


def raw_grpc_infer(server, inputs, raws):
    """ModelInfer with hand-built inputs; the other ranker inputs are added, valid."""
    request = service_pb2.ModelInferRequest(model_name="ranker")
    good = {"user_fids": ("UINT64", [1, 7], USER.tobytes()), "item_fids": ("UINT64", [1, 2, 8], ITEMS.tobytes()),
            "request_id": ("BYTES", [1, 1], b"\x01\0\0\0r")}
    for name, datatype, shape in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.extend(raws)
    for name, (datatype, shape, raw) in good.items():
        if name not in {i[0] for i in inputs}:
            request.inputs.add(name=name, datatype=datatype, shape=shape)
            request.raw_input_contents.append(raw)
    with grpc.insecure_channel(server.grpc_url, options=[("grpc.max_send_message_length", 1 << 30)]) as channel:
        return service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)


GRPC_SHAPES = [s for s in HOSTILE_SHAPES if s not in ([2**63], [1, 0])] + [[-2**63]]  # int64 dims on the wire


@pytest.mark.parametrize("shape", GRPC_SHAPES, ids=str)
def test_hostile_grpc_shapes_are_refused(server, unharmed, shape):
    CASES["count"] += 1
    with pytest.raises(grpc.RpcError) as caught:
        raw_grpc_infer(server, [("user_fids", "UINT64", shape)], [b"\0" * 8])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "user_fids" in caught.value.details()


def test_a_50_mb_grpc_message_is_refused(server, unharmed):
    CASES["count"] += 1
    with pytest.raises(grpc.RpcError) as caught:
        raw_grpc_infer(server, [("user_fids", "UINT64", [1, (50 << 20) // 8])], [b"\0" * (50 << 20)])
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_grpc_bytes_whose_prefix_lies_are_refused(server, unharmed):
    CASES["count"] += 1
    with pytest.raises(grpc.RpcError) as caught:
        raw_grpc_infer(server, [("request_id", "BYTES", [1, 1])], [b"\xff\xff\xff\x7fabc"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in caught.value.details()


def _listening(port: int) -> set[str]:
    """Local addresses listening on a TCP port (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


def test_defaults_bind_to_loopback_only(server):
    ports = [int(url.rsplit(":", 1)[1].split("/")[0]) for url in server.urls.values()]
    assert len(ports) == 5  # the three fronts and tritonserver's private HTTP and gRPC ports
    for port in ports:
        addresses = _listening(port)  # 127.0.0.1, or ::ffff:127.0.0.1 (gRPC's IPv4-mapped form)
        assert addresses and addresses <= {"0100007F", "0000000000000000FFFF00000100007F"}, \
            f"port {port} listens on {addresses}, expected 127.0.0.1 only"


def test_model_control_is_refused(server, clients):
    for path in ("models/ranker/unload", "models/ranker/load", "models/evil/load"):
        request = urllib.request.Request(f"http://{server.http_url}/v2/repository/{path}", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=10)
    with pytest.raises(Exception):
        clients["grpc"].raw.unload_model("ranker")
    assert clients["grpc"].raw.is_model_ready("ranker")


def test_a_second_serve_on_the_same_data_directory_is_refused_at_once(server, unharmed):
    lock = server.data_dir.resolve() / "server.lock"
    fds = Path(f"/proc/{server.triton_pid}/fd")
    assert any(os.path.realpath(fd) == str(lock) for fd in fds.iterdir()), "tritonserver does not hold the lock"
    result = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--data-dir", str(server.data_dir),
                             "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr[-3000:]
    assert f"(tritonserver pid {server.triton_pid}, holding {lock}): one data directory requires one server" \
        in result.stderr  # and nothing else: no "starting tritonserver", no Triton options table


@pytest.mark.parametrize("rid", [b"../../../../tmp/monolith-pwned", b"a\x00b/../../c", b"/etc/passwd", b"..", b"\xff\xfe"])
def test_request_ids_are_data_never_paths(server, clients, rid):
    before = sorted(p.relative_to(server.data_dir) for p in server.data_dir.rglob("*"))
    clients["grpc"].rank(USER, ITEMS, request_id=rid)
    clients["http"].feedback(rid, ITEMS[:1, 0], [1.0])
    assert logged(server.data_dir / "feature_log", FeatureRecord.decode, rid)  # logged as bytes, verbatim
    after = sorted(p.relative_to(server.data_dir) for p in server.data_dir.rglob("*"))
    new_names = {str(p) for p in after} - {str(p) for p in before}
    assert all(name.endswith(".seg") for name in new_names), new_names
    assert not any("pwned" in str(p) for p in server.data_dir.parent.rglob("*pwned*"))


def test_a_megabyte_request_id_is_refused(clients):
    with pytest.raises(InferError, match="1 to 256 bytes"):
        clients["grpc"].infer("ranker", rank_tensors(USER, ITEMS, b"x" * 1_000_000), ["scores"])
    still_serving(clients["grpc"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests())
def test_logs_hold_only_well_formed_records_whatever_was_sent(server, clients, request):
    """Fuzzed requests of its own (no reliance on other tests' order), then: every
    feature and feedback log record decodes and carries a valid request id."""
    model, tensors = request
    outputs = ["scores", "delta_seq"] if model == "ranker" else ["accepted"]
    for client in clients.values():
        try:
            client.infer(model, tensors, outputs)
        except InferError:
            pass
    clients["grpc"].rank(USER, ITEMS, request_id=b"last")
    clients["grpc"].feedback(b"last", ITEMS[:1, 0], [1.0])
    streams = Streams(server.data_dir)
    for stream, decode in ((FEATURES, FeatureRecord.decode), (FEEDBACK, FeedbackRecord.decode)):
        count = 0
        for instance in streams.instances(stream):
            with streams.open_reader(stream, instance) as reader:
                for _, payload in reader.read():
                    record = decode(payload)  # raises on a malformed record
                    assert 1 <= len(record.request_id) <= 256
                    count += 1
        assert count > 0, f"nothing in {stream}"
