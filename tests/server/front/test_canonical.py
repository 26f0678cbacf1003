"""server.front.canonical: what the fronts forward reads back, through the same checks, as exactly what
was checked (the canonical encoding is a fixed point), for every datatype and both protocols."""

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from server.front.canonical import grpc_infer_message, http_infer_body
from server.front.validate import FrontLimits, check_grpc_infer, check_http_infer
from tests.server.front.test_validate import bytes_blob

LIMITS = FrontLimits(max_elements_per_input=4096)
ELEMENTS = {
    "BOOL": st.booleans(), "INT8": st.integers(-128, 127), "UINT8": st.integers(0, 255),
    "INT32": st.integers(-2**31, 2**31 - 1), "UINT32": st.integers(0, 2**32 - 1),
    "INT64": st.integers(-2**63, 2**63 - 1), "UINT64": st.integers(0, 2**64 - 1),
    "FP16": st.floats(-65504, 65504, width=16), "FP32": st.floats(width=32, allow_nan=False, allow_infinity=False),
    "FP64": st.floats(allow_nan=False, allow_infinity=False), "BYTES": st.text(max_size=8),
}


@st.composite
def json_requests(draw):
    inputs = []
    for i in range(draw(st.integers(1, 4))):
        datatype = draw(st.sampled_from(sorted(ELEMENTS)))
        shape = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3))
        values = [draw(ELEMENTS[datatype]) for _ in range(int(np.prod(shape)))]
        data = np.array(values, dtype=object).reshape(shape).tolist() if draw(st.booleans()) else values
        inputs.append({"name": f"in_{i}", "datatype": datatype, "shape": shape, "data": data})
    document = {"inputs": inputs}
    if draw(st.booleans()):
        document["id"] = draw(st.text(max_size=20))
    if draw(st.booleans()):
        document["parameters"] = {"binary_data_output": draw(st.booleans()), "timeout": draw(st.integers(0, 10**6))}
    if draw(st.booleans()):
        document["outputs"] = [{"name": "scores", "parameters": {"binary_data": draw(st.booleans())}}]
    return orjson.dumps(document)


@settings(max_examples=150, deadline=None)
@given(body=json_requests())
def test_http_canonical_body_reads_back_as_what_was_checked(body):
    checked = check_http_infer(body, None, LIMITS)
    chunks, header_length = http_infer_body(checked)
    again = check_http_infer(b"".join(chunks), header_length, LIMITS)
    assert again.id == checked.id and again.parameters == checked.parameters and again.outputs == checked.outputs
    assert [(t.name, t.datatype, t.shape, bytes(t.data)) for t in again.inputs] == \
        [(t.name, t.datatype, t.shape, bytes(t.data)) for t in checked.inputs]


@settings(max_examples=100, deadline=None)
@given(body=json_requests())
def test_grpc_canonical_message_reads_back_as_what_was_checked(body):
    checked = check_http_infer(body, None, LIMITS)  # any checked request, encoded for gRPC
    checked = type(checked)(checked.id, {k: v for k, v in checked.parameters.items() if k == "timeout"},
                            checked.inputs, tuple((name, {}) for name, _ in checked.outputs))
    message = grpc_infer_message(checked, "ranker", "1")
    request = service_pb2.ModelInferRequest.FromString(message)
    again = check_grpc_infer(request, LIMITS)
    assert (request.model_name, request.model_version) == ("ranker", "1")
    assert again.id == (checked.id or None) and again.parameters == checked.parameters
    assert [(t.name, t.datatype, t.shape, bytes(t.data)) for t in again.inputs] == \
        [(t.name, t.datatype, t.shape, bytes(t.data)) for t in checked.inputs]


def test_bytes_inputs_keep_their_layout():
    body = orjson.dumps({"inputs": [{"name": "request_id", "datatype": "BYTES", "shape": [2], "data": ["a", "bc"]}]})
    chunks, header_length = http_infer_body(check_http_infer(body, None, LIMITS))
    assert b"".join(chunks)[header_length:] == bytes_blob([b"a", b"bc"])
