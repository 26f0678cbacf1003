"""The ranker's runtime: request validation, embedding lookup, pooling, scoring, feature log.

``model_repository/ranker/1/model.py`` adapts Triton to this module and does
little else, so everything here runs (and is tested) without Triton too.

One execute() call may carry several requests: their FIDs go through one
table lookup and their candidates through one forward pass.

Shapes: R requests, N candidates of one request, T candidates of all, F
fields (= slots), K embedding dim, Wu / Wi request-layout widths (see
server.features).

Concurrency: ``score`` runs on Triton's execute thread. The table's lookups
are lock-free against its one writer, the updater thread (updater.applier)
that tails the delta stream (<data_dir>/deltas, or JetStream: server.streams.open_streams); the dense module is replaced by one reference
assignment, and ``score`` reads ``self.dense`` once per call, so a batch
never mixes two dense versions.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numba
import numpy as np
import torch

from server.dense import build_dense
from server.dense_numpy import NumpyDeepFM
from server.features import PAD_FID, SIGNATURE_BITS, FeatureSchema, Slot, slot_of
from server.streams import FEATURES, BackgroundAppender, open_streams, segment_bytes_from_env
from server.streams.records import FeatureRecord
from server.snapshot import list_snapshots, load_latest_snapshot, write_snapshot
from server.table import EMPTY_KEY, EmbeddingTable

log = logging.getLogger(__name__)

MAX_CANDIDATES = 4096
MAX_REQUEST_ID_BYTES = 256
FEATURE_LOG_QUEUE = 10_000
FEATURE_LOG_SUBMIT_TIMEOUT_S = 0.05
FEATURE_LOG_LINGER_S = 0.02  # one append run + fsync per 20 ms under load, not per batch
EMPTY_KEY_U64 = np.uint64(EMPTY_KEY)
SHIFT_U64 = np.uint64(SIGNATURE_BITS)
PAD_U64 = np.uint64(PAD_FID)


class RequestError(ValueError):
    """A request the ranker refuses; the message names the input and the fault."""


@dataclass
class RankRequest:
    request_id: bytes
    request_time_s: float
    user_fids: np.ndarray  # uint64[Wu]
    item_fids: np.ndarray  # uint64[N, Wi]


def _expect(name: str, value: np.ndarray | None, dtype, ndim: int) -> np.ndarray:
    if value is None:
        raise RequestError(f"input '{name}' is required but missing")
    if value.dtype != dtype:
        raise RequestError(f"input '{name}' requires dtype {np.dtype(dtype).name}, got {value.dtype}")
    if value.ndim != ndim:
        raise RequestError(f"input '{name}' requires rank {ndim}, got shape {list(value.shape)}")
    return value


@functools.lru_cache(maxsize=16)
def _column_slots(slots: tuple[Slot, ...]) -> np.ndarray:
    """Slot id of each request-layout column (computed once per schema side)."""
    columns = np.concatenate([np.full(s.max_values, s.slot, dtype=np.int64) for s in slots])
    columns.flags.writeable = False
    return columns


@numba.njit(cache=True, nogil=True)
def _first_bad_fid(fids, column_slots):
    """Flat index of the first FID that is EMPTY_KEY or of another slot than its column, else -1.
    (The slot is the FID's top bits: server.features.slot_of, copied here for speed.)"""
    flat = fids.reshape(-1)
    width = column_slots.shape[0]
    for i in range(flat.shape[0]):
        fid = flat[i]
        if fid == EMPTY_KEY_U64:
            return i
        if fid != PAD_U64 and np.int64(fid >> SHIFT_U64) != column_slots[i % width]:
            return i
    return -1


def _check_fids(name: str, fids: np.ndarray, column_slots: np.ndarray) -> None:
    if _first_bad_fid(np.ascontiguousarray(fids), column_slots) < 0:
        return
    if np.any(fids == EMPTY_KEY):
        where = np.argwhere(fids == EMPTY_KEY)[0].tolist()
        raise RequestError(f"input '{name}' holds the reserved value 2**64-1 at {where}")
    wrong = (fids != PAD_FID) & (slot_of(fids) != column_slots)
    where = tuple(np.argwhere(wrong)[0].tolist())
    raise RequestError(
        f"input '{name}' at {list(where)} holds a FID of slot {int(slot_of(fids[where]))}, "
        f"but that column is slot {int(column_slots[where[-1]])} (see the feature schema layout)"
    )


def parse_rank_request(inputs: Mapping[str, np.ndarray | None], schema: FeatureSchema, now_s: float) -> RankRequest:
    """Validates one request's tensors (name -> array, None if absent)."""
    user = _expect("user_fids", inputs.get("user_fids"), np.uint64, 1)
    if user.shape[0] != schema.user_width:
        raise RequestError(f"input 'user_fids' requires {schema.user_width} FIDs (user and context slots "
                           f"in schema order), got {user.shape[0]}")
    items = _expect("item_fids", inputs.get("item_fids"), np.uint64, 2)
    n, width = items.shape
    if width != schema.item_width:
        raise RequestError(f"input 'item_fids' requires {schema.item_width} columns per candidate, got {width}")
    if not 1 <= n <= MAX_CANDIDATES:
        raise RequestError(f"input 'item_fids' requires 1 to {MAX_CANDIDATES} candidates, got {n}")
    _check_fids("user_fids", user, _column_slots(schema.user_slots))
    _check_fids("item_fids", items, _column_slots(schema.item_slots))
    request_id = parse_request_id(inputs.get("request_id"))
    request_time = parse_time("timestamp", inputs.get("timestamp"), now_s)
    return RankRequest(request_id, request_time, user, items)


def parse_request_id(value: np.ndarray | None) -> bytes:
    value = _expect("request_id", value, np.object_, 1)
    if value.shape[0] != 1:
        raise RequestError(f"input 'request_id' requires shape [1], got {list(value.shape)}")
    rid = value[0]
    if isinstance(rid, str):
        rid = rid.encode()
    if not isinstance(rid, bytes) or not 1 <= len(rid) <= MAX_REQUEST_ID_BYTES:
        size = len(rid) if isinstance(rid, bytes) else type(rid).__name__
        raise RequestError(f"input 'request_id' requires 1 to {MAX_REQUEST_ID_BYTES} bytes, got {size}")
    return rid


def parse_time(name: str, value: np.ndarray | None, default_s: float) -> float:
    """An optional FP64 [1] time in Unix seconds."""
    if value is None:
        return default_s
    value = _expect(name, value, np.float64, 1)
    if value.shape[0] != 1:
        raise RequestError(f"input '{name}' requires shape [1], got {list(value.shape)}")
    t = float(value[0])
    if not math.isfinite(t) or t <= 0:
        raise RequestError(f"input '{name}' requires a finite time > 0 (Unix seconds), got {t}")
    return t


@numba.njit(cache=True, nogil=True)
def _pool_kernel(rows, fids, starts, widths, mean, out):
    """out[r, f] = sum (or mean) of rows[r, starts[f] : starts[f] + widths[f]]
    over columns whose FID is not PAD_FID; zeros when a slot has none."""
    n_rows, n_fields, dim = out.shape
    for r in range(n_rows):
        for f in range(n_fields):
            for k in range(dim):
                out[r, f, k] = 0.0
            present = 0
            for c in range(starts[f], starts[f] + widths[f]):
                if fids[r, c] != PAD_FID:
                    present += 1
                    for k in range(dim):
                        out[r, f, k] += rows[r, c, k]
            if mean[f] and present > 1:
                for k in range(dim):
                    out[r, f, k] /= present


class _Pooling:
    """Sums or averages each slot's columns: rows [R, W, K] -> fields [R, F_side, K]."""

    def __init__(self, slots: Sequence[Slot]):
        self.widths = np.array([s.max_values for s in slots], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.widths)[:-1]]).astype(np.int64)
        self.mean = np.array([s.pooling == "mean" for s in slots])

    def __call__(self, rows: np.ndarray, fids: np.ndarray) -> np.ndarray:
        out = np.empty((rows.shape[0], self.widths.shape[0], rows.shape[2]), dtype=np.float32)
        _pool_kernel(rows, fids, self.starts, self.widths, self.mean, out)
        return out


