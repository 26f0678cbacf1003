"""``monolith-rt bench scale``: how the embedding table's costs grow with its size (the cost curve).

For each size N (rows of dim D, FIDs all distinct), on the table the ranker
serves from (by default the shared table in /dev/shm that every ranker
instance of a host maps; ``shared=False``: one instance's private
EmbeddingTable), one step after another in one process:

    insert_mkeys_per_s      N new FIDs upserted in batches of B into a table presized for N (no growth)
    lookup_mkeys_per_s      ``lookups`` present FIDs in random order, batches of B, best of 3 passes
    resident_bytes_per_row  the table's resident bytes / N: shared, the blocks its files hold in
                            /dev/shm (allocated up front); private, what this process's RSS grew by
                            while the table was created and filled
    growth                  the table at N rows is filled to its load bound and doubles once, copying
                            every row into a new generation (``growth_rows_copied``), while
                            * readers keep looking up B/4 present FIDs every ms: a thread in this
                              process and, for the shared table, a process of its own (another
                              instance: it maps the new generation itself). reader_stall_max_ms: the
                              longest lookup call that overlapped the growth or the 0.3 s after it
                              (reader_quiet_max_ms: the longest before it, the machine's noise);
                              reader_stall_by_reader: each reader's longest call with the CPU time
                              and page faults it took (see server.table.read_probe)
                            * the delta applier (updater.applier.DeltaApplier.apply, the serving
                              path) applies a decoded sparse record of R rows every 5 ms, half
                              overwrites, half new FIDs; one of them makes the table grow.
                              apply_stall_max_ms: the longest apply; growth_copy_ms: that apply less
                              the median apply, i.e. the copy of one generation (also per million
                              rows copied); apply_other_max_ms: the longest of all the other applies
    snapshot_write_s        server.streams.snapshots.write_snapshot of the grown table (rows, dense
                            weights, fsynced, renamed); ``snapshot_rows`` rows
    snapshot_load_s         load_snapshot of it into a private table until it answers a lookup, its
                            files first dropped from the page cache (posix_fadvise), as on a host
                            that did not write it
    recovery_s              recovery to ready, in process: a new ranker runtime on the data directory
                            (RankerRuntime, or SharedRankerRuntime creating the host's shared table:
                            what a restarted server's first instance does before Triton calls it
                            ready) loads the newest snapshot, builds its serving table, opens its
                            feature log and scores a warm-up request; until it answers a lookup.
                            Deltas after the snapshot are not replayed (none were written).

Per size also each cost per row (lookup_ns_per_key, insert_ns_per_key, growth_copy_ms_per_mrow,
snapshot_write_s_per_mrow, snapshot_load_s_per_mrow, recovery_s_per_mrow, resident_bytes_per_row),
and per_row_cost_ratio: each one's largest over its smallest across the sizes measured (flat: near 1).
fresh_memory_s_per_gb (once, before the first size): seconds per GB to fault in a table generation
from memory the process never touched, the floor under the growth's copy and the snapshot load.

Before each size, the memory it needs at its peak is estimated (the growth
holds both generations; a load holds the file's arrays and the new table; the
shared recovery a private table and the shared one) against MemAvailable; a
size or a recovery that does not fit is skipped, saying so. Kernels are
compiled by a run at a tiny size first. Every figure comes from one run on a
machine that may be busy: the load average at the start and the end is in
the result.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from server.benchmarks import progress
from server.dense import initial_dense_state
from server.features import FeatureSchema
from server.procs import memory_available_bytes, rss_bytes
from server.runtime.ranker import RankerRuntime
from server.runtime.shared_ranker import SharedRankerRuntime
from server.streams.deltas import DeltaRecord
from server.streams.snapshots import load_snapshot, write_snapshot
from server.table import EmbeddingTable, SharedEmbeddingTable, SharedMemoryFull
from server.table.cuckoo import SLOTS
from server.table.local import TableArrays, pow2_at_least
from server.table.read_probe import ReadProbe
from server.table.shared import SHM_ROOT
from updater.applier import DeltaApplier

_WARM_ROWS = 1 << 15
_FRESH_BUCKETS = 1 << 19  # 4M slots, 335 MB at dim 16
_ROUNDS = 3
_FID_STEP = np.uint64(0x9E3779B97F4A7C15)  # odd: i -> i * step mod 2**63 is a bijection, so FIDs never repeat
_FID_MASK = np.uint64((1 << 63) - 1)
_POOL_BATCHES = 64
_LOAD_BOUND = 0.98  # EmbeddingTable's default max_load_factor
_LOAD_PRESIZE = 0.9  # EmbeddingTable.load sizes its table for count / 0.9
_HEADROOM_BYTES = 1 << 30
_READER_INTERVAL_S = 0.001
_APPLY_INTERVAL_S = 0.005
_QUIET_S = 0.2
_SETTLE_S = 0.3
_LEAD_RECORDS = 40
_MAX_RECORDS = 100_000


def _progress(message: str) -> None:
    progress("bench scale", message)


def _fids(start: int, stop: int) -> np.ndarray:
    """FIDs number start..stop-1 of the bench: distinct 63-bit values spread over the key space."""
    return (np.arange(start + 1, stop + 1, dtype=np.uint64) * _FID_STEP) & _FID_MASK


def _slots(capacity: int) -> int:
    """Slots of an EmbeddingTable created with ``capacity`` (its rounding)."""
    return max(2, pow2_at_least(-(-int(capacity) // SLOTS))) * SLOTS


def _load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@dataclasses.dataclass
class _Serving:
    """What DeltaApplier drives: the table and the seq it reflects (schema: for dense records, none here)."""

    table: EmbeddingTable
    schema: FeatureSchema
    delta_seq: int = 0


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    """Args:
        dim: row length D.
        batch: FIDs per insert and per timed lookup call B.
        shared: the shared table (ranker instances' default) or a private EmbeddingTable.
        record_rows: rows per delta record R during the growth.
        lookups: FIDs looked up per timed pass.
        seed: random seed.
    """

    dim: int = 16
    batch: int = 4096
    shared: bool = True
    record_rows: int = 4096
    lookups: int = 1 << 21
    seed: int = 0

    def __post_init__(self):
        for name in ("dim", "batch", "record_rows", "lookups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} requires >= 1, got {getattr(self, name)}")
        if self.record_rows < 2:
            raise ValueError(f"record_rows requires >= 2 (half overwrites, half new FIDs), got {self.record_rows}")

    @property
    def slot_bytes(self) -> int:
        return 8 + 4 * self.dim + 8  # key, row, stamp

    @property
    def reader_batch(self) -> int:
        return max(1, self.batch // 4)


def bench_scale(schema: FeatureSchema, rows: list[int], config: ScaleConfig = ScaleConfig(),
                work_dir: str | None = None) -> dict:
    """Runs the cost curve over the sizes ``rows`` (see the module docstring); returns its figures."""
    if not rows or min(rows) < 2 * config.batch:
        raise ValueError(f"rows requires sizes >= 2 * batch = {2 * config.batch}, got {rows}")
    schema = dataclasses.replace(schema, slots=tuple(dataclasses.replace(s, dim=config.dim) for s in schema.slots))
    result = {"table": "shared" if config.shared else "private", "dim": config.dim, "batch": config.batch,
              "reader_batch": config.reader_batch, "reader_interval_ms": _READER_INTERVAL_S * 1e3,
              "record_rows": config.record_rows, "apply_interval_ms": _APPLY_INTERVAL_S * 1e3,
              "lookups": config.lookups, "cores": os.cpu_count(), "load_avg_start": _load_avg()}
    work = Path(tempfile.mkdtemp(prefix="monolith-bench-scale-", dir=work_dir))
    shm = Path(tempfile.mkdtemp(prefix="monolith-bench-scale-", dir=SHM_ROOT)) if config.shared else None
    try:
        sizes, warmed = [], False
        for n in rows:
            reason = _no_room_for(_bytes_needed(n, config))
            if reason is not None:
                sizes.append({"rows": n, "skipped": reason})
                _progress(f"{n:,} rows: skipped, {reason}")
                continue
            if not warmed:
                result["fresh_memory_s_per_gb"] = _fresh_memory_s_per_gb(config)
                _progress(f"compiling kernels and starting up (a run at {_WARM_ROWS:,} rows)")
                _measure_size(schema, _WARM_ROWS, config, work / "warm", shm, warm=True)
                warmed = True
            started = time.perf_counter()
            try:
                sizes.append(_measure_size(schema, n, config, work / str(n), shm))
            except SharedMemoryFull as exc:
                sizes.append({"rows": n, "skipped": str(exc)})
            _progress(f"{n:,} rows: done in {time.perf_counter() - started:.1f} s")
        result["rows"] = sizes
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)
    result["load_avg_end"] = _load_avg()
    result["per_row_cost_ratio"] = _cost_ratios([s for s in result["rows"] if "skipped" not in s])
    return result


def _no_room_for(needed: int) -> str | None:
    """Why ``needed`` bytes (plus headroom) do not fit in MemAvailable, or None if they do."""
    available = memory_available_bytes()
    if needed + _HEADROOM_BYTES <= available:
        return None
    return f"needs ~{needed / 1e9:.1f} GB (+{_HEADROOM_BYTES / 1e9:.1f} GB headroom), {available / 1e9:.1f} GB available"


def _fresh_memory_s_per_gb(config: ScaleConfig) -> float:
    """Seconds per GB to allocate a private table generation (anonymous memory, faulted in on huge pages)
    from memory this process never touched: the floor under a growth's copy and a snapshot load. On a VM
    that hands freed memory back to its host (free page reporting) every such first touch is a fault
    the host serves too."""
    t0 = time.perf_counter()
    arrays = TableArrays.anonymous(_FRESH_BUCKETS, config.dim, _LOAD_BOUND, 1)
    elapsed = time.perf_counter() - t0
    nbytes = arrays.keys.nbytes + arrays.rows.nbytes + arrays.stamps.nbytes
    return round(elapsed / (nbytes / 1e9), 3)


def _bytes_needed(n: int, config: ScaleConfig) -> int:
    """Peak bytes of the size's growth and snapshot load (the larger): both generations during the
    doubling; the snapshot's arrays plus the table EmbeddingTable.load makes for them."""
    built = _slots(n / _LOAD_BOUND + 1)
    snapshot_rows = int(built * _LOAD_BOUND) + (1 << 18)
    growth = 3 * built * config.slot_bytes
    load = snapshot_rows * config.slot_bytes + _slots(snapshot_rows / _LOAD_PRESIZE + SLOTS) * config.slot_bytes
    return max(growth, load) + 8 * n + (64 << 20)


def _recovery_bytes_needed(snapshot_rows: int, config: ScaleConfig) -> int:
    """Peak bytes of a recovery: the snapshot's arrays and a private table; for the shared table, then
    that private table and the shared one it is copied into."""
    table = _slots(snapshot_rows / _LOAD_PRESIZE + SLOTS) * config.slot_bytes
    return max(snapshot_rows * config.slot_bytes + table, 2 * table if config.shared else 0)


def _new_table(config: ScaleConfig, capacity: int, shm: Path | None):
    if not config.shared:
        return EmbeddingTable(config.dim, capacity=capacity)
    table = SharedEmbeddingTable.create(shm / "table", config.dim, capacity=capacity)
    table.mark_ready()
    return table


def _measure_size(schema: FeatureSchema, n: int, config: ScaleConfig, work: Path, shm: Path | None,
                  warm: bool = False) -> dict:
    """One size's figures; ``warm``: a run that only compiles and loads what the timed ones use (the
    growth with a reader thread and no waits)."""
    rng = np.random.default_rng(config.seed)
    batch = config.batch
    _progress(f"{n:,} rows: generating FIDs, a pool of rows and the lookup order")
    fids = _fids(0, n)
    pool = rng.standard_normal((batch * _POOL_BATCHES, config.dim), dtype=np.float32) * 0.1
    picks = rng.integers(0, n, config.lookups)
    queries = fids[picks]

    _progress(f"{n:,} rows: insert into a table presized for them")
    rss_before = rss_bytes(os.getpid())
    table = _new_table(config, int(n / _LOAD_BOUND) + 1, shm)
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        at = start % pool.shape[0]
        table.upsert(fids[start:start + batch], pool[at:at + min(batch, n - start)], now=1.0)
    insert_s = time.perf_counter() - t0
    table_bytes = _directory_bytes(table.directory) if config.shared else rss_bytes(os.getpid()) - rss_before
    if table.growths or len(table) != n:
        raise RuntimeError(f"bench scale: presized table grew {table.growths} times, holds {len(table)} of {n} rows")
    result = {"rows": n, "table_slots": table.capacity, "insert_mkeys_per_s": round(n / insert_s / 1e6, 2)}

    _progress(f"{n:,} rows: {config.lookups:,} lookups in random order, best of {_ROUNDS}")
    out = np.empty((batch, config.dim), dtype=np.float32)
    lookup_s = float("inf")
    for _ in range(_ROUNDS):
        t0 = time.perf_counter()
        for start in range(0, config.lookups, batch):
            stop = min(config.lookups, start + batch)
            table.lookup(queries[start:stop], out=out[:stop - start])
        lookup_s = min(lookup_s, time.perf_counter() - t0)
    check = min(batch, config.lookups)
    if not np.array_equal(table.lookup(queries[:check]), pool[picks[:check] % pool.shape[0]]):
        raise AssertionError("bench scale: table lookup returned wrong rows")
    result["lookup_mkeys_per_s"] = round(config.lookups / lookup_s / 1e6, 2)
    result["resident_bytes_per_row"] = round(table_bytes / n, 1)

    result.update(_grow_under_load(schema, table, fids, queries, pool, config, rng, warm))
    del fids

    _progress(f"{n:,} rows: snapshot write ({len(table):,} rows)")
    data_dir = work / "data"
    dense_state = initial_dense_state(schema.num_fields, schema.dim, schema.dense)
    t0 = time.perf_counter()
    path = write_snapshot(data_dir, table, dense_state, result["snapshot_delta_seq"])
    result["snapshot_write_s"] = round(time.perf_counter() - t0, 3)
    snapshot_rows = len(table)
    result["snapshot_rows"] = snapshot_rows
    result["snapshot_bytes"] = _directory_bytes(path)
    if config.shared:
        table.close()
        SharedEmbeddingTable.remove(table.directory)
    del table
    gc.collect()

    _progress(f"{n:,} rows: snapshot load, cold")
    sample = queries[:check]
    _drop_page_cache(path)
    t0 = time.perf_counter()
    snapshot = load_snapshot(path)
    _, found = snapshot.table.lookup_found(sample)
    result["snapshot_load_s"] = round(time.perf_counter() - t0, 3)
    if not found.all() or len(snapshot.table) != snapshot_rows:
        raise AssertionError(f"bench scale: the loaded snapshot holds {len(snapshot.table)} rows, "
                             f"wrote {snapshot_rows}, or misses looked-up FIDs")
    del snapshot
    gc.collect()

    result.update(_recover(schema, data_dir, sample, snapshot_rows, config, shm))
    result.update(_per_row(result))
    shutil.rmtree(work, ignore_errors=True)
    return result


def _grow_under_load(schema, table, fids, queries, pool, config: ScaleConfig, rng, warm: bool) -> dict:
    """Fills ``table`` to its load bound, then applies delta records while readers read, until one
    apply has doubled the table and _SETTLE_S more have passed. Returns the growth's figures."""
    quiet_s, settle_s, interval_s = (0.0, 0.0, 0.0) if warm else (_QUIET_S, _SETTLE_S, _APPLY_INTERVAL_S)
    n = fids.shape[0]
    new_per_record = config.record_rows // 2
    max_count = int(table.capacity * table.max_load_factor)
    next_new = n
    fill = max(0, max_count - len(table) - _LEAD_RECORDS * new_per_record)
    _progress(f"{n:,} rows: filling {fill:,} more rows, to {_LEAD_RECORDS} records short of the load bound")
    for start in range(next_new, next_new + fill, config.batch):
        stop = min(next_new + fill, start + config.batch)
        at = start % (pool.shape[0] - config.batch)
        table.upsert(_fids(start, stop), pool[at:at + stop - start], now=1.0)
    next_new += fill

    _progress(f"{n:,} rows: growth under reads and applies (readers: {config.reader_batch} FIDs/ms)")
    sample = queries[: max(config.reader_batch, min(queries.shape[0], 1 << 16))]
    probes = {"thread": ReadProbe.thread(table, sample, config.reader_batch, _READER_INTERVAL_S)}
    try:
        if config.shared and not warm:
            probes["process"] = ReadProbe.process(table.directory, sample, config.reader_batch, _READER_INTERVAL_S)
        time.sleep(quiet_s)
        serving = _Serving(table, schema)
        applier = DeltaApplier(serving, None)
        applies, grew, copied = [], None, 0
        next_at = time.perf_counter()
        for seq in range(1, _MAX_RECORDS + 1):
            record = _record(seq, fids, next_new, new_per_record, config.record_rows - new_per_record, pool, rng)
            next_new += new_per_record
            growths, count = table.growths, len(table)
            began = time.perf_counter()
            reason = applier.apply(record)
            took = time.perf_counter() - began
            if reason is not None:
                raise RuntimeError(f"bench scale: delta record refused: {reason}")
            if table.growths != growths:
                grew, copied = len(applies), count
            applies.append((began, took))
            if grew is not None and began > applies[grew][0] + applies[grew][1] + settle_s:
                break
            next_at = max(next_at + interval_s, time.perf_counter())
            time.sleep(max(0.0, next_at - time.perf_counter()))
        else:
            raise RuntimeError(f"bench scale: {_MAX_RECORDS} records did not make the table grow")
    finally:
        timings = {name: probe.stop() for name, probe in probes.items()}
    applies = np.array(applies)
    growth_start, growth_s = (float(x) for x in applies[grew])
    window = (growth_start, growth_start + growth_s + settle_s)
    others = np.delete(applies[:, 1], grew)
    copy_ms = (growth_s - float(np.median(others))) * 1e3
    during = {name: _longest(t, window) for name, t in timings.items()}
    quiet = [_longest(t, (0.0, growth_start), whole=True) for t in timings.values()]
    return {
        "reader_stall_max_ms": max(d["ms"] for d in during.values()),
        "reader_stall_by_reader": during,
        "reader_quiet_max_ms": max(q["ms"] for q in quiet),
        "reader_p50_ms": round(float(np.median(np.concatenate([t[:, 1] for t in timings.values()]))) * 1e3, 3),
        "reader_calls_during_growth": {name: int(_overlapping(t, (growth_start, growth_start + growth_s)).sum())
                                       for name, t in timings.items()},
        "apply_stall_max_ms": round(float(applies[:, 1].max()) * 1e3, 2),
        "apply_other_max_ms": round(float(others.max()) * 1e3, 2),
        "apply_p50_ms": round(float(np.median(others)) * 1e3, 3),
        "growth_copy_ms": round(copy_ms, 1),
        "growth_rows_copied": copied,
        "growth_copy_ms_per_mrow": round(copy_ms / (copied / 1e6), 1),
        "growths": table.growths,
        "records_applied": len(applies),
        "snapshot_delta_seq": serving.delta_seq,
    }


def _record(seq: int, fids: np.ndarray, first_new: int, new: int, overwrites: int, pool, rng) -> DeltaRecord:
    """A sparse record as the applier gets it from a stream (decoded: read-only arrays): ``overwrites``
    rows of FIDs the table holds, then ``new`` new FIDs."""
    keys = np.concatenate([fids[rng.integers(0, fids.shape[0], overwrites)], _fids(first_new, first_new + new)])
    values = pool[rng.integers(0, pool.shape[0], keys.shape[0])]
    return DeltaRecord.decode(DeltaRecord.sparse(seq, time.time(), keys, values).encode())


def _overlapping(timings: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    return (timings[:, 0] < window[1]) & (timings[:, 0] + timings[:, 1] > window[0])


def _longest(timings: np.ndarray, window: tuple[float, float], whole: bool = False) -> dict:
    """The longest lookup call overlapping ``window`` (``whole``: inside it): its wall ms, and the CPU ms
    and minor page faults of the reader in it (ms 0 if there was no call)."""
    inside = (timings[:, 0] >= window[0]) & (timings[:, 0] + timings[:, 1] <= window[1]) if whole \
        else _overlapping(timings, window)
    if not inside.any():
        return {"ms": 0.0, "cpu_ms": 0.0, "minor_faults": 0}
    _, wall_s, cpu_s, faults = timings[inside][int(np.argmax(timings[inside, 1]))].tolist()
    return {"ms": round(wall_s * 1e3, 3), "cpu_ms": round(cpu_s * 1e3, 3), "minor_faults": int(faults)}


def _recover(schema, data_dir: Path, sample: np.ndarray, snapshot_rows: int, config: ScaleConfig,
             shm: Path | None) -> dict:
    """Recovery to ready (see the module docstring), or why it was skipped."""
    reason = _no_room_for(_recovery_bytes_needed(snapshot_rows, config))
    if reason is not None:
        _progress(f"recovery skipped: {reason}")
        return {"recovery_s": None, "recovery_skipped": reason, "recovered_resident_bytes_per_row": None}
    _progress("recovery to ready, cold")
    for path in (data_dir / "snapshots").iterdir():
        _drop_page_cache(path)
    rss_before = rss_bytes(os.getpid())
    t0 = time.perf_counter()
    if config.shared:
        runtime = SharedRankerRuntime(schema, data_dir, "bench-scale", server_pid=os.getpid(), shm_root=shm)
    else:
        runtime = RankerRuntime(schema, data_dir, "bench-scale")
    _, found = runtime.table.lookup_found(sample)
    recovery_s = time.perf_counter() - t0
    try:
        if not found.all() or len(runtime.table) != snapshot_rows:
            raise AssertionError(f"bench scale: the recovered table holds {len(runtime.table)} rows, "
                                 f"wrote {snapshot_rows}, or misses looked-up FIDs")
        table_bytes = _directory_bytes(runtime.table.directory) if config.shared \
            else rss_bytes(os.getpid()) - rss_before
        slots = runtime.table.capacity
    finally:
        runtime.close(snapshot=False)
    return {"recovery_s": round(recovery_s, 3), "recovered_table_slots": slots,
            "recovered_resident_bytes_per_row": round(table_bytes / snapshot_rows, 1)}


def _per_row(result: dict) -> dict:
    """Each size's costs per row (what must stay flat across sizes)."""
    mrows = result["snapshot_rows"] / 1e6
    recovery = result["recovery_s"]
    return {
        "lookup_ns_per_key": round(1e3 / result["lookup_mkeys_per_s"], 1),
        "insert_ns_per_key": round(1e3 / result["insert_mkeys_per_s"], 1),
        "snapshot_write_s_per_mrow": round(result["snapshot_write_s"] / mrows, 3),
        "snapshot_load_s_per_mrow": round(result["snapshot_load_s"] / mrows, 3),
        "recovery_s_per_mrow": None if recovery is None else round(recovery / mrows, 3),
    }


_PER_ROW = ("lookup_ns_per_key", "insert_ns_per_key", "growth_copy_ms_per_mrow", "snapshot_write_s_per_mrow",
            "snapshot_load_s_per_mrow", "recovery_s_per_mrow", "resident_bytes_per_row")


def _cost_ratios(sizes: list[dict]) -> dict:
    """Per per-row cost: its largest value over its smallest across the sizes measured (flat: near 1)."""
    ratios = {}
    for name in _PER_ROW:
        values = [s[name] for s in sizes if s.get(name)]
        if len(values) > 1:
            ratios[name] = round(max(values) / min(values), 2)
    return ratios


def _directory_bytes(directory: Path) -> int:
    """Bytes the files in ``directory`` hold (allocated blocks, not their lengths)."""
    return sum(p.stat().st_blocks * 512 for p in Path(directory).iterdir() if p.is_file())


def _drop_page_cache(directory: Path) -> None:
    """Drops the (clean) pages of the files in ``directory`` from the page cache."""
    for path in Path(directory).iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


_COLUMNS = (("lookup M/s", "lookup_mkeys_per_s"), ("insert M/s", "insert_mkeys_per_s"),
            ("reader stall ms", "reader_stall_max_ms"), ("reader quiet ms", "reader_quiet_max_ms"),
            ("apply stall ms", "apply_stall_max_ms"), ("copy ms/Mrow", "growth_copy_ms_per_mrow"),
            ("snap write s", "snapshot_write_s"), ("snap load s", "snapshot_load_s"), ("recovery s", "recovery_s"),
            ("bytes/row", "resident_bytes_per_row"))


def format_scale_report(result: dict) -> str:
    lines = [f"embedding table cost curve: {result['table']} table, dim {result['dim']}, batch {result['batch']}; "
             f"{result['cores']} cores, load average {result['load_avg_start']} -> {result['load_avg_end']}, "
             f"fresh memory {result.get('fresh_memory_s_per_gb', '-')} s/GB",
             f"{'rows':>12} " + " ".join(f"{title:>15}" for title, _ in _COLUMNS)]
    for size in result["rows"]:
        if "skipped" in size:
            lines.append(f"{size['rows']:>12,} skipped: {size['skipped']}")
            continue
        lines.append(f"{size['rows']:>12,} " + " ".join(
            f"{'-' if size[key] is None else size[key]:>15}" for _, key in _COLUMNS))
    ratios = ", ".join(f"{name} {ratio}" for name, ratio in result["per_row_cost_ratio"].items())
    lines.append(f"per-row costs, largest / smallest across sizes: {ratios or '-'}")
    return "\n".join(lines)
