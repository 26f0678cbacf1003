"""Checks a KServe v2 inference request and returns what it holds, before Triton sees it.

Why: Triton 2.51's HTTP frontend allocates for an input's *declared* shape
before it looks at the data, the model or even the input's name, so a
100-byte body declaring 10^10 elements aborts the whole server
(``std::bad_alloc``). Its gRPC frontend compares declared and carried bytes,
but accepts any message up to 2 GiB and copies it into the model's process.
Nothing here allocates in proportion to a declared shape: element counts are
Python integers (no overflow), compared with the limits and with what the
body carries.

One reading only: the caller's bytes are parsed once, here (orjson for HTTP
JSON, protobuf for gRPC), and the fronts forward a canonical re-encoding of
the ``CheckedRequest`` this module returns (server.front.canonical), never the
caller's bytes. Two parsers reading the same bytes disagree somewhere
(orjson keeps the last of two duplicate keys, Triton's rapidjson the first:
``"shape":[10000000000],"shape":[1]`` passed a check that read [1] and
aborted Triton, which read 10^10); with one parser there is nothing to
disagree about. JSON ``data`` values are converted to the binary tensor
layout here, so Triton never parses a number a caller wrote.

What one input must satisfy (the same rules for HTTP JSON, HTTP binary and
gRPC; the first failure is reported, naming the input)::

    name         1..256 characters from [A-Za-z0-9_.:-], unique in the request
    datatype     one of DATATYPE_BYTES (BOOL ... FP64, BYTES)
    shape        a list of at most 16 integers, each 0 <= d <= 2**31 - 1
    elements     prod(shape) <= limits.max_elements_per_input
    carried      JSON "data": exactly prod(shape) values (nested lists allowed),
                 each of the datatype's kind and in its range: true/false for
                 BOOL, integers (not true/false) within the integer type,
                 numbers finite in the float type, strings for BYTES (BF16
                 only as binary)
                 binary_data_size / raw contents: prod(shape) * itemsize bytes
                 (BOOL bytes 0 or 1), or for BYTES exactly prod(shape)
                 length-prefixed strings
    parameters   HTTP: binary_data_size only; gRPC: none (shared-memory
                 parameters are refused with their own message)

The request: 1..limits.max_inputs inputs, at most limits.max_outputs
requested outputs (a name, HTTP parameters binary_data / classification
only), an ``id`` of at most 256 characters, request parameters from
REQUEST_PARAMETERS only, no member this module does not know, and binary
sizes that add up to the bytes after the JSON header. ``RequestRejected``
carries the message; the caller maps it to HTTP 400 or gRPC INVALID_ARGUMENT.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

import numpy as np
import orjson

DATATYPE_BYTES = {
    "BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4,
    "INT64": 8, "FP16": 2, "BF16": 2, "FP32": 4, "FP64": 8, "BYTES": 0,
}
_INTEGER_TYPES = {name: np.dtype(name.lower()) for name in
                  ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")}
_FLOAT_TYPES = {"FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64)}
_MAX_DIM = 2**31 - 1
_MAX_RANK = 16
_MAX_ID = 256
_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,256}")
_SHARED_MEMORY_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_LENGTH_PREFIX = struct.Struct("<I")
_INT63 = 2**63 - 1
# request parameter -> (JSON kind, inclusive range for integers)
REQUEST_PARAMETERS = {"binary_data_output": (bool, None), "priority": (int, (0, _INT63)),
                      "timeout": (int, (0, _INT63))}
OUTPUT_PARAMETERS = {"binary_data": (bool, None), "classification": (int, (0, _MAX_DIM))}
_REQUEST_KEYS = {"id", "inputs", "outputs", "parameters"}
_INPUT_KEYS = {"name", "datatype", "shape", "data", "parameters"}
_OUTPUT_KEYS = {"name", "parameters"}


class RequestRejected(ValueError):
    """A request the front refuses before forwarding; the message names the input and the fault."""


@dataclass(frozen=True)
class FrontLimits:
    """What one request may declare and carry, and what callers may hold open.
    The defaults are far above the shipped models' needs (the ranker takes at
    most 4096 x 8 FIDs = 32,768 elements, 256 KiB) and far below what hurts
    the server. Connections (HTTP): at most ``max_connections`` open at once
    (more are answered 503 and closed), a request must arrive whole within
    ``read_timeout_s`` of its first byte (else 408), and a connection idle for
    ``idle_timeout_s`` is closed: a caller trickling bytes holds a socket and
    at most max_body_bytes for read_timeout_s, not forever."""

    max_body_bytes: int = 8 << 20
    max_elements_per_input: int = 1 << 20
    max_inputs: int = 16
    max_outputs: int = 16
    max_connections: int = 1024
    read_timeout_s: float = 30.0
    idle_timeout_s: float = 300.0

    def __post_init__(self):
        for name in ("max_body_bytes", "max_elements_per_input", "max_inputs", "max_outputs", "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"FrontLimits.{name} requires an integer >= 1, got {value!r}")
        for name in ("read_timeout_s", "idle_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"FrontLimits.{name} requires a finite number of seconds > 0, got {value!r}")


@dataclass(frozen=True)
class CheckedTensor:
    """One input as the front read it. ``data`` is exactly what Triton's binary
    tensor layout carries for it: prod(shape) * itemsize little-endian bytes, or
    for BYTES prod(shape) strings each behind a u32 length."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes | memoryview


