"""The published Triton advisories that apply to the 2.51 binary, exercised through the fronts
(`monolith-rt serve`, defaults): each class is refused or defused before Triton, and the same
tritonserver keeps serving. README "Which Triton, and what it is exposed to" maps each case to its
advisory. One real server for the module."""

import json
import os
import socket
import time
import urllib.request

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from server.client import RankerClient
from server.features import shipped_schema
from server.procs import group_members
from server.host.supervisor import ServeProcess

SCHEMA = shipped_schema()
USER, ITEMS = SCHEMA.encode_request({"user_id": 3}, [{"item_id": 1}, {"item_id": 2}])
MAX_BODY_BYTES = 8 << 20  # serve's default --max-body-bytes
INFER = b"POST /v2/models/ranker/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServeProcess(tmp_path_factory.mktemp("advisories")) as srv:
        yield srv


@pytest.fixture
def unharmed(server):
    """After the test: the same tritonserver runs and a good request succeeds on both protocols."""
    yield
    assert server.process.poll() is None and group_members(server.triton_pid), "tritonserver died"
    for url, protocol in ((server.http_url, "http"), (server.grpc_url, "grpc")):
        with RankerClient(url, protocol) as client:
            assert client.rank(USER, ITEMS, request_id=b"canary")[0].shape == (2,)


def good_body(padding: int = 0) -> bytes:
    inputs = [{"name": "user_fids", "datatype": "UINT64", "shape": [1, *USER.shape], "data": USER.ravel().tolist()},
              {"name": "item_fids", "datatype": "UINT64", "shape": [1, *ITEMS.shape], "data": ITEMS.ravel().tolist()},
              {"name": "request_id", "datatype": "BYTES", "shape": [1, 1], "data": ["advisory"]}]
    return json.dumps({"inputs": inputs}).encode()[:-1] + b" " * padding + b"}"


