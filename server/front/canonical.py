"""What the fronts forward: a canonical encoding of a CheckedRequest, never the caller's bytes.

Triton receives exactly what server.front.validate read, so no second parser
can read the request differently (see that module's docstring for why):

    HTTP   one JSON header written by orjson from the checked values (each
           key once, names from [A-Za-z0-9_.:-], integers in int64 range),
           then every input in the binary tensor extension:
           {"id", "parameters", "inputs": [{"name", "datatype", "shape",
            "parameters": {"binary_data_size": n}}], "outputs"} + data ...
           Inference-Header-Content-Length and Content-Length are ours.
    gRPC   a new ModelInferRequest built from the checked values, every
           input in raw_input_contents, serialized by protobuf.

The binary data is the caller's bytes for binary inputs (checked for size,
and for BOOL for 0/1) and the converted values for JSON data or typed gRPC
contents, so what a model receives is bit for bit what the front checked.
"""

from __future__ import annotations

import orjson
from tritonclient.grpc import service_pb2

from server.front.validate import CheckedRequest


def http_infer_body(checked: CheckedRequest) -> tuple[list, int]:
    """(the body's chunks, the JSON header's length) of the canonical HTTP request."""
    header: dict = {}
    if checked.id is not None:
        header["id"] = checked.id
    if checked.parameters:
        header["parameters"] = checked.parameters
    header["inputs"] = [{"name": t.name, "datatype": t.datatype, "shape": t.shape,
                         "parameters": {"binary_data_size": len(t.data)}} for t in checked.inputs]
    if checked.outputs:
        header["outputs"] = [{"name": name, "parameters": parameters} if parameters else {"name": name}
                             for name, parameters in checked.outputs]
    encoded = orjson.dumps(header)
    return [encoded, *(t.data for t in checked.inputs)], len(encoded)


def grpc_infer_message(checked: CheckedRequest, model_name: str, model_version: str) -> bytes:
    """The canonical serialized ModelInferRequest."""
    request = service_pb2.ModelInferRequest(model_name=model_name, model_version=model_version,
                                            id=checked.id or "")
    for key, value in checked.parameters.items():
        request.parameters[key].int64_param = value
    for tensor in checked.inputs:
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        request.raw_input_contents.append(bytes(tensor.data))
    for name, parameters in checked.outputs:
        output = request.outputs.add(name=name)
        for key, value in parameters.items():
            output.parameters[key].int64_param = value
    return request.SerializeToString()