@dataclass(frozen=True)
class CheckedRequest:
    """Everything of a request that is forwarded; anything else was refused."""

    id: str | None
    parameters: dict  # of REQUEST_PARAMETERS
    inputs: tuple[CheckedTensor, ...]
    outputs: tuple[tuple[str, dict], ...]  # (name, OUTPUT_PARAMETERS)


def _declared_elements(where: str, shape, limits: FrontLimits) -> int:
    if not isinstance(shape, (list, tuple)) or len(shape) > _MAX_RANK:
        raise RequestRejected(f"{where} requires 'shape' as a list of at most {_MAX_RANK} integers, "
                              f"got {_short(shape)}")
    count = 1
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= _MAX_DIM:
            raise RequestRejected(f"{where} requires every dimension in 0..{_MAX_DIM}, got shape {_short(shape)}")
        count *= dim
    if count > limits.max_elements_per_input:
        raise RequestRejected(f"{where} declares shape {_short(shape)} = {count} elements; the limit is "
                              f"{limits.max_elements_per_input} per input")
    return count


def _check_name(where: str, name) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RequestRejected(f"{where} requires a 'name' of 1 to 256 characters from [A-Za-z0-9_.:-], "
                              f"got {_short(name)}")
    return name


def _check_name_and_type(where: str, name, datatype, seen: set) -> None:
    _check_name(where, name)
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
        if datatype == "BOOL" and size and np.frombuffer(blob, np.uint8).max() > 1:
            raise RequestRejected(f"input '{name}' requires BOOL bytes of 0 or 1")
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


def _flatten(data) -> list:
    """The leaves of a (possibly nested) JSON list in row-major order, without recursion."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(value, list) for value in data):
        return data
    flat, stack = [], [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _json_tensor_bytes(name: str, datatype: str, shape, count: int, data) -> bytes:
    """A JSON ``data`` member as binary tensor bytes, or RequestRejected."""
    values = _flatten(data)
    if len(values) != count:
        raise RequestRejected(f"input '{name}' declares shape {shape} = {count} elements, "
                              f"but carries {len(values)} values")
    if not values:
        return b""
    kinds = set(map(type, values))
    if datatype == "BYTES":
        if kinds != {str}:
            raise RequestRejected(f"input '{name}' requires strings for BYTES, got {_kind_names(kinds)}")
        encoded = [value.encode() for value in values]
        return b"".join(_LENGTH_PREFIX.pack(len(item)) + item for item in encoded)
    if datatype == "BOOL":
        if kinds != {bool}:
            raise RequestRejected(f"input '{name}' requires true/false for BOOL, got {_kind_names(kinds)}")
        return np.array(values, dtype=np.bool_).tobytes()
    if datatype in _INTEGER_TYPES:
        if kinds != {int}:
            raise RequestRejected(f"input '{name}' requires integers for {datatype}, got {_kind_names(kinds)}")
        dtype = _INTEGER_TYPES[datatype]
        info = np.iinfo(dtype)
        low, high = min(values), max(values)
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise RequestRejected(f"input '{name}' requires {datatype} values in {info.min}..{info.max}, got {bad}")
        return np.array(values, dtype=dtype).tobytes()
    if datatype in _FLOAT_TYPES:
        if not kinds <= {int, float}:
            raise RequestRejected(f"input '{name}' requires numbers for {datatype}, got {_kind_names(kinds)}")
        with np.errstate(over="ignore"):
            array = np.array(values, dtype=np.float64).astype(_FLOAT_TYPES[datatype])
        if not np.isfinite(array).all():
            raise RequestRejected(f"input '{name}' holds a value beyond the range of {datatype} "
                                  f"(|x| <= {float(np.finfo(array.dtype).max):.6g})")
        return array.tobytes()
    raise RequestRejected(f"input '{name}' of datatype {datatype} requires binary data "
                          "(parameters.binary_data_size), not JSON 'data'")


def _kind_names(kinds: set) -> str:
    names = {bool: "true/false", int: "integers", float: "fractional numbers", str: "strings", dict: "objects",
             type(None): "null"}
    return ", ".join(sorted(names.get(kind, kind.__name__) for kind in kinds))


def _check_members(where: str, document: dict, allowed: set) -> None:
    unknown = document.keys() - allowed
    if unknown:
        raise RequestRejected(f"{where} holds member(s) {sorted(unknown)!r}; the accepted members are "
                              f"{sorted(allowed)}")


def _check_parameters(where: str, parameters, allowed: dict) -> dict:
    """``parameters`` checked against ``allowed`` (name -> (kind, range)); shared memory gets its own message."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise RequestRejected(f"{where} requires 'parameters' as an object, got {_short(parameters)}")
    for key in _SHARED_MEMORY_PARAMETERS:
        if key in parameters:
            raise RequestRejected(f"{where} uses '{key}': shared-memory inputs are not accepted here")
    for key, value in parameters.items():
        if key not in allowed:
            raise RequestRejected(f"{where} uses parameter {_short(key)}; the accepted parameters are "
                                  f"{sorted(allowed) or 'none'}")
        kind, bounds = allowed[key]
        if type(value) is not kind or (bounds is not None and not bounds[0] <= value <= bounds[1]):
            expected = "true or false" if kind is bool else f"an integer in {bounds[0]}..{bounds[1]}"
            raise RequestRejected(f"{where} requires parameter '{key}' as {expected}, got {_short(value)}")
    return parameters


