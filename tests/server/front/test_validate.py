"""server.front.validate: declared shapes against carried data, for every encoding, without a server."""

import re
import struct

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from server.front.validate import DATATYPE_BYTES, FrontLimits, RequestRejected, check_grpc_infer, check_http_infer

LIMITS = FrontLimits(max_elements_per_input=4096)
NUMERIC = {"UINT64": np.uint64, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "FP64": np.float64,
           "UINT8": np.uint8, "BOOL": np.bool_}


def bytes_blob(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def encode_http(tensors, binary: bool):
    """tensors: (name, datatype, declared shape, values) -> (body, header_length or None)."""
    inputs, blobs = [], []
    for name, datatype, shape, values in tensors:
        entry = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            blob = bytes_blob(values) if datatype == "BYTES" else np.asarray(values, NUMERIC[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [v.decode("latin-1") for v in values] if datatype == "BYTES" else \
                np.asarray(values, NUMERIC[datatype]).tolist()
        inputs.append(entry)
    header = orjson.dumps({"inputs": inputs})
    return header + b"".join(blobs), (len(header) if binary else None)


def encode_grpc(tensors):
    request = service_pb2.ModelInferRequest(model_name="ranker")
    for name, datatype, shape, values in tensors:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        blob = bytes_blob(values) if datatype == "BYTES" else np.asarray(values, NUMERIC[datatype]).tobytes()
        request.raw_input_contents.append(blob)
        del tensor
    return service_pb2.ModelInferRequest.FromString(request.SerializeToString())


@st.composite
def tensor_sets(draw):
    """Tensors whose declared shape may or may not match the values they carry."""
    tensors, consistent = [], True
    for i in range(draw(st.integers(1, 4))):
        datatype = draw(st.sampled_from(sorted(NUMERIC) + ["BYTES"]))
        shape = draw(st.lists(st.integers(0, 6), min_size=1, max_size=3))
        actual = int(np.prod(shape))
        if draw(st.booleans()):
            carried = draw(st.integers(0, 40))
            consistent &= carried == actual
        else:
            carried = actual
        if datatype == "BYTES":
            values = [draw(st.binary(max_size=6)) for _ in range(carried)]
        else:
            values = [draw(st.integers(0, 1)) for _ in range(carried)]
        tensors.append((f"t{i}", datatype, shape, values))
    return tensors, consistent


@settings(max_examples=300, deadline=None)
@given(case=tensor_sets(), encoding=st.sampled_from(["json", "binary", "grpc"]))
def test_accepts_exactly_the_requests_that_carry_what_they_declare(case, encoding):
    tensors, consistent = case
    if encoding == "grpc":
        check = lambda: check_grpc_infer(encode_grpc(tensors), LIMITS)  # noqa: E731
    else:
        body, header_length = encode_http(tensors, binary=encoding == "binary")
        check = lambda: check_http_infer(body, header_length, LIMITS)  # noqa: E731
    if consistent:
        check()
    else:
        with pytest.raises(RequestRejected, match="declares|carries|runs past"):
            check()


HUGE_SHAPES = [[10**10], [2**40, 5000], [2**63 - 1], [1, 2**31], [2**32, 2**32, 2**32], [-3], [1, -7], [4097, 1000]]


@pytest.mark.parametrize("shape", HUGE_SHAPES, ids=str)
@pytest.mark.parametrize("encoding", ["json", "binary", "grpc"])
def test_huge_or_negative_declared_shapes_are_refused_without_allocating(shape, encoding):
    tensors = [("x", "INT64", shape, [0, 1, 2])]
    with pytest.raises(RequestRejected, match="input 'x'"):
        if encoding == "grpc":
            check_grpc_infer(encode_grpc(tensors), LIMITS)
        else:
            body, header_length = encode_http(tensors, binary=encoding == "binary")
            check_http_infer(body, header_length, LIMITS)


def test_zero_sized_inputs_that_carry_nothing_pass():
    check_http_infer(*encode_http([("x", "INT64", [1, 0], [])], binary=False), LIMITS)
    check_grpc_infer(encode_grpc([("x", "UINT64", [0], [])]), LIMITS)


@pytest.mark.parametrize("delta", [-1, 1, 10**9])
def test_binary_sizes_that_lie_in_either_direction_are_refused(delta):
    values = np.arange(7, dtype=np.uint64)
    header = orjson.dumps({"inputs": [{"name": "user_fids", "datatype": "UINT64", "shape": [1, 7],
                                       "parameters": {"binary_data_size": 56 + delta}}]})
    with pytest.raises(RequestRejected, match="user_fids"):
        check_http_infer(header + values.tobytes(), len(header), LIMITS)


@pytest.mark.parametrize("header_length", [0, -1, 10**12])
def test_header_length_outside_the_body_is_refused(header_length):
    with pytest.raises(RequestRejected, match="Inference-Header-Content-Length"):
        check_http_infer(b'{"inputs": []}', header_length, LIMITS)


def test_bytes_elements_whose_length_prefix_lies_are_refused():
    blob = struct.pack("<I", 2**31) + b"abc"
    header = orjson.dumps({"inputs": [{"name": "request_id", "datatype": "BYTES", "shape": [1, 1],
                                       "parameters": {"binary_data_size": len(blob)}}]})
    with pytest.raises(RequestRejected, match="runs past"):
        check_http_infer(header + blob, len(header), LIMITS)


@pytest.mark.parametrize("body", [
    b"{not json", b"[]", b'{"inputs": "x"}', b'{"inputs": []}', b'{"inputs": [{"name": 1}]}',
    b'{"inputs": [{"name": "a", "datatype": "NOPE", "shape": [1], "data": [1]}]}',
    b'{"inputs": [{"name": "a", "datatype": "INT64", "shape": [true], "data": [1]}]}',
    b'{"inputs": [{"name": "a", "datatype": "INT64", "shape": [1.0], "data": [1]}]}',
    b'{"inputs": [{"name": "a", "datatype": "INT64", "shape": [1]}]}',
    b'{"inputs": [{"name": "a", "datatype": "INT64", "shape": [1], "data": [1]},'
    b' {"name": "a", "datatype": "INT64", "shape": [1], "data": [1]}]}',
    b'{"inputs": [{"name": "a", "datatype": "INT64", "shape": [1], "parameters": '
    b'{"shared_memory_region": "r", "shared_memory_byte_size": 8}}]}',
    b"[" * 100_000 + b"]" * 100_000,
], ids=range(12))
def test_malformed_documents_are_refused_with_a_message(body):
    with pytest.raises(RequestRejected) as caught:
        check_http_infer(body, None, LIMITS)
    assert str(caught.value)


def test_nested_json_data_counts_every_value():
    body = orjson.dumps({"inputs": [{"name": "a", "datatype": "INT64", "shape": [2, 3], "data": [[1, 2, 3], [4, 5, 6]]}]})
    check_http_infer(body, None, LIMITS)
    body = orjson.dumps({"inputs": [{"name": "a", "datatype": "INT64", "shape": [2, 3], "data": [[1, 2, 3], [4, 5]]}]})
    with pytest.raises(RequestRejected, match="carries 5 values"):
        check_http_infer(body, None, LIMITS)


def test_every_datatype_has_its_size():
    assert DATATYPE_BYTES["UINT64"] == 8 and DATATYPE_BYTES["BYTES"] == 0
    with pytest.raises(ValueError, match="max_body_bytes"):
        FrontLimits(max_body_bytes=0)


def _json_input(datatype: str, data, name: str = "x") -> bytes:
    values = b",".join(str(v).encode() if type(v) is int else orjson.dumps(v) for v in data)  # ints past 64 bits
    return b'{"inputs": [{"name": "%s", "datatype": "%s", "shape": [%d], "data": [%s]}]}' % (
        name.encode(), datatype.encode(), len(data), values)


@pytest.mark.parametrize("datatype, data", [
    ("INT8", [1, 128]), ("INT8", [-129]), ("UINT8", [256]), ("UINT8", [-1]), ("INT32", [2**31]),
    ("UINT64", [-1]), ("INT64", [2**63]), ("UINT64", [2**64]), ("FP32", [1e39]), ("FP16", [70000.0]),
    ("INT64", [True]), ("INT64", [1.5]), ("BOOL", [1]), ("FP64", [True]), ("BYTES", [1]), ("FP32", ["1"]),
    ("INT64", [None]), ("BF16", [1.0]),
], ids=str)
def test_json_values_outside_their_datatype_are_refused(datatype, data):
    with pytest.raises(RequestRejected, match="input 'x'"):
        check_http_infer(_json_input(datatype, data), None, LIMITS)


@pytest.mark.parametrize("datatype, data, expected", [
    ("INT8", [-128, 127], np.array([-128, 127], np.int8)),
    ("UINT64", [0, 2**64 - 1], np.array([0, 2**64 - 1], np.uint64)),
    ("INT64", [-2**63, 2**63 - 1], np.array([-2**63, 2**63 - 1], np.int64)),
    ("FP32", [1, 0.5, -3.4e38], np.array([1, 0.5, -3.4e38], np.float32)),
    ("FP16", [65504.0], np.array([65504.0], np.float16)),
    ("BOOL", [True, False], np.array([True, False])),
], ids=str)
def test_json_values_at_the_edges_of_their_datatype_become_its_bytes(datatype, data, expected):
    (tensor,) = check_http_infer(_json_input(datatype, data), None, LIMITS).inputs
    assert bytes(tensor.data) == expected.tobytes() and tensor.shape == (len(data),)


def test_bytes_data_becomes_length_prefixed_utf8():
    (tensor,) = check_http_infer(_json_input("BYTES", ["a", "", "é"]), None, LIMITS).inputs
    assert bytes(tensor.data) == bytes_blob([b"a", b"", "é".encode()])


@pytest.mark.parametrize("body, fault", [
    (b'{"inputs": [{"name": "a b", "datatype": "INT64", "shape": [1], "data": [1]}]}', "name"),
    (b'{"inputs": [{"name": "a\\u0000", "datatype": "INT64", "shape": [1], "data": [1]}]}', "name"),
    (b'{"inputs": [{"name": "a", "datatype": "INT64", "shape": [1], "data": [1], "extra": 1}]}', "extra"),
    (b'{"inputs": [{"name": "a", "datatype": "INT64", "shape": [1], "data": [1]}], "model": "x"}', "model"),
    (b'{"inputs": [{"name": "a", "datatype": "INT64", "shape": [1], "data": [1]}], "parameters": {"x": 1}}', "'x'"),
    (b'{"inputs": [{"name": "a", "datatype": "INT64", "shape": [1], "data": [1]}], '
     b'"parameters": {"priority": -1}}', "priority"),
    (b'{"inputs": [{"name": "a", "datatype": "INT64", "shape": [1], "data": [1]}], "id": 7}', "'id'"),
    (b'{"inputs": [{"name": "a", "datatype": "INT64", "shape": [1], "data": [1]}], '
     b'"outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}', "binary_data"),
    (b'{"inputs": [{"name": "a", "datatype": "BOOL", "shape": [1], "parameters": {"binary_data_size": 1}}]}\x02',
     "0 or 1"),
], ids=range(9))
def test_what_the_front_could_not_forward_as_it_read_it_is_refused(body, fault):
    header_length = body.index(b"}]}") + 3 if body.endswith(b"\x02") else None
    with pytest.raises(RequestRejected, match=re.escape(fault)):
        check_http_infer(body, header_length, LIMITS)


def test_a_duplicate_key_is_read_once_the_last_one_wins():
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[10000000000],"shape":[1],"data":[1.0]}]}'
    (tensor,) = check_http_infer(body, None, LIMITS).inputs
    assert tensor.shape == (1,)


@pytest.mark.parametrize("datatype, field, values", [("INT8", "int_contents", [128]), ("UINT8", "uint_contents", [256]),
                                                     ("INT16", "int_contents", [-40000])], ids=str)
def test_grpc_typed_contents_outside_their_datatype_are_refused(datatype, field, values):
    request = service_pb2.ModelInferRequest(model_name="m")
    getattr(request.inputs.add(name="x", datatype=datatype, shape=[1]).contents, field).extend(values)
    with pytest.raises(RequestRejected, match=f"requires {datatype} values"):
        check_grpc_infer(request, LIMITS)
