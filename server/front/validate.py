"""Checks a KServe v2 inference request against what it actually carries, before Triton sees it.

Why: Triton 2.51's HTTP frontend allocates for an input's *declared* shape
before it looks at the data, the model or even the input's name, so a
100-byte body declaring 10^10 elements aborts the whole server
(``std::bad_alloc``). Its gRPC frontend compares declared and carried bytes,
but accepts any message up to 2 GiB and copies it into the model's process.
Nothing here allocates in proportion to a declared shape: element counts are
Python integers (no overflow), compared with the limits and with what the
body carries, and only then is the request forwarded, unchanged.

What one input must satisfy (the same rules for HTTP JSON, HTTP binary and
gRPC; the first failure is reported, naming the input)::

    name         a string of 1..256 characters, unique in the request
    datatype     one of DATATYPE_BYTES (BOOL ... FP64, BYTES)
    shape        a list of integers, each 0 <= d <= 2**31 - 1
    elements     prod(shape) <= limits.max_elements_per_input
    carried      JSON "data": exactly prod(shape) values (nested lists allowed)
                 binary_data_size / raw contents: prod(shape) * itemsize bytes,
                 or for BYTES, exactly prod(shape) length-prefixed strings
    shared memory parameters are refused (the front does not expose them)

A request also needs 1..limits.max_inputs inputs, at most limits.max_outputs
requested outputs, and its binary sizes must add up to the bytes after the
JSON header. ``RequestRejected`` carries the message; the caller maps it to
HTTP 400 or gRPC INVALID_ARGUMENT.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import orjson

DATATYPE_BYTES = {
    "BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4,
    "INT64": 8, "FP16": 2, "BF16": 2, "FP32": 4, "FP64": 8, "BYTES": 0,
}
_MAX_DIM = 2**31 - 1
_MAX_NAME = 256
_SHARED_MEMORY_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_LENGTH_PREFIX = struct.Struct("<I")


class RequestRejected(ValueError):
    """A request the front refuses before forwarding; the message names the input and the fault."""


@dataclass(frozen=True)
class FrontLimits:
    """What one request may declare and carry. The defaults are far above the
    shipped models' needs (the ranker takes at most 4096 x 8 FIDs = 32,768
    elements, 256 KiB) and far below what hurts the server."""

    max_body_bytes: int = 8 << 20
    max_elements_per_input: int = 1 << 20
    max_inputs: int = 16
    max_outputs: int = 16

    def __post_init__(self):
        for name in ("max_body_bytes", "max_elements_per_input", "max_inputs", "max_outputs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"FrontLimits.{name} requires an integer >= 1, got {value!r}")


def _declared_elements(where: str, shape, limits: FrontLimits) -> int:
    if not isinstance(shape, (list, tuple)) or len(shape) > 16:
        raise RequestRejected(f"{where} requires 'shape' as a list of at most 16 integers, got {_short(shape)}")
    count = 1
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= _MAX_DIM:
            raise RequestRejected(f"{where} requires every dimension in 0..{_MAX_DIM}, got shape {_short(shape)}")
        count *= dim
    if count > limits.max_elements_per_input:
        raise RequestRejected(f"{where} declares shape {_short(shape)} = {count} elements; the limit is "
                              f"{limits.max_elements_per_input} per input")
    return count


def _check_name_and_type(where: str, name, datatype, seen: set) -> None:
    if not isinstance(name, str) or not 1 <= len(name) <= _MAX_NAME:
        raise RequestRejected(f"{where} requires a 'name' of 1 to {_MAX_NAME} characters, got {_short(name)}")
    if name in seen:
        raise RequestRejected(f"input '{name}' appears twice")
    seen.add(name)
    if datatype not in DATATYPE_BYTES:
        raise RequestRejected(f"input '{name}' requires a datatype in {sorted(DATATYPE_BYTES)}, got {_short(datatype)}")


def _check_carried_bytes(name: str, datatype: str, count: int, blob) -> None:
    """``blob``: the input's binary data (bytes or memoryview)."""
    size = len(blob)
    itemsize = DATATYPE_BYTES[datatype]
    if itemsize:
        if size != count * itemsize:
            raise RequestRejected(f"input '{name}' declares {count} {datatype} elements = {count * itemsize} bytes, "
                                  f"but carries {size} bytes")
        return
    offset = 0
    for i in range(count):
        if offset + 4 > size:
            raise RequestRejected(f"input '{name}' declares {count} BYTES elements, but carries {i}")
        offset += 4 + _LENGTH_PREFIX.unpack_from(blob, offset)[0]
        if offset > size:
            raise RequestRejected(f"input '{name}' BYTES element {i} runs past the {size} bytes carried")
    if offset != size:
        raise RequestRejected(f"input '{name}' carries {size - offset} bytes after its {count} BYTES elements")


