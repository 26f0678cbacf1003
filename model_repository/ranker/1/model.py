"""Triton adapter for the ranker: tensors in, server.runtime.ranker, tensors out."""

import gc
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from server.runtime import triton_adapter as triton
from server.clock import TimeWindow
from server.features import load_schema
from server.runtime.ranker import RankerRuntime, limit_compute_threads, parse_rank_request, row_dtype_from_settings
from server.runtime.requests import RequestError, new_impression_ids, now_s
from server.runtime.shared_ranker import SharedRankerRuntime
from updater.applier import DeltaApplier

INPUTS = ("user_fids", "item_fids", "request_id", "timestamp")
METRICS_INTERVAL_S = 1.0


class TritonPythonModel:
    def initialize(self, args):
        triton.route_logging()
        params = triton.model_parameters(args)
        # With max_batch_size > 0 (the shipped config: dynamic batching, ragged
        # inputs) each request carries a leading batch dim of 1; Triton hands
        # execute() every queued request at once. 0 also works: no batch dim.
        self.batched = json.loads(args["model_config"]).get("max_batch_size", 0) > 0
        try:
            limit_compute_threads(params.get("compute_threads", "1"))
            self.time_window = TimeWindow.from_settings(params)  # a client's timestamp is refused outside it
            row_dtype = row_dtype_from_settings(params)
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"ranker: {exc}") from exc
        schema_path = Path(args["model_repository"]) / params.get("feature_schema", "feature_schema.json")
        try:
            schema = load_schema(schema_path)
        except (OSError, ValueError) as exc:
            raise pb_utils.TritonModelException(f"ranker: {exc}") from exc
        shared = params.get("shared_table", "true")
        if shared not in ("true", "false"):
            raise pb_utils.TritonModelException(
                f"ranker: parameter shared_table requires 'true' or 'false', got {shared!r}")
        runtime_class = SharedRankerRuntime if shared == "true" else RankerRuntime
        self.runtime = runtime_class(schema, triton.data_dir(params), args["model_instance_name"],
                                     make_applier=DeltaApplier.following, row_dtype=row_dtype)
        pb_utils.Logger.log_info(f"ranker {args['model_instance_name']}: {self.runtime.startup_message}; "
                                 f"request path warmed up in {self.runtime.warm_up_s:.2f} s")
        labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
        self.m_rows = triton.Gauge("monolith_table_rows", "Rows in the embedding table", table="embeddings", **labels)
        self.m_table_bytes = triton.Gauge("monolith_table_bytes", "Bytes of the embedding table's arrays, free slots "
                                          "included (shared by the instances of a shared table)", table="embeddings",
                                          row_dtype=self.runtime.table.row_dtype, **labels)
        self.m_seq = triton.Gauge("monolith_delta_seq", "Delta sequence number the ranker serves at", **labels)
        self.m_log_written = triton.Counter("monolith_feature_log_written_total", "Feature log records written", **labels)
        self.m_log_queued = triton.Gauge("monolith_feature_log_queued", "Feature log records waiting", **labels)
        self.m_log_shed = triton.Counter("monolith_feature_log_shed_total", "Feature log records shed", **labels)
        self.scored = 0
        self.m_scored = triton.Counter("monolith_requests_scored_total", "Requests this instance scored", **labels)
        self.m_rejected = triton.Counter("monolith_requests_rejected_total", "Requests refused by validation", **labels)
        self.m_lag = triton.Gauge("monolith_delta_apply_lag_seconds",
                                  "Seconds from the last applied delta's creation to its application", **labels)
        self.m_rows_applied = triton.Counter("monolith_delta_rows_applied_total", "Embedding rows applied", **labels)
        self.m_rejected_deltas = triton.Counter("monolith_delta_records_rejected_total",
                                                "Delta records refused (the updater halts)", **labels)
        self.m_halted = triton.Gauge("monolith_delta_updater_halted", "1 if the updater stopped applying", **labels)
        self.m_halts = triton.Counter("monolith_delta_updater_halts_total", "Updater halts (each retried)", **labels)
        self.m_reloads = triton.Counter("monolith_delta_snapshot_reloads_total",
                                        "Snapshots the updater loaded to get past a halt", **labels)
        replica = {**labels, "replica": self.runtime.streams.replica}
        self.m_bus_lag = triton.Gauge("monolith_bus_lag_records", "Delta records behind the stream head", **replica)
        self.m_bus_lag_s = triton.Gauge("monolith_bus_lag_seconds",
                                        "Seconds the oldest unapplied delta record has waited (0: caught up)", **replica)
        self.m_bus_reconnects = triton.Counter("monolith_bus_reconnects_total", "Reconnections to the bus", **replica)
        self._metrics = triton.MetricsThread(self._update_metrics, METRICS_INTERVAL_S, metrics=(
            self.m_rows, self.m_table_bytes, self.m_seq, self.m_scored, self.m_log_written, self.m_log_queued,
            self.m_log_shed, self.m_rejected, self.m_lag, self.m_rows_applied, self.m_rejected_deltas, self.m_halted, self.m_halts,
            self.m_reloads, self.m_bus_lag, self.m_bus_lag_s, self.m_bus_reconnects))
        self._parent_watch = triton.ParentWatch(lambda: self.runtime.close(snapshot=False))
        # The long-lived objects of numba, numpy and the runtime never die: keep them out of the
        # collector's full passes, which would otherwise stall whichever request triggers one.
        gc.freeze()

    def execute(self, requests):
        now = now_s()
        responses = [None] * len(requests)
        parsed = []
        for i, request in enumerate(requests):
            try:
                tensors = triton.inputs(request, INPUTS, self.batched)
                parsed.append((i, parse_rank_request(tensors, self.runtime.schema, now, self.time_window)))
            except (RequestError, ValueError) as exc:
                self.runtime.rejected["invalid"] += 1
                responses[i] = triton.error_response(f"ranker: {exc}")
        if parsed:
            try:
                scores, seq = self.runtime.score([r for _, r in parsed])
            except Exception as exc:  # a bug must not take the server down
                pb_utils.Logger.log_error(f"ranker: scoring failed: {exc!r}")
                for i, _ in parsed:
                    responses[i] = triton.error_response(f"ranker: internal error: {exc!r}", internal=True)
            else:
                self.scored += len(parsed)
                seq_array = np.array([seq], dtype=np.int64)
                seq_tensor = pb_utils.Tensor("delta_seq", seq_array[None] if self.batched else seq_array)
                for (i, request), s, iid in zip(parsed, scores, new_impression_ids(len(parsed))):
                    self.runtime.log_scored(request, s, seq, iid)
                    iid_array = np.array([[iid]] if self.batched else [iid], dtype=np.object_)
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor("scores", s[None] if self.batched else s), seq_tensor,
                        pb_utils.Tensor("impression_id", iid_array)])
        return responses

    def _update_metrics(self):
        runtime = self.runtime
        self.m_rows.set(len(runtime.table))
        self.m_table_bytes.set(runtime.table.nbytes)
        self.m_seq.set(runtime.delta_seq)
        self.m_log_written.update(runtime.feature_log.written)
        self.m_log_queued.set(runtime.feature_log.queued)
        self.m_log_shed.update(runtime.feature_log.shed)
        self.m_rejected.update(sum(runtime.rejected.values()))
        self.m_scored.update(self.scored)
        updater = runtime.updater
        self.m_lag.set(updater.lag_s)
        self.m_rows_applied.update(updater.rows_applied)
        self.m_rejected_deltas.update(updater.records_rejected)
        self.m_halted.set(1 if updater.halted else 0)
        self.m_halts.update(updater.halts)
        self.m_reloads.update(updater.snapshot_reloads)
        self.m_bus_reconnects.update(runtime.streams.reconnects)
        try:
            lag = runtime.streams.delta_lag(runtime.delta_seq)
        except Exception as exc:  # the bus unreachable for now: keep the last figures
            pb_utils.Logger.log_warn(f"ranker: bus lag unknown: {exc!r}")
            lag = None
        if lag is not None:
            self.m_bus_lag.set(lag[0])
            self.m_bus_lag_s.set(lag[1])

    def finalize(self):
        self._parent_watch.stop()
        self._metrics.stop()
        self.runtime.close()
