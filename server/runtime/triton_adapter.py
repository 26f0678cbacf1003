"""Glue between Triton's Python backend and this package (imported by model.py only).

``triton_python_backend_utils`` exists only inside the backend's stub
process, so nothing else in ``server/`` imports this module.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import triton_python_backend_utils as pb_utils


def model_parameters(args: dict) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def data_dir(params: dict[str, str]) -> Path:
    """The data directory: $MONOLITH_DATA_DIR (set by `monolith-rt serve`), else
    the model's "data_dir" parameter. Never derived from a request."""
    value = os.environ.get("MONOLITH_DATA_DIR") or params.get("data_dir")
    if not value:
        raise pb_utils.TritonModelException(
            "requires a data directory: set MONOLITH_DATA_DIR in tritonserver's environment "
            "(monolith-rt serve --data-dir does) or the model parameter 'data_dir'"
        )
    path = Path(value)
    path.mkdir(parents=True, exist_ok=True)
    return path


def inputs(request, names, batched: bool = False) -> dict:
    """name -> numpy array, or None where the request lacks that input. With
    ``batched`` (a config with max_batch_size > 0 and ragged batching), each
    request carries a leading batch dimension of 1, removed here."""
    given = {tensor.name(): tensor for tensor in request.inputs()}  # one pass, not one per name
    out = {}
    for name in names:
        tensor = given.get(name)
        value = None if tensor is None else tensor.as_numpy()
        if batched and value is not None:
            if value.ndim == 0 or value.shape[0] != 1:
                raise ValueError(f"input '{name}' requires a batch dimension of 1 per request, "
                                 f"got shape {list(value.shape)}")
            value = value[0]
        out[name] = value
    return out


def error_response(message: str, internal: bool = False):
    code = pb_utils.TritonError.INTERNAL if internal else pb_utils.TritonError.INVALID_ARG
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class Gauge:
    """A Prometheus gauge; keeps its MetricFamily alive as long as the metric
    (Triton refuses to set a metric whose family was garbage-collected)."""

    def __init__(self, name: str, description: str, **labels):
        self._family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.GAUGE)
        self._metric = self._family.Metric(labels=labels)

    def set(self, value: float) -> None:
        self._metric.set(value)

    def close(self) -> None:
        """Drops the metric, then its family: the order Triton requires (the
        reverse, as interpreter teardown may do it, crashes the stub)."""
        self._metric = None
        self._family = None


class Counter:
    """A Prometheus counter that follows a running total kept elsewhere."""

    def __init__(self, name: str, description: str, **labels):
        self._family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.COUNTER)
        self._metric = self._family.Metric(labels=labels)
        self._reported = 0

    def update(self, total: int) -> None:
        if total > self._reported:
            self._metric.increment(total - self._reported)
            self._reported = total

    close = Gauge.close


class TritonLogHandler(logging.Handler):
    """Routes this package's `logging` records into Triton's log."""

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        if record.levelno >= logging.ERROR:
            pb_utils.Logger.log_error(message)
        elif record.levelno >= logging.WARNING:
            pb_utils.Logger.log_warn(message)
        else:
            pb_utils.Logger.log_info(message)


def route_logging() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, TritonLogHandler) for h in root.handlers):
        handler = TritonLogHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


class MetricsThread:
    """Calls ``update`` every ``interval_s`` on a daemon thread. Each metric
    update is a round trip to the Triton process (~0.1 ms), so metrics are
    refreshed on a clock, off the request path, and stay current when idle.
    ``stop`` ends the thread and closes ``metrics`` in the required order."""

    def __init__(self, update, interval_s: float, metrics=()):
        self._metrics = list(metrics)
        self._update = update
        self._interval_s = interval_s
        self._stop = threading.Event()
        update()
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._update()
            except Exception as exc:  # a metrics hiccup must not end the thread
                pb_utils.Logger.log_warn(f"metrics update failed: {exc!r}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._interval_s + 1.0)
        for metric in self._metrics:
            metric.close()


class ParentWatch:
    """Ends this stub process when its tritonserver is gone.

    A stub whose server died can hang in Triton's shutdown path (finalize
    waits on the dead server) and ignore SIGTERM, keeping its memory, its
    threads and its log directory's writer lock. This daemon thread checks
    every ``interval_s`` whether the parent changed (re-parented: the server
    exited); if so it runs ``cleanup`` (e.g. flush logs) for at most
    ``cleanup_timeout_s`` and exits the process with os._exit."""

    def __init__(self, cleanup, interval_s: float = 0.5, cleanup_timeout_s: float = 2.0):
        self._parent = os.getppid()
        self._cleanup, self._interval_s, self._cleanup_timeout_s = cleanup, interval_s, cleanup_timeout_s
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="parent-watch", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            if os.getppid() != self._parent:
                logging.getLogger(__name__).error("tritonserver (pid %d) is gone: this stub exits", self._parent)
                cleanup = threading.Thread(target=self._cleanup, daemon=True)
                cleanup.start()
                cleanup.join(self._cleanup_timeout_s)
                os._exit(0)

    def stop(self) -> None:
        self._stop.set()
