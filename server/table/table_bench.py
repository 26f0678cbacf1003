"""``monolith-rt bench table``: throughput of the embedding table against a dict.

Every figure is measured in the same run as its baseline, since these
machines are noisy: ratios hold, absolute times drift. Inputs are generated
before any timer starts and every kernel is compiled by a warm-up first.

Figures (one thread):
    insert_mkeys_per_s   N new keys upserted in batches of B into a table
                         sized for N up front (no growth)
    build_mkeys_per_s    the same, starting from the default capacity, so it
                         includes every doubling
    max_load_factor      load at which a fixed-size table first failed to
                         place a key (no load bound set): cuckoo's real limit
    lookup_mkeys_per_s   present keys in random order, batches of B
    dict_mkeys_per_s     the same lookups through a Python dict of
                         FID -> row index plus a numpy row fetch
"""

from __future__ import annotations

import time

import numpy as np

from server.benchmarks import progress
from server.table import EmbeddingTable

_DICT_MAX_LOOKUPS = 1_000_000
_ROUNDS = 3


def _progress(message: str) -> None:
    progress("bench table", message)


def _timed_batches(fn, n: int, batch: int) -> float:
    """Calls fn(start, stop) over [0, n) in batches; returns seconds."""
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        fn(start, min(n, start + batch))
    return time.perf_counter() - t0


def bench_table(keys: int, dim: int, batch: int, seed: int = 0) -> dict:
    """Runs the table benchmark and returns its figures (see module docstring)."""
    if keys < batch or batch < 1 or dim < 1:
        raise ValueError(f"requires keys >= batch >= 1 and dim >= 1, got keys={keys} batch={batch} dim={dim}")
    rng = np.random.default_rng(seed)
    _progress(f"generating {keys:,} random 63-bit FIDs and rows (dim {dim})")
    fids = np.unique(rng.integers(0, 2**63 - 1, keys, dtype=np.int64)).view(np.uint64)
    rng.shuffle(fids)
    n = fids.shape[0]
    rows = rng.standard_normal((n, dim), dtype=np.float32)
    queries = fids[rng.permutation(n)]

    _progress("compiling kernels (warm-up)")
    warm = EmbeddingTable(dim, capacity=64)
    warm.upsert(fids[:1000], rows[:1000], now=0.0)
    warm.lookup(fids[:1000])
    del warm

    _progress("insert into a presized table")
    table = EmbeddingTable(dim, capacity=int(n / 0.98) + 1)
    insert_s = _timed_batches(lambda a, b: table.upsert(fids[a:b], rows[a:b], now=1.0), n, batch)
    del table

    _progress("insert from the default capacity (with growth)")
    table = EmbeddingTable(dim)
    build_s = _timed_batches(lambda a, b: table.upsert(fids[a:b], rows[a:b], now=1.0), n, batch)
    assert len(table) == n, (len(table), n)

    _progress(f"lookups of present keys in random order, against a numpy gather of as many random rows "
              f"(best of {_ROUNDS}, interleaved)")
    out = np.empty((batch, dim), dtype=np.float32)
    table.lookup(queries[:batch], out=out)
    positions = rng.integers(0, n, n)
    np.take(rows, positions[:batch], axis=0, out=out)
    lookup_s = gather_s = float("inf")
    for _ in range(_ROUNDS):
        lookup_s = min(lookup_s, _timed_batches(lambda a, b: table.lookup(queries[a:b], out=out[: b - a]), n, batch))
        gather_s = min(gather_s, _timed_batches(
            lambda a, b: np.take(rows, positions[a:b], axis=0, out=out[: b - a]), n, batch))
    check = table.lookup(queries[:batch])
    order = np.argsort(fids)
    expected = rows[order[np.searchsorted(fids[order], queries[:batch])]]
    if not np.array_equal(check, expected):
        raise AssertionError("table lookup returned wrong rows")

    _progress("the same lookups through a Python dict")
    index = {fid: i for i, fid in enumerate(fids.tolist())}
    dict_n = min(n, _DICT_MAX_LOOKUPS)

    def dict_lookup(a: int, b: int) -> None:
        positions = np.fromiter(map(index.__getitem__, queries[a:b].tolist()), dtype=np.int64, count=b - a)
        out[: b - a] = rows[positions]

    dict_s = _timed_batches(dict_lookup, dict_n, batch)
    index.clear()  # free it before the next stage

    _progress("fill a fixed-size table until the first insert fails")
    limit_capacity = 1 << max(4, (int(n * 0.9)).bit_length() - 1)
    fixed = EmbeddingTable(dim, capacity=limit_capacity, max_load_factor=1.0)
    start = 0
    while fixed.growths == 0 and start < n:
        fixed.upsert(fids[start : start + batch], rows[start : start + batch], now=1.0)
        start += batch

    lookup_rate = n / lookup_s / 1e6
    gather_rate = n / gather_s / 1e6
    dict_rate = dict_n / dict_s / 1e6
    return {
        "keys": n,
        "dim": dim,
        "batch": batch,
        "lookup_mkeys_per_s": round(lookup_rate, 2),
        "dict_mkeys_per_s": round(dict_rate, 3),
        "lookup_speedup_vs_dict": round(lookup_rate / dict_rate, 1),
        "gather_mrows_per_s": round(gather_rate, 2),
        "lookup_vs_gather": round(lookup_rate / gather_rate, 3),
        "insert_mkeys_per_s": round(n / insert_s / 1e6, 2),
        "build_mkeys_per_s": round(n / build_s / 1e6, 2),
        "build_growths": table.growths,
        "max_load_factor": round(fixed.first_growth_load_factor or fixed.load_factor, 4),
        "max_load_factor_table_slots": limit_capacity,
        "load_factor_bound": table.max_load_factor,
        "final_load_factor": round(table.load_factor, 4),
        "dict_lookups": dict_n,
    }


def format_table_report(result: dict) -> str:
    return "\n".join(
        [
            f"embedding table: {result['keys']:,} keys, dim {result['dim']}, batch {result['batch']}, one thread",
            f"  lookup  {result['lookup_mkeys_per_s']:8.2f} M keys/s   "
            f"(dict + numpy baseline {result['dict_mkeys_per_s']:.3f} M/s, "
            f"x{result['lookup_speedup_vs_dict']})",
            f"          numpy gather of as many random rows from a dense {result['keys']:,} x {result['dim']} array: "
            f"{result['gather_mrows_per_s']:.2f} M rows/s; lookup / gather = {result['lookup_vs_gather']}",
            f"  insert  {result['insert_mkeys_per_s']:8.2f} M keys/s   (presized)",
            f"  build   {result['build_mkeys_per_s']:8.2f} M keys/s   "
            f"(from empty, {result['build_growths']} doublings)",
            f"  max load factor before the first failed insert: {result['max_load_factor']:.4f} "
            f"({result['max_load_factor_table_slots']:,} slots; growth bound {result['load_factor_bound']})",
        ]
    )
