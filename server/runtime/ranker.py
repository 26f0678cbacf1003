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
that tails the delta stream (<data_dir>/deltas, or JetStream: server.streams.open_streams); the dense
weights (a dense state of numpy arrays, server.dense) are replaced by one
reference assignment, and ``score`` reads ``self.dense`` once per call, so a
batch never mixes two dense versions. Nothing on this path imports torch.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numba
import numpy as np
import threadpoolctl

from server.clock import TimeWindow
from server.dense import fit_dense_state, initial_dense_state
from server.features import PAD_FID, SIGNATURE_BITS, FeatureSchema, slot_of
from server.runtime.scoring import DeepFMScorer
from server.streams import FEATURES, BackgroundAppender, open_streams, segment_bytes_from_env
from server.streams.records import FeatureRecord
from server.runtime.requests import DEFAULT_WINDOW, RequestError, expect_tensor, now_s, parse_request_id, parse_time
from server.streams.snapshots import list_snapshots, load_latest_snapshot, write_snapshot
from server.table import EMPTY_KEY, EmbeddingTable
from server.table.quantize import ROW_DTYPES, storage_layout

log = logging.getLogger(__name__)

MAX_CANDIDATES = 4096
FEATURE_LOG_QUEUE = 10_000
FEATURE_LOG_SUBMIT_TIMEOUT_S = 0.05
FEATURE_LOG_LINGER_S = 0.02  # one append run + fsync per 20 ms under load, not per batch
ROW_DTYPE_ENV = "MONOLITH_ROW_DTYPE"  # monolith-rt serve --row-dtype; else the model parameter row_dtype
EMPTY_KEY_U64 = np.uint64(EMPTY_KEY)
SHIFT_U64 = np.uint64(SIGNATURE_BITS)
PAD_U64 = np.uint64(PAD_FID)



@dataclass
class RankRequest:
    request_id: bytes
    request_time_s: float
    user_fids: np.ndarray  # uint64[Wu]
    item_fids: np.ndarray  # uint64[N, Wi]


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


@numba.njit(cache=True, nogil=True)
def _lookup_keys(user, items, out):
    """out = [user FIDs, item FIDs] flattened, with padding as EMPTY_KEY: the table
    does not probe it, and pooling skips padded columns whatever their rows."""
    at = 0
    for r in range(user.shape[0]):
        for c in range(user.shape[1]):
            fid = user[r, c]
            out[at] = EMPTY_KEY_U64 if fid == PAD_U64 else fid
            at += 1
    for t in range(items.shape[0]):
        for c in range(items.shape[1]):
            fid = items[t, c]
            out[at] = EMPTY_KEY_U64 if fid == PAD_U64 else fid
            at += 1


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


def parse_rank_request(inputs: Mapping[str, np.ndarray | None], schema: FeatureSchema, now_s: float,
                       window: TimeWindow = DEFAULT_WINDOW) -> RankRequest:
    """Validates one request's tensors (name -> array, None if absent); ``now_s`` is the server's receive
    time, and a client's ``timestamp`` outside ``window`` around it is refused (server.clock)."""
    user = expect_tensor("user_fids", inputs.get("user_fids"), np.uint64, 1)
    if user.shape[0] != schema.user_width:
        raise RequestError(f"input 'user_fids' requires {schema.user_width} FIDs (user and context slots "
                           f"in schema order), got {user.shape[0]}")
    items = expect_tensor("item_fids", inputs.get("item_fids"), np.uint64, 2)
    n, width = items.shape
    if width != schema.item_width:
        raise RequestError(f"input 'item_fids' requires {schema.item_width} columns per candidate, got {width}")
    if not 1 <= n <= MAX_CANDIDATES:
        raise RequestError(f"input 'item_fids' requires 1 to {MAX_CANDIDATES} candidates, got {n}")
    _check_fids("user_fids", user, schema.user_column_slots)
    _check_fids("item_fids", items, schema.item_column_slots)
    request_id = parse_request_id(inputs.get("request_id"))
    request_time = parse_time("timestamp", inputs.get("timestamp"), now_s, window)
    return RankRequest(request_id, request_time, user, items)


