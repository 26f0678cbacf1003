"""The latency floor: a trivial Python-backend model with the ranker's request contract.

It takes the same tensors as the ranker and returns zeros (delta_seq 0, a constant impression id),
doing no ranking work. Load tests time it on the same server, in the same
run, as the ranker, so the ranker's own cost shows apart from what Triton,
the Python backend and the client cost for moving these tensors.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

_IMPRESSION_ID = np.array([[b"0" * 32]], dtype=np.object_)


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            items = pb_utils.get_input_tensor_by_name(request, "item_fids").as_numpy()
            pb_utils.get_input_tensor_by_name(request, "user_fids").as_numpy()
            pb_utils.get_input_tensor_by_name(request, "request_id").as_numpy()
            outputs = [  # [1, N] and [1, 1]: a batch dimension of 1, as the ranker's
                pb_utils.Tensor("scores", np.zeros((1, items.shape[1]), dtype=np.float32)),
                pb_utils.Tensor("delta_seq", np.zeros((1, 1), dtype=np.int64)),
                pb_utils.Tensor("impression_id", _IMPRESSION_ID),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
