"""One writer, many lock-free readers: no torn rows, no wrong rows, no false misses.

Rows encode their key and a version, exactly in float32 (all values < 2**24):
row[0] = key and row[j] = (key % 4096) * 4096 + (version % 256) * 16 + j for
j >= 1. A reader can check any row on its own: row[0] must be its key, and
row[j] - j must be one value that agrees with the key (no mixed versions).
"""

import threading
import time

import numpy as np

from server.table import EmbeddingTable

DIM = 256  # long rows: a write spans many instructions, so torn reads would show
STABLE = np.arange(1, 30_001, dtype=np.uint64)  # present before readers start, never deleted
VOLATILE = np.arange(100_000, 300_000, dtype=np.uint64)  # inserted and deleted while readers run


def rows_for(keys: np.ndarray, version: int) -> np.ndarray:
    rows = np.empty((len(keys), DIM), dtype=np.float32)
    rows[:, 0] = keys
    rows[:, 1:] = ((keys % 4096) * 4096 + (version % 256) * 16)[:, None] + np.arange(1, DIM)
    return rows


def check_rows(keys, rows, found, must_find):
    if must_find:
        assert found.all(), f"false miss for keys {keys[~found][:5]}"
    hit = rows[found].astype(np.int64)
    np.testing.assert_array_equal(hit[:, 0], keys[found].astype(np.int64), "row of another key")
    stamp = hit[:, 1:] - np.arange(1, DIM)
    np.testing.assert_array_equal(stamp, np.repeat(stamp[:, :1], DIM - 1, axis=1), "torn row (mixed versions)")
    np.testing.assert_array_equal(stamp[:, 0] // 4096, hit[:, 0] % 4096, "torn row (mixed keys)")
    assert not rows[~found].any(), "missing key returned a non-zero row"


def test_readers_never_see_torn_or_foreign_rows_while_writer_grows():
    table = EmbeddingTable(DIM, capacity=64, stripes=64)  # few stripes: readers and writer collide often
    table.upsert(STABLE, rows_for(STABLE, 0), now=0.0)
    stop = threading.Event()
    failures: list[BaseException] = []
    reads = [0]

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                # Large batches keep readers inside the GIL-free kernel, overlapping the writer.
                stable = rng.choice(STABLE, 20_000)
                rows, found = table.lookup_found(stable)
                check_rows(stable, rows, found, must_find=True)
                volatile = rng.choice(VOLATILE, 20_000)
                rows, found = table.lookup_found(volatile)
                check_rows(volatile, rows, found, must_find=False)
                reads[0] += 40_000
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
            stop.set()

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 4.0
    version = 0
    growths_before = table.growths
    try:
        while time.monotonic() < deadline and not stop.is_set():
            version += 1
            table.upsert(STABLE, rows_for(STABLE, version), now=float(version))
            chunk = VOLATILE[(version * 20_000) % len(VOLATILE):][:20_000]
            table.upsert(chunk, rows_for(chunk, version), now=float(version))
            if version % 3 == 0:
                table.delete(chunk[::2])
            if version % 7 == 0:
                table.evict_expired(ttl_s=2)  # volatile rows age out; stable ones are fresh
    finally:
        stop.set()
        for t in threads:
            t.join()
    if failures:
        raise failures[0]
    assert table.growths > growths_before, "the writer never grew the table"
    assert reads[0] > 10_000
    rows, found = table.lookup_found(STABLE)
    check_rows(STABLE, rows, found, must_find=True)
