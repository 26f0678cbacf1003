"""ReadProbe: a reader that times every lookup it makes on a live table, from a thread or another process.

What a ranker instance sees while the table changes under it: the probe looks
up ``batch`` FIDs (drawn in turn from ``fids``) every ``interval_s``, as
requests arrive, and records when each call started and how long it took.
``monolith-rt bench scale`` runs one in the writer's process (a thread: same
mappings, the GIL shared with the writer) and, for a shared table, one in a
process of its own (what another instance sees: it maps a new generation's
files itself, and faults their pages in on first touch).

Each call's CPU time and minor page faults (of the probe's thread) come with
its wall time, so a long call says why it was long: waiting (for a core, the
GIL, a lock) takes wall time only; faulting pages in takes CPU time and faults.

Times are ``time.perf_counter()`` (CLOCK_MONOTONIC on Linux), so the calls of
a probe process line up with the writer's on one clock.
"""

from __future__ import annotations

import multiprocessing
import resource
import threading
import time

import numpy as np

__all__ = ["ReadProbe", "TIMING_COLUMNS"]

TIMING_COLUMNS = ("start", "wall_s", "cpu_s", "minor_faults")  # of ReadProbe.stop()'s rows

_START_TIMEOUT_S = 60.0


def _timed_lookups(table, fids: np.ndarray, batch: int, interval_s: float, ready, stop) -> np.ndarray:
    """Looks up batches of ``fids`` every ``interval_s`` until ``stop`` is set; returns the timings
    (see ``ReadProbe.stop``). Sets ``ready`` after the first call (compiled, mapped)."""
    out = np.empty((batch, table.dim), dtype=np.float32)
    starts = fids.shape[0] - batch + 1
    table.lookup(fids[:batch], out=out)
    ready.set()
    timings = []
    i = 0
    next_at = time.perf_counter()
    while not stop.is_set():
        at = (i * batch) % starts
        faults, cpu = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt, time.thread_time()
        began = time.perf_counter()
        table.lookup(fids[at:at + batch], out=out)
        took = time.perf_counter() - began
        timings.append((began, took, time.thread_time() - cpu,
                        resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults))
        i += 1
        next_at = max(next_at + interval_s, time.perf_counter())
        time.sleep(max(0.0, next_at - time.perf_counter()))
    return np.array(timings, dtype=np.float64).reshape(-1, len(TIMING_COLUMNS))


def _probe_process(directory: str, fids: np.ndarray, batch: int, interval_s: float, ready, stop, conn) -> None:
    from server.table.shared import SharedEmbeddingTable

    table = SharedEmbeddingTable.attach(directory)
    try:
        conn.send(_timed_lookups(table, fids, batch, interval_s, ready, stop))
    finally:
        table.close()
        conn.close()


class ReadProbe:
    """Timed lookups of ``fids`` (uint64, at least ``batch`` of them, all meant to be present) on a live table.

    Use ``ReadProbe.thread(table, ...)`` or ``ReadProbe.process(directory, ...)``, then ``stop()`` for the
    timings. Both return once the probe has made its first call.
    """

    def __init__(self, stop, finish):
        self._stop, self._finish = stop, finish

    @classmethod
    def thread(cls, table, fids: np.ndarray, batch: int, interval_s: float) -> "ReadProbe":
        """A probe thread in this process, reading ``table`` (any EmbeddingTable)."""
        _check(fids, batch, interval_s)
        ready, stop, result = threading.Event(), threading.Event(), []
        worker = threading.Thread(target=lambda: result.append(
            _timed_lookups(table, fids, batch, interval_s, ready, stop)), name="read-probe", daemon=True)
        worker.start()

        def finish() -> np.ndarray:
            worker.join()
            if not result:
                raise RuntimeError("read probe thread failed (its traceback is on stderr)")
            return result[0]

        _wait_ready(ready, worker.is_alive, "thread")
        return cls(stop, finish)

    @classmethod
    def process(cls, directory, fids: np.ndarray, batch: int, interval_s: float) -> "ReadProbe":
        """A probe process that attaches to the SharedEmbeddingTable in ``directory`` (marked ready)."""
        _check(fids, batch, interval_s)
        context = multiprocessing.get_context("spawn")
        ready, stop = context.Event(), context.Event()
        receive, send = context.Pipe(duplex=False)
        worker = context.Process(target=_probe_process, name="read-probe",
                                 args=(str(directory), fids, batch, interval_s, ready, stop, send), daemon=True)
        worker.start()
        send.close()

        def finish() -> np.ndarray:
            try:
                if not receive.poll(_START_TIMEOUT_S):
                    raise RuntimeError(f"read probe process sent no timings within {_START_TIMEOUT_S} s")
                return receive.recv()
            finally:
                receive.close()
                worker.join(_START_TIMEOUT_S)

        _wait_ready(ready, worker.is_alive, "process")
        return cls(stop, finish)

    def stop(self) -> np.ndarray:
        """Stops the probe; float64 (k, 4), a row per lookup call (TIMING_COLUMNS): when it started
        (perf_counter), its wall seconds, the CPU seconds and minor page faults of the probe's thread in it."""
        self._stop.set()
        return self._finish()


def _check(fids: np.ndarray, batch: int, interval_s: float) -> None:
    if fids.dtype != np.uint64 or fids.ndim != 1 or fids.shape[0] < batch or batch < 1:
        raise ValueError(f"fids requires a 1-D uint64 array of at least batch={batch} >= 1 FIDs, "
                         f"got {fids.dtype} {fids.shape}")
    if not interval_s >= 0:
        raise ValueError(f"interval_s requires >= 0, got {interval_s}")


def _wait_ready(ready, alive, kind: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not ready.wait(0.05):
        if not alive():
            raise RuntimeError(f"read probe {kind} exited before its first lookup")
        if time.monotonic() > deadline:
            raise RuntimeError(f"read probe {kind} made no lookup within {_START_TIMEOUT_S} s")
