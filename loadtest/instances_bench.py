"""``monolith-rt bench instances``: throughput and table memory per ranker instance count.

For each count N (and each row type, ``serve --row-dtype``): a spawned
``monolith-rt serve`` on a model repository whose ranker has
``instance_group.count`` N, loaded with a snapshot of ``rows`` rows (every
FID the requests use among them). Closed loop,
``concurrency`` clients on tritonserver's own gRPC port (the front's work is
not what this measures), alternating windows:
    rps            the ranker at ``candidates`` candidates
    baseline_rps   the trivial baseline model, same tensors: the floor
Memory, from /proc after the windows (every instance has served by then):
    table_bytes                       the table's data: its files in the shm directory
    table_private_bytes_per_instance  max over ranker stubs of Private_Clean + Private_Dirty
                                      of their mappings of the table (smaps); a private copy
                                      would count in full
    table_private_bytes_by_instance   the same, per stub
    table_pss_bytes_by_instance       Pss of those mappings per stub: each shared page split
                                      among the processes mapping it (their sum is the table's
                                      resident bytes, counted once)
    stub_rss_bytes                    VmRSS of each ranker stub
    stub_rss_minus_table_bytes        VmRSS of each ranker stub less the Rss of its mappings of
                                      the table (shared table only): what an instance costs
                                      beside the rows it reads (interpreter, numpy, numba, the
                                      runtime, its own heap)
    stub_pss_minus_table_bytes        the same from Pss (smaps_rollup less the table's Pss): pages
                                      shared with other processes (libraries such as numba's
                                      LLVM, mapped by every stub) split among them, so N of them
                                      add up to what N instances hold
    ready_s                           seconds from spawning ``monolith-rt serve`` until it
                                      prints its endpoints: every model of the repository is
                                      loaded (the ranker's stubs imported, the table
                                      attached, the request path warmed up) and ready
    cpu_us_per_request                per model: CPU microseconds per request (user + system, all
                                      threads, from /proc/<pid>/stat) of its stubs, of tritonserver
                                      and of the load generator, over its windows. On a saturated
                                      machine rps follows the total; unlike rps it barely moves
                                      when other work shares the cores.

smaps counts a page as Private when only one process maps it, MAP_SHARED or
not: with one instance every table page it touched is "private" to it, and
with N, a page only one instance has read so far is private to that one.
The bytes still exist once, in /dev/shm. (The creator unmaps the pages it
filled from the snapshot, so it holds only what it reads, like the others.)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loadtest.latency import request_fids, synthetic_requests, run_window
from server.features import FeatureSchema
from server.table.quantize import ROW_DTYPES
from server.procs import cpu_seconds, processes

_PARTS = ("keys", "rows", "stamps", "versions")


def _snapshot(data_dir: Path, schema: FeatureSchema, requests, rows: int, seed: int) -> None:
    from server.dense import initial_dense_state
    from server.streams.snapshots import write_snapshot
    from server.table import EmbeddingTable

    rng = np.random.default_rng(seed)
    pool = request_fids(requests)
    extra = np.uint64(10 << 48) | rng.integers(0, 1 << 48, max(0, rows - pool.shape[0]), dtype=np.uint64)
    fids = np.unique(np.concatenate([pool, extra]))
    table = EmbeddingTable(schema.dim, capacity=int(fids.shape[0] / 0.9))
    for start in range(0, fids.shape[0], 1 << 18):
        chunk = fids[start : start + (1 << 18)]
        table.upsert(chunk, rng.standard_normal((chunk.shape[0], schema.dim), dtype=np.float32) * 0.1, now=1.0)
    write_snapshot(data_dir, table, initial_dense_state(schema.num_fields, schema.dim, schema.dense), 0)


def _model_stubs(triton_pid: int, model: str) -> list[int]:
    stubs = []
    for pid, state, ppid, _ in processes():
        if ppid != triton_pid or state == "Z":
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if f"/{model}/1/model.py".encode() in cmdline:
            stubs.append(pid)
    return sorted(stubs)


class _CpuSplit:
    """CPU per request of the serving model's stubs, tritonserver and the load
    generator (this process), summed over windows: where the cores went."""

    def __init__(self, triton_pid: int, stubs: dict[str, list[int]]):
        self._groups = {"tritonserver": [triton_pid], "client": [os.getpid()], **stubs}
        self.seconds = {model: {group: 0.0 for group in ("model_stubs", "tritonserver", "client")}
                        for model in stubs}
        self.requests = {model: 0 for model in stubs}

    def measure(self, model: str, run_window):
        """Runs ``run_window()`` -> (histogram, ...) and charges the CPU used meanwhile to ``model``."""
        groups = {"model_stubs": self._groups[model], "tritonserver": self._groups["tritonserver"],
                  "client": self._groups["client"]}
        before = {g: sum(cpu_seconds(p) for p in pids) for g, pids in groups.items()}
        result = run_window()
        for g, pids in groups.items():
            self.seconds[model][g] += sum(cpu_seconds(p) for p in pids) - before[g]
        self.requests[model] += result[0].summary()["count"]
        return result

    def per_request_us(self) -> dict:
        out = {}
        for model, groups in self.seconds.items():
            n = max(self.requests[model], 1)
            out[model] = {g: round(s / n * 1e6, 1) for g, s in groups.items()}
            out[model]["total"] = round(sum(groups.values()) / n * 1e6, 1)
        return out


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _pss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def _measure(count: int, schema: FeatureSchema, requests, rows: int, concurrency: int, window_s: float,
             rounds: int, seed: int, shared_table: bool, row_dtype: str = "fp32") -> dict:
    from server.host.instances import repository_with_instances
    from server.table.shared import mapping_bytes, shm_directory
    from server.host.supervisor import ServeProcess

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="monolith-bench-instances-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        _snapshot(data_dir, schema, requests, rows, seed)
        repo = repository_with_instances(Path(tmp) / "repo", count, shared_table=shared_table)
        print(f"[bench instances] {count} instance(s), {row_dtype} rows: starting monolith-rt serve", file=sys.stderr,
              flush=True)
        spawned = time.monotonic()
        with ServeProcess(data_dir, extra_args=["--model-repository", str(repo), "--row-dtype", row_dtype]) as serve:
            ready_s = time.monotonic() - spawned
            url = serve.triton_grpc_url
            run_window(url, "grpc", "ranker", requests, 2.0, None, concurrency, "poisson", 1_000_000, rng)
            counted = {"ranker": [0, 0.0], "baseline": [0, 0.0]}
            cpu = _CpuSplit(serve.triton_pid, {m: _model_stubs(serve.triton_pid, m) for m in counted})
            for r in range(rounds):
                for model in ("ranker", "baseline"):
                    print(f"[bench instances] {count}: round {r + 1}/{rounds} {model}", file=sys.stderr, flush=True)
                    hist, errors, elapsed, _ = cpu.measure(model, lambda m=model: run_window(
                        url, "grpc", m, requests, window_s, None, concurrency, "poisson", 1_000_000, rng))
                    if errors:
                        raise RuntimeError(f"{model} answered errors under load: {dict(errors)}")
                    counted[model][0] += hist.summary()["count"]
                    counted[model][1] += elapsed
            stubs = _model_stubs(serve.triton_pid, "ranker")
            directory = shm_directory(data_dir)
            table_bytes = sum(p.stat().st_size for p in directory.glob("gen-*") if p.suffix[1:] in _PARTS)
            private = [mapping_bytes(pid, str(directory)) for pid in stubs] if shared_table else None
            pss = [mapping_bytes(pid, str(directory), ("Pss",)) for pid in stubs] if shared_table else None
            rss = [_rss_bytes(pid) for pid in stubs]
            stub_pss = [_pss_bytes(pid) for pid in stubs]
            table_rss = [mapping_bytes(pid, str(directory), ("Rss",)) for pid in stubs] if shared_table else None
    rps = counted["ranker"][0] / counted["ranker"][1]
    baseline_rps = counted["baseline"][0] / counted["baseline"][1]
    return {"instances": count, "row_dtype": row_dtype, "shared_table": shared_table, "rps": round(rps, 1),
            "baseline_rps": round(baseline_rps, 1), "rps_ratio_vs_baseline": round(rps / baseline_rps, 3),
            "table_bytes": table_bytes if shared_table else None,
            "table_private_bytes_per_instance": max(private) if private else None,
            "table_private_bytes_by_instance": private, "table_pss_bytes_by_instance": pss,
            "stub_rss_bytes": rss,
            "stub_rss_minus_table_bytes": [r - t for r, t in zip(rss, table_rss)] if shared_table else None,
            "stub_pss_minus_table_bytes": [s - t for s, t in zip(stub_pss, pss)] if shared_table else None,
            "ready_s": round(ready_s, 2), "cpu_us_per_request": cpu.per_request_us()}


def bench_instances(schema: FeatureSchema, counts: list[int], rows: int, candidates: int = 100,
                    concurrency: int = 8, window_s: float = 5.0, rounds: int = 2, seed: int = 0,
                    shared_table: bool = True, row_dtypes: tuple[str, ...] = ("fp32",)) -> dict:
    if not counts or min(counts) < 1:
        raise ValueError(f"--instances requires counts >= 1, got {counts}")
    if not row_dtypes or set(row_dtypes) - set(ROW_DTYPES):
        raise ValueError(f"--row-dtype requires row types among {', '.join(ROW_DTYPES)}, got {list(row_dtypes)}")
    if rows < 1:
        raise ValueError(f"--rows requires >= 1, got {rows}")
    requests = synthetic_requests(schema, 200, candidates, seed)
    started = time.monotonic()
    result = {"rows_in_table": rows, "candidates": candidates, "concurrency": concurrency, "window_s": window_s,
              "rounds": rounds,
              "rows": [_measure(n, schema, requests, rows, concurrency, window_s, rounds, seed, shared_table, t)
                       for t in row_dtypes for n in counts]}
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    return result


def format_instances_report(result: dict) -> str:
    lines = [f"instances: {result['rows_in_table']:,} table rows, {result['candidates']} candidates, "
             f"closed loop x{result['concurrency']}, {result['rounds']} x {result['window_s']} s windows"]
    for row in result["rows"]:
        table = row["table_bytes"]
        private = row["table_private_bytes_per_instance"]
        lines.append(f"  {row['instances']} instance(s), {row['row_dtype']} rows: ranker {row['rps']:.1f} req/s, "
                     f"baseline {row['baseline_rps']:.1f} req/s, ratio {row['rps_ratio_vs_baseline']}; table "
                     + (f"{table / 2**20:.1f} MiB, private per instance (max) {private / 2**20:.1f} MiB "
                        f"(by instance: {[round(p / 2**20, 1) for p in row['table_private_bytes_by_instance']]})"
                        if table is not None else "private per instance (shared_table false)")
                     + f"; stub RSS MiB {[round(r / 2**20) for r in row['stub_rss_bytes']]}"
                     + (f" ({[round(r / 2**20) for r in row['stub_rss_minus_table_bytes']]} without the table, "
                        f"Pss {[round(r / 2**20) for r in row['stub_pss_minus_table_bytes']]})"
                        if row["stub_rss_minus_table_bytes"] is not None else "")
                     + f"; ready {row['ready_s']:.2f} s after spawn")
        for model, split in row["cpu_us_per_request"].items():
            lines.append(f"    CPU us per {model} request: " + ", ".join(f"{k} {v}" for k, v in split.items()))
    return "\n".join(lines)
