"""Triton adapter for feedback intake: validate, append durably, acknowledge."""

import numpy as np
import triton_python_backend_utils as pb_utils

from server import triton_adapter as triton
from server.feedback import FeedbackRuntime, parse_feedback_request
from server.ranker import RequestError, now_s

INPUTS = ("request_id", "item_fids", "labels", "event_time")
METRICS_INTERVAL_S = 1.0


class TritonPythonModel:
    def initialize(self, args):
        triton.route_logging()
        params = triton.model_parameters(args)
        self.runtime = FeedbackRuntime(triton.data_dir(params), args["model_instance_name"])
        labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
        self.m_written = triton.Counter("monolith_feedback_log_written_total", "Feedback log records written", **labels)
        self.m_rejected = triton.Counter("monolith_feedback_rejected_total", "Feedback requests refused", **labels)
        self._metrics = triton.MetricsThread(self._update_metrics, METRICS_INTERVAL_S,
                                             metrics=(self.m_written, self.m_rejected))
        self._parent_watch = triton.ParentWatch(self.runtime.close)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                record = parse_feedback_request(triton.inputs(request, INPUTS), now_s())
            except RequestError as exc:
                self.runtime.rejected += 1
                responses.append(triton.error_response(f"feedback: {exc}"))
                continue
            try:
                durable = self.runtime.append(record)
            except Exception as exc:  # disk failure: refuse, never pretend
                responses.append(triton.error_response(f"feedback: log append failed: {exc!r}", internal=True))
                continue
            if not durable:
                responses.append(triton.error_response("feedback: log writer overloaded, retry", internal=True))
                continue
            accepted = pb_utils.Tensor("accepted", np.array([record.item_fids.shape[0]], dtype=np.int64))
            responses.append(pb_utils.InferenceResponse(output_tensors=[accepted]))
        return responses

    def _update_metrics(self):
        self.m_written.update(self.runtime.log.written)
        self.m_rejected.update(self.runtime.rejected)

    def finalize(self):
        self._parent_watch.stop()
        self._metrics.stop()
        self.runtime.close()