def _check_id(request_id) -> str | None:
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > _MAX_ID):
        raise RequestRejected(f"the request requires 'id' as a string of at most {_MAX_ID} characters, "
                              f"got {_short(request_id)}")
    return request_id


def _check_outputs(outputs, limits: FrontLimits, allowed: dict) -> tuple:
    if not isinstance(outputs, list) or len(outputs) > limits.max_outputs:
        raise RequestRejected(f"the request allows 'outputs' as a list of at most {limits.max_outputs}, "
                              f"got {_short(outputs)}")
    checked, seen = [], set()
    for i, output in enumerate(outputs):
        if not isinstance(output, dict):
            raise RequestRejected(f"output {i} requires an object with a 'name', got {_short(output)}")
        _check_members(f"output {i}", output, _OUTPUT_KEYS)
        name = _check_name(f"output {i}", output.get("name"))
        if name in seen:
            raise RequestRejected(f"output '{name}' appears twice")
        seen.add(name)
        checked.append((name, _check_parameters(f"output '{name}'", output.get("parameters"), allowed)))
    return tuple(checked)


def check_http_infer(body: bytes, header_length: int | None, limits: FrontLimits) -> CheckedRequest:
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
    _check_members("the request", document, _REQUEST_KEYS)
    parameters = _check_parameters("the request", document.get("parameters"), REQUEST_PARAMETERS)
    request_id = _check_id(document.get("id"))
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= limits.max_inputs:
        raise RequestRejected(f"the request requires 'inputs' as a list of 1 to {limits.max_inputs} tensors, "
                              f"got {_short(inputs)}")
    outputs = _check_outputs(document.get("outputs", []), limits, OUTPUT_PARAMETERS)
    binary = memoryview(body)[header_length:]
    offset, seen, checked = 0, set(), []
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise RequestRejected(f"input {i} requires a JSON object, got {_short(tensor)}")
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        _check_name_and_type(f"input {i}", name, datatype, seen)
        _check_members(f"input '{name}'", tensor, _INPUT_KEYS)
        count = _declared_elements(f"input '{name}'", shape, limits)
        size = _check_parameters(f"input '{name}'", tensor.get("parameters"),
                                 {"binary_data_size": (int, (0, limits.max_body_bytes))}).get("binary_data_size")
        if size is None:
            if "data" not in tensor:
                raise RequestRejected(f"input '{name}' requires 'data' or parameters.binary_data_size")
            data = _json_tensor_bytes(name, datatype, shape, count, tensor["data"])
        else:
            if "data" in tensor:
                raise RequestRejected(f"input '{name}' has both 'data' and parameters.binary_data_size")
            if size > len(binary) - offset:
                raise RequestRejected(f"input '{name}' declares binary_data_size {size}, but only "
                                      f"{len(binary) - offset} bytes follow the JSON header there")
            data = binary[offset:offset + size]
            _check_carried_bytes(name, datatype, count, data)
            offset += size
        checked.append(CheckedTensor(name, datatype, tuple(shape), data))
    if offset != len(binary):
        raise RequestRejected(f"the binary tensors declare {offset} bytes, but {len(binary)} follow the JSON header")
    return CheckedRequest(request_id, parameters, tuple(checked), outputs)


