"""The feedback model's runtime: validates user actions and appends them durably.

An action names the impression it answers (impression_id, as the ranker
returned it; request_id is the client's correlation field), the candidate's
item FID and a label (a click = 1.0, a watch fraction...) within the feature
schema's "labels" range, [0, 1] unless it declares a narrower one. One request may
carry M actions of one ranking request. The response is sent only after the
feedback log has the record durably (fsynced on the local bus; acknowledged
by JetStream on a NATS bus, see server.streams.jetstream for what that
guarantees), so an acknowledged action is never lost. Group commit: Triton batches concurrent feedback requests (dynamic
batching, ragged inputs), the model queues all of a batch's records and
waits once, and one fsync covers them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from server.features import EMPTY_KEY, PAD_FID
from server.clock import TimeWindow
from server.runtime.requests import (DEFAULT_WINDOW, RequestError, expect_tensor, parse_impression_id, parse_request_id,
                                     parse_time)
from server.streams.records import FeedbackRecord
from server.streams import FEEDBACK, BackgroundAppender, open_streams, segment_bytes_from_env

MAX_ACTIONS = 1024
FEEDBACK_LOG_QUEUE = 10_000


def parse_feedback_request(inputs: Mapping[str, np.ndarray | None], now_s: float, *,
                           window: TimeWindow = DEFAULT_WINDOW,
                           label_range: tuple[float, float] = (0.0, 1.0)) -> FeedbackRecord:
    """One feedback request; an ``event_time`` outside ``window`` around ``now_s`` (the server's receive
    time) is refused (server.clock)."""
    request_id = parse_request_id(inputs.get("request_id"))
    impression_id = parse_impression_id(inputs.get("impression_id"))
    items = expect_tensor("item_fids", inputs.get("item_fids"), np.uint64, 1)
    labels = expect_tensor("labels", inputs.get("labels"), np.float32, 1)
    if not 1 <= items.shape[0] <= MAX_ACTIONS:
        raise RequestError(f"input 'item_fids' requires 1 to {MAX_ACTIONS} actions, got {items.shape[0]}")
    if labels.shape != items.shape:
        raise RequestError(f"input 'labels' requires one label per item FID ({items.shape[0]}), got {labels.shape[0]}")
    if np.any((items == EMPTY_KEY) | (items == PAD_FID)):
        raise RequestError("input 'item_fids' holds a reserved value (0 or 2**64-1)")
    if not np.all(np.isfinite(labels)):
        raise RequestError("input 'labels' requires finite values")
    low, high = label_range
    outside = (labels < low) | (labels > high)
    if np.any(outside):
        raise RequestError(f"input 'labels' requires values in [{low:g}, {high:g}] (the feature schema's "
                           f"\"labels\"), got {float(labels[outside][0]):g}")
    event_time = parse_time("event_time", inputs.get("event_time"), now_s, window)
    return FeedbackRecord(request_id, event_time, now_s, items.copy(), labels.copy(), impression_id)


class FeedbackRuntime:
    def __init__(self, data_dir: str | Path, instance: str):
        self.streams = open_streams(data_dir)  # the bus: local files or JetStream
        writer = self.streams.open_writer(FEEDBACK, instance, fsync="batch", segment_bytes=segment_bytes_from_env())
        self.log = BackgroundAppender(writer, max_queue=FEEDBACK_LOG_QUEUE, name=f"feedback-log-{instance}")
        self.rejected = 0

    def append(self, record: FeedbackRecord, timeout_s: float = 5.0) -> bool:
        """True once the record is durable; False if the log stayed full for timeout_s."""
        return self.log.submit(record.encode(), wait=True, timeout_s=timeout_s)

    def append_all(self, records: list[FeedbackRecord], timeout_s: float = 5.0) -> list[bool | Exception]:
        """Every record queued, then one wait until all are durable: concurrent
        requests that Triton batched share one fsync. Per record: True
        (durable), False (log stayed full for timeout_s) or the write error."""
        return self.log.submit_all([r.encode() for r in records], timeout_s=timeout_s)

    def close(self) -> None:
        self.log.close()
        self.streams.close()