def _count_values(data) -> int:
    """Leaves of a (possibly nested) JSON list, without recursion."""
    if not isinstance(data, list):
        return 1
    count, stack = 0, [data]
    while stack:
        for value in stack.pop():
            if isinstance(value, list):
                stack.append(value)
            else:
                count += 1
    return count


def _check_parameters(where: str, parameters) -> dict:
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise RequestRejected(f"{where} requires 'parameters' as an object, got {_short(parameters)}")
    for key in _SHARED_MEMORY_PARAMETERS:
        if key in parameters:
            raise RequestRejected(f"{where} uses '{key}': shared-memory inputs are not accepted here")
    return parameters


def check_http_infer(body: bytes, header_length: int | None, limits: FrontLimits) -> None:
    """Checks a KServe v2 HTTP infer body; ``header_length`` is the value of
    Inference-Header-Content-Length (None when absent: all JSON)."""
    if header_length is None:
        header_length = len(body)
    elif not 0 < header_length <= len(body):
        raise RequestRejected(f"Inference-Header-Content-Length requires 1 to {len(body)} (the body's size), "
                              f"got {header_length}")
    try:
        document = orjson.loads(memoryview(body)[:header_length])
    except orjson.JSONDecodeError as exc:
        raise RequestRejected(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise RequestRejected(f"the request body requires a JSON object, got {type(document).__name__}")
    _check_parameters("the request", document.get("parameters"))
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= limits.max_inputs:
        raise RequestRejected(f"the request requires 'inputs' as a list of 1 to {limits.max_inputs} tensors, "
                              f"got {_short(inputs)}")
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list) or len(outputs) > limits.max_outputs:
        raise RequestRejected(f"the request allows 'outputs' as a list of at most {limits.max_outputs}, "
                              f"got {_short(outputs)}")
    binary = memoryview(body)[header_length:]
    offset, seen = 0, set()
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise RequestRejected(f"input {i} requires a JSON object, got {_short(tensor)}")
        name = tensor.get("name")
        _check_name_and_type(f"input {i}", name, tensor.get("datatype"), seen)
        count = _declared_elements(f"input '{name}'", tensor.get("shape"), limits)
        parameters = _check_parameters(f"input '{name}'", tensor.get("parameters"))
        size = parameters.get("binary_data_size")
        if size is None:
            if "data" not in tensor:
                raise RequestRejected(f"input '{name}' requires 'data' or parameters.binary_data_size")
            carried = _count_values(tensor["data"])
            if carried != count:
                raise RequestRejected(f"input '{name}' declares shape {tensor['shape']} = {count} elements, "
                                      f"but carries {carried} values")
            continue
        if "data" in tensor:
            raise RequestRejected(f"input '{name}' has both 'data' and parameters.binary_data_size")
        if type(size) is not int or not 0 <= size <= len(binary) - offset:
            raise RequestRejected(f"input '{name}' declares binary_data_size {_short(size)}, but only "
                                  f"{len(binary) - offset} bytes follow the JSON header there")
        _check_carried_bytes(name, tensor["datatype"], count, binary[offset:offset + size])
        offset += size
    if offset != len(binary):
        raise RequestRejected(f"the binary tensors declare {offset} bytes, but {len(binary)} follow the JSON header")
    for i, output in enumerate(outputs):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise RequestRejected(f"output {i} requires an object with a 'name', got {_short(output)}")
        _check_parameters(f"output '{output['name']}'", output.get("parameters"))


_CONTENTS_FIELDS = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def check_grpc_infer(request, limits: FrontLimits) -> None:
    """Checks a parsed ``inference.ModelInferRequest`` (tritonclient's grpc_service_pb2)."""
    inputs = request.inputs
    if not 1 <= len(inputs) <= limits.max_inputs:
        raise RequestRejected(f"the request requires 1 to {limits.max_inputs} inputs, got {len(inputs)}")
    if len(request.outputs) > limits.max_outputs:
        raise RequestRejected(f"the request allows at most {limits.max_outputs} outputs, got {len(request.outputs)}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(inputs):
        raise RequestRejected(f"the request carries {len(raw)} raw_input_contents for {len(inputs)} inputs")
    seen: set = set()
    for i, tensor in enumerate(inputs):
        _check_name_and_type(f"input {i}", tensor.name, tensor.datatype, seen)
        for key in _SHARED_MEMORY_PARAMETERS:
            if key in tensor.parameters:
                raise RequestRejected(f"input '{tensor.name}' uses '{key}': shared-memory inputs are not accepted here")
        count = _declared_elements(f"input '{tensor.name}'", list(tensor.shape), limits)
        if raw:
            _check_carried_bytes(tensor.name, tensor.datatype, count, raw[i])
            continue
        field = _CONTENTS_FIELDS.get(tensor.datatype)
        carried = len(getattr(tensor.contents, field)) if field else 0
        if carried != count:
            raise RequestRejected(f"input '{tensor.name}' declares shape {list(tensor.shape)} = {count} elements, "
                                  f"but carries {carried} values")


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