class RankerRuntime:
    """Table + dense network + feature log of one ranker instance."""

    def __init__(self, schema: FeatureSchema, data_dir: str | Path, instance: str,
                 make_applier: Callable[["RankerRuntime"], object] | None = None, row_dtype: str = "fp32"):
        """``make_applier``: runtime -> what applies the delta stream to it (updater.applier.DeltaApplier.following,
        wired by the model adapter); None serves the snapshot alone (tests, benchmarks). ``row_dtype``: how the
        table stores rows (fp32, fp16, int8: server.table.quantize); snapshots and deltas are converted to it."""
        storage_layout(schema.dim, row_dtype)  # ValueError naming the choices
        self.row_dtype = row_dtype
        self.schema = schema
        self.data_dir = Path(data_dir)
        self.streams = open_streams(self.data_dir)  # the bus: local files or JetStream
        self._fetch_snapshot()
        self._load_state()
        writer = self.streams.open_writer(FEATURES, instance, fsync="batch", segment_bytes=segment_bytes_from_env())
        self.feature_log = BackgroundAppender(writer, max_queue=FEATURE_LOG_QUEUE, name=f"feature-log-{instance}",
                                              linger_s=FEATURE_LOG_LINGER_S)
        self.rejected: Counter[str] = Counter()
        self._scorer_of = None
        self.warm_up_s = self._warm_up()
        self.updater = None
        if make_applier is not None:
            self.updater = make_applier(self)
            self._start_updater()

    def _load_state(self) -> None:
        """Sets table, dense, delta_seq, _snapshot_seq and startup_message
        from the newest snapshot (or empty)."""
        schema = self.schema
        snapshot = load_latest_snapshot(self.data_dir, self.row_dtype)
        if snapshot is None:
            dense = initial_dense_state(schema.num_fields, schema.dim, schema.dense)
            self.table = EmbeddingTable(schema.dim, row_dtype=self.row_dtype)
            self.delta_seq = 0
            self._snapshot_seq = 0
            self.startup_message = (f"no snapshot in {self.data_dir / 'snapshots'}: starting with an empty table "
                                    f"and dense weights initialised from seed {schema.dense.get('seed', 0)}")
        else:
            if snapshot.table.dim != schema.dim:
                raise ValueError(f"snapshot {snapshot.path} has dim {snapshot.table.dim}, schema requires {schema.dim}")
            dense = fit_dense_state(snapshot.dense_state, schema.num_fields, schema.dim, schema.dense)
            self.table = snapshot.table
            self.delta_seq = snapshot.delta_seq
            self._snapshot_seq = snapshot.delta_seq
            self.startup_message = (f"loaded snapshot {snapshot.path}: {len(self.table)} rows "
                                    f"({self.row_dtype}), delta_seq {self.delta_seq}")
        self.dense = dense

    def _fetch_snapshot(self) -> None:
        """A newer snapshot from the bus into the data directory, if there is one (a replica that
        starts, or fell behind the delta stream's retention); a failure is logged, not fatal."""
        try:
            self.streams.fetch_snapshot()
        except Exception as exc:
            log.error("fetching the newest snapshot from the bus failed: %r", exc)

    def newest_snapshot(self):
        """The newest snapshot, fetched from the bus first where there is one (the applier heals from it)."""
        self._fetch_snapshot()
        return load_latest_snapshot(self.data_dir, self.row_dtype)

    def _start_updater(self) -> None:
        self.updater.catch_up()  # before Triton calls us ready
        self.updater.start()

    def _serving_state(self):
        """(delta_seq, dense) for one batch, read once."""
        return self.delta_seq, self.dense

    def score(self, requests: Sequence[RankRequest]) -> tuple[list[np.ndarray], int]:
        """Probabilities (float32) for each request's candidates, and the delta_seq they saw."""
        seq, dense = self._serving_state()
        scorer = self._scorer(dense)
        if len(requests) == 1:  # the common case: no copies
            user, items = requests[0].user_fids[None], requests[0].item_fids
            counts = np.array([items.shape[0]], dtype=np.int64)
        else:
            user = np.stack([r.user_fids for r in requests])  # [R, Wu]
            items = np.concatenate([r.item_fids for r in requests])  # [T, Wi]
            counts = np.array([r.item_fids.shape[0] for r in requests], dtype=np.int64)
        fids = np.empty(user.size + items.size, dtype=np.uint64)
        _lookup_keys(user, items, fids)
        rows = self.table.lookup(fids)
        split = user.size
        probs = scorer(rows[:split], user, rows[split:], items, counts)
        if len(requests) == 1:
            return [probs], seq
        ends = np.cumsum(counts).tolist()
        return [probs[a:b] for a, b in zip([0] + ends[:-1], ends)], seq

    def _warm_up(self) -> float:
        """Parses and scores a synthetic request (not logged) so that every numba
        kernel of the request path is compiled, or loaded from its cache, before
        Triton calls this instance ready: not on the first caller's time (a few
        seconds on a fresh install). Returns the seconds it took."""
        started = time.perf_counter()
        schema = self.schema
        user = (schema.user_column_slots.astype(np.uint64) << SHIFT_U64) | np.uint64(1)
        items = np.repeat(((schema.item_column_slots.astype(np.uint64) << SHIFT_U64) | np.uint64(1))[None], 2, axis=0)
        items[:, -1] = PAD_U64
        tensors = {"user_fids": user, "item_fids": items, "request_id": np.array([b"warm-up"], dtype=np.object_)}
        request = parse_rank_request(tensors, schema, now_s())
        self.score([request])
        self.score([request, request])
        return time.perf_counter() - started

    def _scorer(self, dense) -> DeepFMScorer:
        """The serving forward of the dense state ``dense``, built once per dense version, on the execute
        thread."""
        if dense is not self._scorer_of:
            self._scorer_fn, self._scorer_of = DeepFMScorer(dense, self.schema), dense
        return self._scorer_fn

    def log_scored(self, request: RankRequest, scores: np.ndarray, seq: int, impression_id: bytes) -> bool:
        """Queues the request's feature record under the ``impression_id`` its response
        carries; False (and counted as shed) if the log writer stays full past a short timeout."""
        record = FeatureRecord(request.request_id, request.request_time_s, seq,
                               request.user_fids, request.item_fids, scores, impression_id)
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
            path = write_snapshot(self.data_dir, self.table, self.dense, self.delta_seq)
            log.info("wrote serving snapshot %s at delta_seq %d", path, self.delta_seq)
            return path
        return None


