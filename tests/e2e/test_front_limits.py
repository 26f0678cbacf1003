"""What a caller may hold open: the HTTP front's connection cap and read timeout, the gRPC front's
handlers for invented method names, through the real `monolith-rt serve` (echo test model)."""

import http.client
import socket

import grpc
import orjson
import pytest

from server.front.grpc import SERVICE
from server.host.supervisor import ServeProcess
from tests.e2e.test_front_differential import ECHO_REPOSITORY
from tests.waiting import wait_until

MAX_CONNECTIONS = 4
READ_TIMEOUT_S = 1.0
BODY = orjson.dumps({"inputs": [{"name": "f32", "datatype": "FP32", "shape": [1], "data": [1.0]}]})


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("front-limits")
    with ServeProcess(data_dir, extra_args=["--model-repository", str(ECHO_REPOSITORY), "--max-connections",
                                            str(MAX_CONNECTIONS), "--read-timeout-s", str(READ_TIMEOUT_S)]) as server:
        yield server


def _address(serve) -> tuple[str, int]:
    host, port = serve.http_url.rsplit(":", 1)
    return host, int(port)


def _infer(serve) -> int:
    connection = http.client.HTTPConnection(*_address(serve), timeout=30)
    try:
        connection.request("POST", "/v2/models/echo/infer", body=BODY)
        return connection.getresponse().status
    finally:
        connection.close()


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_connections_past_the_cap_are_refused_and_the_server_keeps_serving(serve):
    held = [socket.create_connection(_address(serve)) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:  # each is accepted and answered: the front counts it
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        with socket.create_connection(_address(serve)) as extra:
            answer = _read_all(extra)
        assert answer.startswith(b"HTTP/1.1 503") and b"too many open connections" in answer
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: _infer(serve) == 200, what="a request served once the held connections closed")
    metrics = http.client.HTTPConnection(serve.metrics_url.removeprefix("http://").split("/")[0], timeout=30)
    metrics.request("GET", "/metrics")
    assert b'monolith_front_refused_total{reason="too_many_connections"} 1.0' in metrics.getresponse().read()


@pytest.mark.parametrize("partial", [
    b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{\"inputs\":",
    b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n10\r\n{\"inputs\":",
    b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: x\r\nx-trickle: ",
], ids=["body", "chunked", "headers"])
def test_a_request_that_trickles_in_is_cut_off(serve, partial):
    with socket.create_connection(_address(serve)) as sock:
        sock.sendall(partial)  # ... and nothing more: the front answers 408 and closes
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive whole" in answer
    assert _infer(serve) == 200


def test_invented_grpc_methods_are_refused_without_being_kept(serve):
    with grpc.insecure_channel(serve.grpc_url) as channel:
        for i in range(300):
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(f"/inference.GRPCInferenceService/Invented{i}")(b"", timeout=30)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        live = channel.unary_unary(SERVICE + "ServerLive")(b"", timeout=30)
    assert live == b"\x08\x01"  # ServerLiveResponse(live=True)