_CONTENTS_FIELDS = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
GRPC_REQUEST_PARAMETERS = {"priority": ("int64_param", (0, _INT63)), "timeout": ("int64_param", (0, _INT63))}
GRPC_OUTPUT_PARAMETERS = {"classification": ("int64_param", (0, _MAX_DIM))}


def _check_grpc_parameters(where: str, parameters, allowed: dict) -> dict:
    """A protobuf map<string, InferParameter> as {name: int}, checked against ``allowed``."""
    for key in _SHARED_MEMORY_PARAMETERS:
        if key in parameters:
            raise RequestRejected(f"{where} uses '{key}': shared-memory inputs are not accepted here")
    checked = {}
    for key, parameter in parameters.items():
        if key not in allowed:
            raise RequestRejected(f"{where} uses parameter {_short(key)}; the accepted parameters are "
                                  f"{sorted(allowed) or 'none'}")
        field, (low, high) = allowed[key]
        value = getattr(parameter, field)
        if parameter.WhichOneof("parameter_choice") != field or not low <= value <= high:
            raise RequestRejected(f"{where} requires parameter '{key}' as {field} in {low}..{high}, "
                                  f"got {_short(str(parameter).strip())}")
        checked[key] = value
    return checked


def _contents_bytes(name: str, datatype: str, count: int, contents) -> bytes:
    """Typed gRPC contents as binary tensor bytes, each value checked against the datatype's range."""
    field = _CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise RequestRejected(f"input '{name}' of datatype {datatype} requires raw_input_contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise RequestRejected(f"input '{name}' declares {count} elements, but carries {len(values)} values")
    if not count:
        return b""
    if datatype == "BYTES":
        return b"".join(_LENGTH_PREFIX.pack(len(item)) + item for item in values)
    if datatype in _INTEGER_TYPES:
        info = np.iinfo(_INTEGER_TYPES[datatype])
        low, high = min(values), max(values)
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise RequestRejected(f"input '{name}' requires {datatype} values in {info.min}..{info.max}, got {bad}")
        return np.array(values, dtype=_INTEGER_TYPES[datatype]).tobytes()
    return np.array(values, dtype={"BOOL": np.bool_, "FP32": np.float32, "FP64": np.float64}[datatype]).tobytes()


def check_grpc_infer(request, limits: FrontLimits) -> CheckedRequest:
    """Checks a parsed ``inference.ModelInferRequest`` (tritonclient's grpc_service_pb2)."""
    inputs = request.inputs
    if not 1 <= len(inputs) <= limits.max_inputs:
        raise RequestRejected(f"the request requires 1 to {limits.max_inputs} inputs, got {len(inputs)}")
    if len(request.outputs) > limits.max_outputs:
        raise RequestRejected(f"the request allows at most {limits.max_outputs} outputs, got {len(request.outputs)}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(inputs):
        raise RequestRejected(f"the request carries {len(raw)} raw_input_contents for {len(inputs)} inputs")
    parameters = _check_grpc_parameters("the request", request.parameters, GRPC_REQUEST_PARAMETERS)
    request_id = _check_id(request.id)
    seen: set = set()
    checked = []
    for i, tensor in enumerate(inputs):
        _check_name_and_type(f"input {i}", tensor.name, tensor.datatype, seen)
        _check_grpc_parameters(f"input '{tensor.name}'", tensor.parameters, {})
        count = _declared_elements(f"input '{tensor.name}'", list(tensor.shape), limits)
        if raw:
            if tensor.HasField("contents"):
                raise RequestRejected(f"input '{tensor.name}' has both contents and raw_input_contents")
            data = raw[i]
            _check_carried_bytes(tensor.name, tensor.datatype, count, data)
        else:
            data = _contents_bytes(tensor.name, tensor.datatype, count, tensor.contents)
        checked.append(CheckedTensor(tensor.name, tensor.datatype, tuple(tensor.shape), data))
    outputs, names = [], set()
    for i, output in enumerate(request.outputs):
        name = _check_name(f"output {i}", output.name)
        if name in names:
            raise RequestRejected(f"output '{name}' appears twice")
        names.add(name)
        outputs.append((name, _check_grpc_parameters(f"output '{name}'", output.parameters, GRPC_OUTPUT_PARAMETERS)))
    return CheckedRequest(request_id or None, parameters, tuple(checked), tuple(outputs))


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