class RankerRuntime:
    """Table + dense network + feature log of one ranker instance."""

    def __init__(self, schema: FeatureSchema, data_dir: str | Path, instance: str, apply_deltas: bool = True):
        self.schema = schema
        self.data_dir = Path(data_dir)
        self._user_pool = _Pooling(schema.user_slots)
        self._item_pool = _Pooling(schema.item_slots)
        self.streams = open_streams(self.data_dir)  # the bus: local files or JetStream
        self._fetch_snapshot()
        self._load_state()
        writer = self.streams.open_writer(FEATURES, instance, fsync="batch", segment_bytes=segment_bytes_from_env())
        self.feature_log = BackgroundAppender(writer, max_queue=FEATURE_LOG_QUEUE, name=f"feature-log-{instance}",
                                              linger_s=FEATURE_LOG_LINGER_S)
        self.rejected: Counter[str] = Counter()
        self.updater = None
        if apply_deltas:
            self.updater = self._make_updater()
            self._start_updater()

    def _load_state(self) -> None:
        """Sets table, dense, delta_seq, _snapshot_seq and startup_message
        from the newest snapshot (or empty)."""
        schema = self.schema
        dense = build_dense(schema.num_fields, schema.dim, schema.dense)
        snapshot = load_latest_snapshot(self.data_dir)
        if snapshot is None:
            self.table = EmbeddingTable(schema.dim)
            self.delta_seq = 0
            self._snapshot_seq = 0
            self.startup_message = (f"no snapshot in {self.data_dir / 'snapshots'}: starting with an empty table "
                                    f"and dense weights initialised from seed {schema.dense.get('seed', 0)}")
        else:
            if snapshot.table.dim != schema.dim:
                raise ValueError(f"snapshot {snapshot.path} has dim {snapshot.table.dim}, schema requires {schema.dim}")
            dense.load_state_dict(snapshot.dense_state)
            self.table = snapshot.table
            self.delta_seq = snapshot.delta_seq
            self._snapshot_seq = snapshot.delta_seq
            self.startup_message = (f"loaded snapshot {snapshot.path}: {len(self.table)} rows, "
                                    f"delta_seq {self.delta_seq}")
        self.dense = dense

    def _fetch_snapshot(self) -> None:
        """A newer snapshot from the bus into the data directory, if there is one (a replica that
        starts, or fell behind the delta stream's retention); a failure is logged, not fatal."""
        try:
            self.streams.fetch_snapshot()
        except Exception as exc:
            log.error("fetching the newest snapshot from the bus failed: %r", exc)

    def _newest_snapshot(self):
        self._fetch_snapshot()
        return load_latest_snapshot(self.data_dir)

    def _make_updater(self):
        from updater.applier import DeltaApplier

        return DeltaApplier(self, self.streams.open_delta_reader, load_snapshot=self._newest_snapshot)

    def _start_updater(self) -> None:
        self.updater.catch_up()  # before Triton calls us ready
        self.updater.start()

    def _serving_state(self):
        """(delta_seq, dense) for one batch, read once."""
        return self.delta_seq, self.dense

    def score(self, requests: Sequence[RankRequest]) -> tuple[list[np.ndarray], int]:
        """Probabilities for each request's candidates, and the delta_seq they saw."""
        seq, dense = self._serving_state()
        counts = np.array([r.item_fids.shape[0] for r in requests])
        user = np.stack([r.user_fids for r in requests])  # [R, Wu]
        items = np.concatenate([r.item_fids for r in requests])  # [T, Wi]
        rows = self.table.lookup(np.concatenate([user.ravel(), items.ravel()]))
        k = self.schema.dim
        split = user.size
        user_fields = self._user_pool(rows[:split].reshape(*user.shape, k), user)  # [R, Fu, K]
        item_fields = self._item_pool(rows[split:].reshape(*items.shape, k), items)  # [T, Fi, K]
        fields = np.concatenate([np.repeat(user_fields, counts, axis=0), item_fields], axis=1)
        probs = self._forward(dense)(fields)
        ends = np.cumsum(counts).tolist()
        return [probs[a:b] for a, b in zip([0] + ends[:-1], ends)], seq

    def _forward(self, dense):
        """The numpy forward of ``dense`` (built once per dense version, on the execute thread);
        a module that is not a DeepFM runs in torch."""
        if dense is not getattr(self, "_forward_of", None):
            try:
                forward = NumpyDeepFM(dense)
            except TypeError:
                def forward(fields, module=dense):
                    with torch.inference_mode():
                        return torch.sigmoid(module(torch.from_numpy(fields))).numpy()
            self._forward_fn, self._forward_of = forward, dense
        return self._forward_fn

    def log_scored(self, request: RankRequest, scores: np.ndarray, seq: int) -> bool:
        """Queues the request's feature record; False (and counted as shed) if
        the log writer stays full past a short timeout."""
        record = FeatureRecord(request.request_id, request.request_time_s, seq,
                               request.user_fids, request.item_fids, scores)
        return self.feature_log.submit(record.encode(), timeout_s=FEATURE_LOG_SUBMIT_TIMEOUT_S)

    def close(self, snapshot: bool = True) -> Path | None:
        """Stops the updater and the feature log; with ``snapshot``, saves the
        serving state if deltas moved it past the snapshot it started from
        (a restart then replays fewer deltas). Returns the snapshot written."""
        if self.updater is not None:
            self.updater.stop()
        self.feature_log.close()
        self.streams.close()
        if snapshot and self.delta_seq > self._snapshot_seq and not any(
            p.name == f"{self.delta_seq:020d}" for p in list_snapshots(self.data_dir)
        ):
            path = write_snapshot(self.data_dir, self.table, self.dense.state_dict(), self.delta_seq)
            log.info("wrote serving snapshot %s at delta_seq %d", path, self.delta_seq)
            return path
        return None


def now_s() -> float:
    return time.time()
