"""Test model: answers with what it received (the front's differential test, tests/e2e/test_front_differential.py).

``echo`` is one JSON string: {input name: [datatype, shape, hex of the
tensor's bytes in Triton's binary layout (BYTES: u32 length + bytes each)]}.
"""

import json
import struct

import numpy as np
import triton_python_backend_utils as pb_utils

_DATATYPES = {"bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "uint64": "UINT64", "int64": "INT64",
              "float16": "FP16", "float32": "FP32", "float64": "FP64", "object": "BYTES"}


def _layout(array: np.ndarray) -> bytes:
    if array.dtype == np.object_:
        return b"".join(struct.pack("<I", len(item)) + item for item in array.reshape(-1))
    return np.ascontiguousarray(array).tobytes()


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            seen = {}
            for tensor in request.inputs():
                array = tensor.as_numpy()
                seen[tensor.name()] = [_DATATYPES[array.dtype.name], list(array.shape), _layout(array).hex()]
            echo = np.array([json.dumps(seen).encode()], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("echo", echo)]))
        return responses