def answer_of(conn: socket.socket) -> bytes:
    """The front's whole answer on ``conn`` (it closes after a refusal)."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = conn.recv(65536)
        if not part:
            return data
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


def send_chunked(server, *parts: bytes, pause_s: float = 0.0) -> bytes:
    host, port = server.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        try:
            conn.sendall(INFER)
            for part in parts:
                conn.sendall(part)
                time.sleep(pause_s)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the front answered and closed before the rest was sent
        return answer_of(conn)


# -- CVE-2025-23310 / CVE-2025-23311: chunked HTTP requests ------------------------------------


@pytest.mark.parametrize("size", ["FFFFFFFFFFFFFFFF", "1FFFFFFFFFFFFFFFF", "%X" % (MAX_BODY_BYTES + 1)])
def test_a_huge_chunk_size_is_refused(server, unharmed, size):
    answer = send_chunked(server, size.encode() + b"\r\n", b"x" * (MAX_BODY_BYTES + 1))
    assert answer.split(b" ")[1] in (b"400", b"413"), answer[:300]


def test_a_body_of_600k_one_byte_chunks_reaches_triton_as_one_body(server, unharmed):
    """The chunk pattern that crashes a bare 2.51 (SIGSEGV: one stack-allocated iovec per chunk):
    the front reassembles it and forwards a Content-Length body, so Triton answers it."""
    body = good_body(padding=600_000)
    chunks = b"".join(b"1\r\n%c\r\n" % byte for byte in body) + b"0\r\n\r\n"
    answer = send_chunked(server, chunks)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def test_a_body_of_tiny_chunks_costs_the_front_about_its_size(server, unharmed):
    before = peak_rss_mb(server.process.pid)
    answer = send_chunked(server, b"2\r\nab\r\n" * ((MAX_BODY_BYTES - 4096) // 2) + b"0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")  # read whole, then refused: not JSON
    grown = peak_rss_mb(server.process.pid) - before
    assert grown < 4 * MAX_BODY_BYTES / 2**20, f"the front's peak memory grew by {grown:.0f} MB"


def test_a_trickled_chunked_body_holds_no_one_else_up(server, unharmed):
    body = good_body()
    host, port = server.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as slow:
        slow.sendall(INFER)
        for start in range(0, len(body), 64):
            slow.sendall(b"%x\r\n" % len(body[start:start + 64]) + body[start:start + 64] + b"\r\n")
            with RankerClient(server.http_url, "http") as other:  # served meanwhile
                assert other.rank(USER, ITEMS, request_id=b"meanwhile")[0].shape == (2,)
            time.sleep(0.05)
        slow.sendall(b"0\r\n\r\n")
        assert answer_of(slow).startswith(b"HTTP/1.1 200")


# -- CVE-2025-23319 / 23320 / 23334: the Python backend's shared memory -------------------------


def python_backend_regions(server) -> list[str]:
    """The shared-memory regions of this server's Python-backend stubs (server.host.launcher's shm prefix)."""
    tag = f"monolith_{server.process.pid}_{server.triton_http_url.rsplit(':', 1)[1]}_"
    regions = sorted(name for name in os.listdir("/dev/shm") if tag in name)
    assert regions, f"no /dev/shm/*{tag}* region"
    return regions


def registered_regions(server) -> list:
    """Triton's own view (its private port): shared-memory regions registered with it."""
    with urllib.request.urlopen(f"http://{server.triton_http_url}/v2/systemsharedmemory/status", timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("path", ["/v2/systemsharedmemory/region/{key}/register", "/v2/systemsharedmemory/status",
                                  "/v2/systemsharedmemory/region/{key}/status", "/v2/cudasharedmemory/status",
                                  "/v2/cudasharedmemory/region/{key}/register"])
def test_the_shared_memory_api_is_not_reachable_over_http(server, unharmed, path):
    key = python_backend_regions(server)[0]  # what an attacker would register
    body = json.dumps({"key": "/" + key, "offset": 0, "byte_size": 64}).encode()
    method = "POST" if path.endswith("register") else "GET"
    request = urllib.request.Request(f"http://{server.http_url}{path.format(key=key)}", method=method,
                                     data=body if method == "POST" else None)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code in (404, 405) and b"not served here" in caught.value.read()
    assert registered_regions(server) == []


@pytest.mark.parametrize("method, message", [
    ("SystemSharedMemoryRegister", service_pb2.SystemSharedMemoryRegisterRequest(name="x", key="/x", byte_size=64)),
    ("SystemSharedMemoryStatus", service_pb2.SystemSharedMemoryStatusRequest()),
    ("CudaSharedMemoryRegister", service_pb2.CudaSharedMemoryRegisterRequest(name="x", byte_size=64)),
    ("CudaSharedMemoryStatus", service_pb2.CudaSharedMemoryStatusRequest()),
], ids=lambda value: value if isinstance(value, str) else "")
def test_the_shared_memory_api_is_not_reachable_over_grpc(server, unharmed, method, message):
    if method == "SystemSharedMemoryRegister":
        message.key = "/" + python_backend_regions(server)[0]
    with grpc.insecure_channel(server.grpc_url) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            getattr(service_pb2_grpc.GRPCInferenceServiceStub(channel), method)(message, timeout=10)
    assert caught.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED)
    assert registered_regions(server) == []


SHM = {"shared_memory_region": "x", "shared_memory_byte_size": 56, "shared_memory_offset": 0}


@pytest.mark.parametrize("where", ["input", "output", "request"])
def test_shared_memory_parameters_are_refused_over_http(server, unharmed, where):
    document = json.loads(good_body())
    if where == "input":
        document["inputs"][0]["parameters"] = SHM
    elif where == "output":
        document["outputs"] = [{"name": "scores", "parameters": SHM}]
    else:
        document["parameters"] = SHM
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/ranker/infer", method="POST",
                                     data=json.dumps(document).encode())
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400 and b"shared_memory_region" in caught.value.read()


@pytest.mark.parametrize("where", ["input", "output", "request"])
def test_shared_memory_parameters_are_refused_over_grpc(server, unharmed, where):
    request = service_pb2.ModelInferRequest(model_name="ranker")
    for name, datatype, array in (("user_fids", "UINT64", USER), ("item_fids", "UINT64", ITEMS)):
        request.inputs.add(name=name, datatype=datatype, shape=[1, *array.shape])
        request.raw_input_contents.append(array.tobytes())
    request.inputs.add(name="request_id", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(b"\x01\0\0\0r")
    target = {"input": lambda: request.inputs[0].parameters, "request": lambda: request.parameters,
              "output": lambda: request.outputs.add(name="scores").parameters}[where]()
    target["shared_memory_region"].string_param = "x"
    target["shared_memory_byte_size"].int64_param = 56
    with grpc.insecure_channel(server.grpc_url) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shared_memory_region" in caught.value.details()
