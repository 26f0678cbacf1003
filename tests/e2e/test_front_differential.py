"""The fronts forward what they checked: a model receives exactly the front's reading of a request, or
the request is refused, whatever a hostile client does to the bytes (duplicate keys at any level,
escapes, out-of-range numbers, lying binary sizes, compression), and the server keeps serving.

Served by the real `monolith-rt serve` on a repository holding one test model, `echo`
(tests/e2e/echo_repository), that answers with every input it received. The oracle is orjson's
reading of the body (the last of duplicate keys wins), i.e. what the front validates.
"""

import gzip
import hashlib
import http.client
import struct
from pathlib import Path

import grpc
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from server.host.supervisor import ServeProcess
from tests.waiting import wait_until

ECHO_REPOSITORY = Path(__file__).resolve().parent / "echo_repository"
# name -> (datatype, rank), as in echo_repository/echo/config.pbtxt
CONFIG = {"b": ("BOOL", 1), "u8": ("UINT8", 1), "i8": ("INT8", 1), "u64": ("UINT64", 1), "i64": ("INT64", 2),
          "f16": ("FP16", 1), "f32": ("FP32", 1), "f64": ("FP64", 1), "s": ("BYTES", 1)}
NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "UINT64": np.uint64, "INT64": np.int64,
         "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
RANGES = {"UINT8": (0, 255), "INT8": (-128, 127), "UINT64": (0, 2**64 - 1), "INT64": (-2**63, 2**63 - 1)}
HUGE = b"[10000000000]"


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("front-differential")
    with ServeProcess(data_dir, extra_args=["--model-repository", str(ECHO_REPOSITORY)]) as server:
        yield server


def _layout(datatype: str, values: list) -> bytes:
    if datatype == "BYTES":
        encoded = [v.encode() if isinstance(v, str) else v for v in values]
        return b"".join(struct.pack("<I", len(v)) + v for v in encoded)
    return np.array(values, dtype=NUMPY[datatype]).tobytes()


@st.composite
def tensors(draw):
    """1-3 valid inputs: (name, datatype, shape, values)."""
    names = draw(st.lists(st.sampled_from(sorted(CONFIG)), min_size=1, max_size=3, unique=True))
    out = []
    for name in names:
        datatype, rank = CONFIG[name]
        shape = [draw(st.integers(0, 4)) for _ in range(rank)]
        count = int(np.prod(shape))
        if datatype == "BOOL":
            element = st.booleans()
        elif datatype in RANGES:
            element = st.integers(*RANGES[datatype])
        elif datatype == "BYTES":
            element = st.text(max_size=5)
        else:
            element = st.floats(-1000, 1000, allow_nan=False, width=16 if datatype == "FP16" else 32)
        out.append((name, datatype, shape, [draw(element) for _ in range(count)]))
    return out


def _member(key: str, value) -> tuple[bytes, bytes]:
    return (orjson.dumps(key), value if isinstance(value, bytes) else orjson.dumps(value))


def _object(members) -> bytes:
    return b"{" + b",".join(k + b":" + v for k, v in members) + b"}"


@st.composite
def http_cases(draw):
    """(body, header_length, content_encoding, surely_valid): a valid request, then hostile mutations.
    surely_valid: the front's reading (last duplicate wins) is a valid request, so it must be served."""
    inputs, surely_valid = draw(tensors()), True
    objects, blobs = [], []
    for name, datatype, shape, values in inputs:
        members = [_member("name", name), _member("datatype", datatype), _member("shape", shape)]
        if draw(st.booleans()):
            blob = _layout(datatype, values)
            blobs.append(blob)
            size = _member("binary_data_size", len(blob))
            params = [size]
            if draw(st.booleans()):  # the header lies first, then tells the truth
                params.insert(0, _member("binary_data_size", draw(st.sampled_from([0, 1, 2**31, 2**63 - 1]))))
            members.append((b'"parameters"', _object(params)))
        else:
            data = [v.item() if isinstance(v, np.generic) else v for v in values]
            if draw(st.booleans()) and datatype in RANGES and data:  # a value out of the datatype's range
                low, high = RANGES[datatype]
                data[0] = draw(st.sampled_from([low - 1, high + 1, 2**64, -2**63 - 1]))
                surely_valid = False
            members.append((b'"data"', b"[" + b",".join(str(v).encode() if type(v) is int else orjson.dumps(v)
                                                         for v in data) + b"]"))
        mutation = draw(st.sampled_from(["none", "bogus first", "bogus last", "escaped key"]))
        if mutation in ("bogus first", "bogus last"):
            key = draw(st.sampled_from(["shape", "datatype", "name"]))
            bogus = {"shape": draw(st.sampled_from([HUGE, b"[2147483648]", b"[1]", b"[3,3]"])),
                     "datatype": orjson.dumps(draw(st.sampled_from(["FP64", "INT8", "BYTES"]))),
                     "name": orjson.dumps(draw(st.sampled_from(["zz", "b", "f32"])))}[key]
            at = next(i for i, (k, _) in enumerate(members) if k == orjson.dumps(key))
            if mutation == "bogus first":
                members.insert(at, (orjson.dumps(key), bogus))
            else:
                members.insert(at + 1, (orjson.dumps(key), bogus))
                surely_valid = False
        elif mutation == "escaped key":
            members[2] = (b'"sh\\u0061pe"', members[2][1])
        objects.append(_object(members))
    top = [(b'"inputs"', b"[" + b",".join(objects) + b"]")]
    if draw(st.booleans()):  # a first "inputs" that the last one replaces
        top.insert(0, (b'"inputs"', b'[{"name":"f32","datatype":"FP32","shape":' + HUGE + b',"data":[1.0]}]'))
    header = _object(top)
    body = header + b"".join(blobs)
    header_length = len(header) if blobs else None
    encoding = draw(st.sampled_from([None, "gzip"]))
    return body, header_length, encoding, surely_valid


