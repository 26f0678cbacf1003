"""Bad input, fuzzed over HTTP (JSON and binary) and gRPC; security defaults. One real server."""

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.client import InferError, RankerClient, rank_tensors
from server.features import fid, load_schema
from server.launcher import DEFAULT_MODEL_REPOSITORY, TritonServer
from server.records import FeatureRecord
from server.segment_log import SegmentLogReader

SCHEMA = load_schema(DEFAULT_MODEL_REPOSITORY / "ranker" / "feature_schema.json")
USER, ITEMS = SCHEMA.encode_request({"user_id": 3}, [{"item_id": 1}, {"item_id": 2}])
CASES = {"count": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with TritonServer(tmp_path_factory.mktemp("robust")) as srv:
        yield srv
    print(f"\nfuzz cases sent: {CASES['count']}")


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
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(request=requests())
def test_fuzzed_tensors_get_an_answer_or_an_error(clients, protocol, request):
    model, tensors = request
    client = clients[protocol]
    CASES["count"] += 1
    outputs = ["scores", "delta_seq"] if model == "ranker" else ["accepted"]
    try:
        client.infer(model, tensors, outputs)
    except InferError:
        pass
    still_serving(client)


RAW_HTTP = [
    b"{not json",
    json.dumps({"inputs": [{"name": "user_fids", "datatype": "UINT64", "shape": [1, 100000000],
                            "data": [1, 2]}]}).encode(),
    json.dumps({"inputs": [{"name": "item_fids", "datatype": "UINT64", "shape": [1, 2**40, 2**40],
                            "data": []}]}).encode(),
    json.dumps({"inputs": [{"name": "user_fids", "datatype": "NOPE", "shape": [1, 7], "data": [0] * 7}]}).encode(),
    json.dumps({"inputs": [{"name": "user_fids", "datatype": "UINT64", "shape": [-3], "data": []}]}).encode(),
    json.dumps({"inputs": "x"}).encode(),
    json.dumps({"inputs": [{"name": "request_id", "datatype": "BYTES", "shape": [1, 1],
                            "data": ["\u0000" * 5]}]}).encode(),
]


@pytest.mark.parametrize("body", RAW_HTTP, ids=range(len(RAW_HTTP)))
def test_malformed_http_bodies_are_refused(server, clients, body):
    CASES["count"] += 1
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/ranker/infer", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code >= 400  # Triton answers unparseable JSON with 500, the rest with 400
    assert json.loads(caught.value.read())["error"]
    still_serving(clients["http"])


def test_binary_body_with_lying_header_is_refused(server, clients):
    header = json.dumps({"inputs": [{"name": "user_fids", "datatype": "UINT64", "shape": [1, 7],
                                     "parameters": {"binary_data_size": 10**9}}]}).encode()
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/ranker/infer", data=header + b"\0" * 56,
                                     method="POST", headers={"Inference-Header-Content-Length": str(len(header))})
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(request, timeout=10)
    still_serving(clients["http"])


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
    for port in (server.http_port, server.grpc_port, server.metrics_port):
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


@pytest.mark.parametrize("rid", [b"../../../../tmp/monolith-pwned", b"a\x00b/../../c", b"/etc/passwd", b"..", b"\xff\xfe"])
def test_request_ids_are_data_never_paths(server, clients, rid):
    before = sorted(p.relative_to(server.data_dir) for p in server.data_dir.rglob("*"))
    clients["grpc"].rank(USER, ITEMS, request_id=rid)
    clients["http"].feedback(rid, ITEMS[:1, 0], [1.0])
    found = []
    for instance in (server.data_dir / "feature_log").iterdir():
        with SegmentLogReader(instance) as reader:
            found += [FeatureRecord.decode(p).request_id for _, p in reader.read()]
    assert rid in found  # logged as bytes, verbatim
    after = sorted(p.relative_to(server.data_dir) for p in server.data_dir.rglob("*"))
    new_names = {str(p) for p in after} - {str(p) for p in before}
    assert all(name.endswith(".seg") for name in new_names), new_names
    assert not any("pwned" in str(p) for p in server.data_dir.parent.rglob("*pwned*"))


def test_a_megabyte_request_id_is_refused(clients):
    with pytest.raises(InferError, match="1 to 256 bytes"):
        clients["grpc"].infer("ranker", rank_tensors(USER, ITEMS, b"x" * 1_000_000), ["scores"])
    still_serving(clients["grpc"])


def test_zz_logs_hold_only_well_formed_records(server, clients):
    """After every fuzzed and malformed request above: each log record decodes."""
    from server.records import FeedbackRecord

    clients["grpc"].rank(USER, ITEMS, request_id=b"last")
    counts = {}
    for kind, decode in (("feature_log", FeatureRecord.decode), ("feedback_log", FeedbackRecord.decode)):
        counts[kind] = 0
        for instance in (server.data_dir / kind).iterdir():
            with SegmentLogReader(instance) as reader:
                for _, payload in reader.read():
                    record = decode(payload)  # raises on a malformed record
                    assert 1 <= len(record.request_id) <= 256
                    counts[kind] += 1
    assert counts["feature_log"] > 0 and counts["feedback_log"] > 0
