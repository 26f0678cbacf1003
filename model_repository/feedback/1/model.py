"""Triton adapter for feedback intake: validate, append durably (one fsync per batch), acknowledge."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from server.runtime import triton_adapter as triton
from server.clock import TimeWindow
from server.features import load_schema
from server.runtime.feedback import FeedbackRuntime, parse_feedback_request
from server.runtime.requests import RequestError, now_s

INPUTS = ("request_id", "impression_id", "item_fids", "labels", "event_time")
METRICS_INTERVAL_S = 1.0


class TritonPythonModel:
    def initialize(self, args):
        triton.route_logging()
        params = triton.model_parameters(args)
        # max_batch_size > 0 (shipped): Triton batches concurrent requests, each with a batch dim of 1.
        self.batched = json.loads(args["model_config"]).get("max_batch_size", 0) > 0
        try:
            self.time_window = TimeWindow.from_settings(params)  # a client's event_time is refused outside it
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"feedback: {exc}") from exc
        # The ranker's schema (one source of truth) declares the labels feedback may carry.
        schema_path = Path(args["model_repository"]) / params.get("feature_schema", "../ranker/feature_schema.json")
        try:
            schema = load_schema(schema_path)
        except (OSError, ValueError) as exc:
            raise pb_utils.TritonModelException(f"feedback: {exc}") from exc
        self.label_range = (schema.label_min, schema.label_max)
        self.runtime = FeedbackRuntime(triton.data_dir(params), args["model_instance_name"])
        labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
        self.m_written = triton.Counter("monolith_feedback_log_written_total", "Feedback log records written", **labels)
        self.m_rejected = triton.Counter("monolith_feedback_rejected_total", "Feedback requests refused", **labels)
        self._metrics = triton.MetricsThread(self._update_metrics, METRICS_INTERVAL_S,
                                             metrics=(self.m_written, self.m_rejected))
        self._parent_watch = triton.ParentWatch(self.runtime.close)

    def execute(self, requests):
        responses = [None] * len(requests)
        parsed = []
        for i, request in enumerate(requests):
            try:
                parsed.append((i, parse_feedback_request(triton.inputs(request, INPUTS, self.batched), now_s(),
                                                         window=self.time_window, label_range=self.label_range)))
            except (RequestError, ValueError) as exc:
                self.runtime.rejected += 1
                responses[i] = triton.error_response(f"feedback: {exc}")
        try:
            outcomes = self.runtime.append_all([record for _, record in parsed])
        except Exception as exc:  # disk failure: refuse, never pretend
            outcomes = [exc] * len(parsed)
        for (i, record), durable in zip(parsed, outcomes):
            if isinstance(durable, Exception):
                responses[i] = triton.error_response(f"feedback: log append failed: {durable!r}", internal=True)
            elif not durable:
                responses[i] = triton.error_response("feedback: log writer overloaded, retry", internal=True)
            else:
                accepted = np.array([[record.item_fids.shape[0]]] if self.batched else [record.item_fids.shape[0]],
                                    dtype=np.int64)
                responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("accepted", accepted)])
        return responses

    def _update_metrics(self):
        self.m_written.update(self.runtime.log.written)
        self.m_rejected.update(self.runtime.rejected)

    def finalize(self):
        self._parent_watch.stop()
        self._metrics.stop()
        self.runtime.close()