def _expected(body: bytes, header_length: int | None) -> dict:
    """The front's reading of the request, as the echo model reports it."""
    document = orjson.loads(body[:header_length] if header_length else body)
    out, offset = {}, header_length or len(body)
    for tensor in document["inputs"]:
        datatype, shape = tensor["datatype"], tensor["shape"]
        if "data" in tensor:
            blob = _layout(datatype, np.array(tensor["data"], dtype=object).reshape(-1).tolist())
        else:
            size = tensor["parameters"]["binary_data_size"]
            blob, offset = body[offset:offset + size], offset + size
        out[tensor["name"]] = [datatype, shape, blob.hex()]
    return out


def _post(serve, body: bytes, headers: dict, model: str = "echo") -> tuple[int, bytes]:
    host, port = serve.http_url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _echo(answer: bytes) -> dict:
    document = orjson.loads(answer)
    (output,) = document["outputs"]
    return orjson.loads(output["data"][0])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(case=http_cases())
def test_http_the_model_receives_what_the_front_read_or_nothing(serve, case):
    body, header_length, encoding, surely_valid = case
    headers = {"Content-Type": "application/octet-stream"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    sent = body
    if encoding == "gzip":
        sent, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    status, answer = _post(serve, sent, headers)
    assert status == 200 or 400 <= status < 500, (status, answer)  # 503: tritonserver died
    if status == 200:
        assert _echo(answer) == _expected(body, header_length)
    else:
        assert not surely_valid, answer


@st.composite
def grpc_cases(draw):
    """(message bytes, surely_valid): typed contents or raw bytes, possibly with a second serialized
    fragment appended (protobuf merges it: repeated fields grow, scalars take the last value)."""
    inputs, surely_valid = draw(tensors()), True
    request = service_pb2.ModelInferRequest(model_name="echo")
    typed = draw(st.booleans())
    for name, datatype, shape, values in inputs:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if typed and datatype != "FP16":
            field = {"BOOL": "bool_contents", "UINT8": "uint_contents", "INT8": "int_contents",
                     "UINT64": "uint64_contents", "INT64": "int64_contents", "FP32": "fp32_contents",
                     "FP64": "fp64_contents", "BYTES": "bytes_contents"}[datatype]
            values = [v.encode() for v in values] if datatype == "BYTES" else values
            if values and datatype in ("INT8", "UINT8") and draw(st.booleans()):  # out of range
                beyond = [300, -129, 2**31 - 1] if datatype == "INT8" else [256, 300, 2**32 - 1]
                values = [draw(st.sampled_from(beyond))] + values[1:]
                surely_valid = False
            getattr(tensor.contents, field).extend(values)
        else:
            typed = False
    if not typed:
        for i, (_, datatype, _, values) in enumerate(inputs):
            request.inputs[i].ClearField("contents")
            request.raw_input_contents.append(_layout(datatype, values))
    message = request.SerializeToString()
    if draw(st.booleans()):  # a trailing fragment: the first input's shape grows to a huge one
        extra = service_pb2.ModelInferRequest(model_name="echo")
        extra.inputs.add(name=inputs[0][0], datatype=inputs[0][1], shape=[10**10])
        message += extra.SerializeToString()
        surely_valid = False
    return message, surely_valid


def _expected_grpc(message: bytes) -> dict:
    request = service_pb2.ModelInferRequest.FromString(message)
    out = {}
    for i, tensor in enumerate(request.inputs):
        if request.raw_input_contents:
            blob = request.raw_input_contents[i]
        else:
            field = tensor.contents.ListFields()
            values = list(field[0][1]) if field else []
            blob = _layout(tensor.datatype, values)
        out[tensor.name] = [tensor.datatype, list(tensor.shape), blob.hex()]
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(case=grpc_cases())
def test_grpc_the_model_receives_what_the_front_read_or_nothing(serve, case):
    message, surely_valid = case
    with grpc.insecure_channel(serve.grpc_url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        try:
            answer = service_pb2.ModelInferResponse.FromString(call(message, timeout=30))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
            assert not surely_valid, exc.details()
            return
    (raw,) = answer.raw_output_contents
    assert orjson.loads(raw[4:]) == _expected_grpc(message)


def test_the_issue_request_is_refused_and_the_server_keeps_serving(serve):
    body = b'{"inputs":[{"name":"f32","datatype":"FP32","shape":[10000000000],"shape":[1],"data":[1.0]}]}'
    status, answer = _post(serve, body, {})
    assert status == 200 and _echo(answer) == {"f32": ["FP32", [1], np.float32(1.0).tobytes().hex()]}
    body = b'{"inputs":[{"name":"f32","datatype":"FP32","shape":[1],"shape":[10000000000],"data":[1.0]}]}'
    status, answer = _post(serve, body, {})
    assert status == 400 and b"input 'f32'" in answer and b"10000000000" in answer
    assert serve.process.poll() is None


def test_a_crash_names_the_request_in_flight(serve):
    """Runs last: the `crash` model kills tritonserver; serve's log names the request it was serving."""
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}]})
    status, answer = _post(serve, body, {}, model="crash")
    assert status == 503, answer
    digest = hashlib.sha256(body).hexdigest()[:16]
    wait_until(lambda: f"model=crash bytes={len(body)} sha256={digest} caller=127.0.0.1:" in
               serve.stderr_path.read_text(), timeout_s=30, what="the crash's log line naming the request")
    assert "tritonserver exited" in serve.stderr_path.read_text()