def row_dtype_from_settings(params: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> str:
    """The serving table's row type: ``serve --row-dtype`` (the environment), else the model parameter
    ``row_dtype``, else fp32. Raises ValueError naming the choices."""
    value = environ.get(ROW_DTYPE_ENV) or params.get("row_dtype") or "fp32"
    if value not in ROW_DTYPES:
        raise ValueError(f"parameter row_dtype requires one of {', '.join(ROW_DTYPES)} "
                         f"(monolith-rt serve --row-dtype), got {value!r}")
    return value


def limit_compute_threads(value: str) -> int:
    """Sets the thread pool of BLAS (numpy's matmuls) in this process to
    ``value`` threads (the model parameter "compute_threads").

    1 is right for serving: a request's matrices are small (100 x 48 @ 48 x 64),
    OpenBLAS splits products past 2^18 multiply-adds over its threads, and on a
    busy host those threads wait for cores that Triton, the fronts and the other
    instances hold (`monolith-rt bench scoring --busy-cores 2` times the
    scorer both ways). Instances, not threads, use more cores."""
    threads = int(value) if value.isdigit() else 0
    if threads < 1:
        raise ValueError(f"parameter compute_threads requires an integer >= 1, got {value!r}")
    threadpoolctl.threadpool_limits(threads, user_api="blas")
    return threads
