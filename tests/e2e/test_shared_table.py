"""SharedEmbeddingTable across real processes: readers verify every row they read while a
writer in another process writes, grows, and is killed mid-write; the next writer repairs.

Rows describe themselves (see test_table_concurrency): row[0] = key, row[j] =
(key % 4096) * 4096 + (version % 256) * 16 + j, so any reader checks any row alone.
"""

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from server.table.cuckoo import EMPTY_KEY, SLOTS
from server.table.shared import DIRTY, NotTheWriter, SharedEmbeddingTable, mapping_bytes, shm_directory
from server.table import EmbeddingTable

DIM = 64
STABLE = np.arange(1, 20_001, dtype=np.uint64)
SPAWN = multiprocessing.get_context("spawn")


def rows_for(keys: np.ndarray, version: int) -> np.ndarray:
    rows = np.empty((len(keys), DIM), dtype=np.float32)
    rows[:, 0] = keys
    rows[:, 1:] = ((keys % 4096) * 4096 + (version % 256) * 16)[:, None] + np.arange(1, DIM)
    return rows


def torn_or_foreign(keys, rows, found) -> str | None:
    hit = rows[found].astype(np.int64)
    if not np.array_equal(hit[:, 0], keys[found].astype(np.int64)):
        return "row of another key"
    stamp = hit[:, 1:] - np.arange(1, DIM)
    if not (stamp == stamp[:, :1]).all():
        return "torn row (mixed versions)"
    if not np.array_equal(stamp[:, 0] // 4096, hit[:, 0] % 4096):
        return "torn row (mixed keys)"
    return None


def batch(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Record k of a deterministic stream: (upsert keys, their rows, keys to delete)."""
    rng = np.random.default_rng(k)
    keys = np.unique(rng.integers(100_000, 100_000 + 50_000 * (1 + k // 20), 3000).astype(np.uint64))
    deletes = rng.integers(100_000, 100_000 + 50_000 * (1 + k // 20), 300).astype(np.uint64)
    return keys, rows_for(keys, k), deletes


def reference(records: int) -> dict[int, np.ndarray]:
    state = {int(k): r for k, r in zip(STABLE, rows_for(STABLE, 0))}
    for k in range(1, records + 1):
        keys, rows, deletes = batch(k)
        state.update({int(key): row for key, row in zip(keys, rows)})
        for key in deletes:
            state.pop(int(key), None)
    return state


def apply_records(table, first: int, last: int, pause_s: float = 0.0) -> None:
    for k in range(first, last + 1):
        keys, rows, deletes = batch(k)
        table.upsert(keys, rows, now=float(k))
        table.delete(deletes)
        table.user[0] = k  # record k complete
        if pause_s:
            time.sleep(pause_s)


def writer_main(directory: str, first: int, last: int, pause_s: float) -> None:
    table = SharedEmbeddingTable.attach(directory)
    assert table.acquire_writer(blocking=True)
    apply_records(table, first, last, pause_s)


def reader_main(directory: str, seconds: float, results) -> None:
    table = SharedEmbeddingTable.attach(directory)
    rng = np.random.default_rng(os.getpid())
    reads, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        stable = rng.choice(STABLE, 4000)
        rows, found = table.lookup_found(stable)
        if not found.all():
            results.put(f"false miss of stable keys {stable[~found][:3]}")
            return
        problem = torn_or_foreign(stable, rows, found)
        volatile = rng.integers(100_000, 600_000, 4000).astype(np.uint64)
        rows, found = table.lookup_found(volatile)
        problem = problem or torn_or_foreign(volatile, rows, found)
        if problem:
            results.put(problem)
            return
        reads += 8000
    results.put(reads)


@pytest.fixture
def shared(tmp_path):
    directory = tmp_path / "shm"  # tmp_path, not /dev/shm: same code, no leftovers
    table = SharedEmbeddingTable.create(directory, DIM, capacity=1024, stripes=64)
    table.upsert(STABLE, rows_for(STABLE, 0), now=0.0)
    table.mark_ready()
    yield table
    table.close()


def table_state(table) -> dict[int, np.ndarray]:
    state = {}
    for fids, rows, _ in table.items():
        for fid, row in zip(fids, rows):
            assert int(fid) not in state, f"key {fid} stored twice"
            state[int(fid)] = row.copy()
    return state


def assert_equal_states(got: dict, want: dict) -> None:
    assert got.keys() == want.keys(), f"{len(got.keys() - want.keys())} extra, {len(want.keys() - got.keys())} missing"
    for key, row in want.items():
        np.testing.assert_array_equal(got[key], row)


def test_readers_in_other_processes_never_see_torn_rows_while_a_writer_process_grows_it(shared):
    shared.release_writer()
    capacity, growths = shared.capacity, shared.growths
    results = SPAWN.Queue()
    readers = [SPAWN.Process(target=reader_main, args=(str(shared.directory), 6.0, results)) for _ in range(2)]
    writer = SPAWN.Process(target=writer_main, args=(str(shared.directory), 1, 60, 0.0))
    for p in readers + [writer]:
        p.start()
    writer.join(120)
    outcomes = [results.get(timeout=60) for _ in readers]
    for p in readers:
        p.join(30)
    assert writer.exitcode == 0
    assert all(isinstance(o, int) and o > 0 for o in outcomes), outcomes
    assert shared.growths == growths and shared.capacity > capacity  # grown by the other process, seen here
    assert_equal_states(table_state_as_reader(shared), reference(60))


def table_state_as_reader(table) -> dict:
    assert table.acquire_writer()  # items() reads without the seqlock: only with no writer running
    try:
        return table_state(table)
    finally:
        table.release_writer()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_writer_killed_mid_write_is_repaired_by_the_next_one(shared, seed):
    """kill -9 of the writer process at a random moment, readers running; the next writer
    repairs, resumes after the last complete record: the table equals the reference exactly."""
    shared.release_writer()
    results = SPAWN.Queue()
    reader = SPAWN.Process(target=reader_main, args=(str(shared.directory), 4.0, results))
    writer = SPAWN.Process(target=writer_main, args=(str(shared.directory), 1, 1000, 0.0))
    reader.start()
    writer.start()
    while shared.user[0] < 5 and writer.is_alive():
        time.sleep(0.01)
    time.sleep(np.random.default_rng(seed).uniform(0.0, 0.3))
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(30)
    complete = int(shared.user[0])
    assert shared.acquire_writer(), "the lease was not released with the dead writer"
    assert not shared._control[DIRTY]
    apply_records(shared, complete + 1, complete + 3)
    outcome = results.get(timeout=60)
    reader.join(30)
    assert isinstance(outcome, int), outcome
    assert_equal_states(table_state(shared), reference(complete + 3))
    assert len(shared) == len(reference(complete + 3))


def test_a_stripe_left_odd_does_not_hang_readers(shared):
    """The worst a dead writer leaves: a stripe odd for ever and a key in two slots."""
    state = shared._state
    key = STABLE[0]
    pos = int(np.flatnonzero(state.keys == key)[0])
    free = int(np.flatnonzero(state.keys == EMPTY_KEY)[0])
    state.rows[free] = state.rows[pos]
    state.stamps[free] = state.stamps[pos]
    state.keys[free] = key  # a second copy, as a writer killed mid-move leaves
    state.versions[:] += 1  # every stripe odd: a writer died inside a write
    shared._control[DIRTY] = 1
    shared.release_writer()
    reader = SharedEmbeddingTable.attach(shared.directory)
    assert reader.acquire_writer()  # repairs: a new generation, one copy per key
    rows, found = reader.lookup_found(STABLE)
    assert found.all() and torn_or_foreign(STABLE, rows, found) is None
    assert len(reader) == len(STABLE)
    assert_equal_states(table_state(reader), reference(0))
    rows, found = shared.lookup_found(STABLE[:10])  # the old process moves to the repaired generation too
    assert found.all()


def test_only_the_lease_holder_writes(shared):
    other = SharedEmbeddingTable.attach(shared.directory)
    assert not other.acquire_writer()
    with pytest.raises(NotTheWriter):
        other.upsert(STABLE[:1], rows_for(STABLE[:1], 1), now=1.0)
    shared.release_writer()
    assert other.acquire_writer()
    other.upsert(STABLE[:1], rows_for(STABLE[:1], 1), now=1.0)
    np.testing.assert_array_equal(shared.lookup(STABLE[:1]), rows_for(STABLE[:1], 1))


def test_a_snapshot_loads_into_shared_memory_unchanged(tmp_path):
    table = EmbeddingTable(DIM)
    table.upsert(STABLE, rows_for(STABLE, 3), now=7.0)
    table.save(tmp_path / "snap")
    shared = SharedEmbeddingTable.create_from_snapshot(tmp_path / "shm", tmp_path / "snap")
    assert len(shared) == len(STABLE) and shared.newest_stamp == 7.0
    np.testing.assert_array_equal(shared.lookup(STABLE), rows_for(STABLE, 3))


def test_each_data_dir_gets_its_own_directory(tmp_path):
    a, b = shm_directory(tmp_path / "a"), shm_directory(tmp_path / "b")
    assert a != b and a == shm_directory(tmp_path / "a" / ".." / "a")


def reader_touch_main(directory: str, results) -> None:
    table = SharedEmbeddingTable.attach(directory)
    table.lookup(STABLE)
    state = table._state
    touched = int(state.keys.sum() + state.rows.sum() + state.stamps.sum())  # every page mapped in
    results.put((os.getpid(), touched))
    time.sleep(3)


def test_table_bytes_exist_once_for_several_processes(shared):
    results = SPAWN.Queue()
    readers = [SPAWN.Process(target=reader_touch_main, args=(str(shared.directory), results)) for _ in range(2)]
    for p in readers:
        p.start()
    pids = [results.get(timeout=60)[0] for _ in readers]
    state = shared._state
    table_bytes = state.keys.nbytes + state.rows.nbytes + state.stamps.nbytes
    for pid in pids:
        private = mapping_bytes(pid, str(shared.directory))
        shared_bytes = mapping_bytes(pid, str(shared.directory), ("Shared_Clean", "Shared_Dirty"))
        assert private <= 0.05 * table_bytes, (private, table_bytes)
        assert shared_bytes >= 0.9 * table_bytes
    for p in readers:
        p.join(30)
    assert table_bytes >= len(STABLE) * DIM * 4 and SLOTS == 8
