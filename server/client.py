"""A small KServe v2 client for the ranker and feedback models, over HTTP or gRPC.

    client = RankerClient("127.0.0.1:8001", protocol="grpc")
    user, items = schema.encode_request({"user_id": 7}, [{"item_id": 1}, {"item_id": 2}])
    ranked = client.rank(user, items, request_id=b"req-1")
    scores, delta_seq = ranked                       # unpacks as before
    client.feedback(b"req-1", item_fids=items[:1, 0], labels=[1.0],
                    impression_id=ranked.impression_id)

The ranker gives every response an ``impression_id``; feedback echoes it and
the trainer joins on it (the client's request_id is a correlation field
only). Callers that predate it keep working: ``feedback`` without
``impression_id`` sends the one this client last received for that
request_id (it remembers the last ``REMEMBERED_IMPRESSIONS``), so a caller
that reuses request ids joins its feedback to the latest impression of that
id; pass ``impression_id`` to be exact.

``infer`` sends arbitrary named tensors (tests use it for malformed requests).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Mapping, Sequence

import numpy as np

_DATATYPES = {
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.object_): "BYTES",
    np.dtype(np.bool_): "BOOL",
}


def rank_tensors(user_fids, item_fids, request_id: bytes, timestamp_s: float | None = None) -> dict:
    """The ranker's input tensors, each with its leading batch dimension of 1."""
    tensors = {
        "user_fids": np.asarray(user_fids, dtype=np.uint64)[None],
        "item_fids": np.asarray(item_fids, dtype=np.uint64)[None],
        "request_id": np.array([[request_id]], dtype=np.object_),
    }
    if timestamp_s is not None:
        tensors["timestamp"] = np.array([[timestamp_s]], dtype=np.float64)
    return tensors


REMEMBERED_IMPRESSIONS = 100_000  # request_id -> impression_id, for feedback that names no impression


class Ranked(tuple):
    """``(scores, delta_seq)`` of one ranking, which unpacks as the tuple ``rank`` always returned,
    plus ``impression_id``: the ranker's id of this impression, which feedback echoes."""

    def __new__(cls, scores: np.ndarray, delta_seq: int, impression_id: bytes):
        self = super().__new__(cls, (scores, delta_seq))
        self.impression_id = impression_id
        return self

    @property
    def scores(self) -> np.ndarray:
        return self[0]

    @property
    def delta_seq(self) -> int:
        return self[1]


class InferError(RuntimeError):
    """The server answered with an error; the message is the server's."""


class RankerClient:
    def __init__(self, url: str, protocol: str = "grpc", timeout_s: float = 30.0, api_key: bytes | str | None = None):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol requires 'grpc' or 'http', got {protocol!r}")
        self.protocol = protocol
        self.timeout_s = timeout_s
        if isinstance(api_key, bytes):
            api_key = api_key.decode()
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else None
        if protocol == "grpc":
            import tritonclient.grpc as module

            self._client = module.InferenceServerClient(url)
        else:
            import tritonclient.http as module

            self._client = module.InferenceServerClient(url, connection_timeout=timeout_s,
                                                        network_timeout=timeout_s)
        self._module = module
        from tritonclient.utils import InferenceServerException

        self._error = InferenceServerException
        self._impressions: OrderedDict[bytes, bytes] = OrderedDict()
        self._impressions_lock = threading.Lock()

    @property
    def raw(self):
        """The underlying tritonclient InferenceServerClient (pass ``headers=client.headers``
        to its calls where an API key is required)."""
        return self._client

    def statistics(self, model: str) -> dict:
        """Triton's inference statistics of ``model`` (JSON form, both protocols)."""
        if self.protocol == "grpc":
            return self._client.get_inference_statistics(model, headers=self.headers, as_json=True)["model_stats"][0]
        return self._client.get_inference_statistics(model, headers=self.headers)["model_stats"][0]

    def infer(self, model: str, tensors: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        inputs = []
        for name, array in tensors.items():
            array = np.asarray(array)
            tensor = self._module.InferInput(name, list(array.shape), _DATATYPES[array.dtype])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        requested = [self._module.InferRequestedOutput(name) for name in outputs]
        try:
            if self.protocol == "grpc":
                result = self._client.infer(model, inputs, outputs=requested, client_timeout=self.timeout_s,
                                            headers=self.headers)
            else:
                result = self._client.infer(model, inputs, outputs=requested, headers=self.headers)
        except self._error as exc:
            raise InferError(exc.message() if callable(getattr(exc, "message", None)) else str(exc)) from exc
        return {name: result.as_numpy(name) for name in outputs}

    def rank(self, user_fids: np.ndarray, item_fids: np.ndarray, request_id: bytes,
             timestamp_s: float | None = None, model: str = "ranker") -> Ranked:
        """Scores (float32[N]) of the candidates and the delta_seq they were computed at, as a ``Ranked``
        that also carries the impression id (remembered for ``feedback`` under ``request_id``)."""
        out = self.infer(model, rank_tensors(user_fids, item_fids, request_id, timestamp_s),
                         ["scores", "delta_seq", "impression_id"])
        impression_id = bytes(out["impression_id"].reshape(-1)[0])
        with self._impressions_lock:
            self._impressions[request_id] = impression_id
            self._impressions.move_to_end(request_id)
            if len(self._impressions) > REMEMBERED_IMPRESSIONS:
                self._impressions.popitem(last=False)
        return Ranked(out["scores"][0], int(out["delta_seq"][0, 0]), impression_id)

    def feedback(self, request_id: bytes, item_fids, labels, event_time_s: float | None = None,
                 impression_id: bytes | None = None) -> int:
        """Sends actions on the impression ``impression_id`` (default: the one this client last
        received for ``request_id``, none if it ranked no such request); returns how many the server
        durably accepted. Retrying after an error is safe: the trainer counts an (impression, item) once."""
        if impression_id is None:
            with self._impressions_lock:
                impression_id = self._impressions.get(request_id)
        tensors = {  # a batch dimension of 1, as for the ranker (Triton batches concurrent requests)
            "request_id": np.array([[request_id]], dtype=np.object_),
            "item_fids": np.asarray(item_fids, dtype=np.uint64).reshape(1, -1),
            "labels": np.asarray(labels, dtype=np.float32).reshape(1, -1),
        }
        if impression_id is not None:
            tensors["impression_id"] = np.array([[impression_id]], dtype=np.object_)
        if event_time_s is not None:
            tensors["event_time"] = np.array([[event_time_s]], dtype=np.float64)
        return int(self.infer("feedback", tensors, ["accepted"])["accepted"][0, 0])

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RankerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
