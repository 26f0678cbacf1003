"""SharedEmbeddingTable on a filesystem too small for it (a container's default 64 MiB /dev/shm): a
clear refusal that says what to do, never a SIGBUS on first touch (a crash loop of the stub)."""

import subprocess
import sys

import numpy as np
import pytest

from server.table import SharedEmbeddingTable, SharedMemoryFull


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 2 MiB tmpfs, as a small /dev/shm (mounting needs root: skipped with the reason otherwise)."""
    root = tmp_path / "shm"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield root
    subprocess.run(["umount", "-l", str(root)], check=False)


def test_a_table_larger_than_the_room_is_refused_and_leaves_nothing(tiny_tmpfs):
    with pytest.raises(SharedMemoryFull, match=r"needs [\d,]+ more bytes .*--shm-size.*shared_table"):
        SharedEmbeddingTable.create(tiny_tmpfs / "t", 16, capacity=1_000_000)
    assert list(tiny_tmpfs.iterdir()) == []


def test_growth_past_the_room_is_refused_and_the_table_keeps_serving(tiny_tmpfs):
    table = SharedEmbeddingTable.create(tiny_tmpfs / "t", 16, capacity=1024)
    table.mark_ready()
    rng = np.random.default_rng(0)
    fids = rng.choice(2**62, 50_000, replace=False).astype(np.uint64)
    rows = rng.standard_normal((fids.size, 16), dtype=np.float32)
    stored = 0
    with pytest.raises(SharedMemoryFull, match="more bytes"):
        for start in range(0, fids.size, 1000):
            table.upsert(fids[start:start + 1000], rows[start:start + 1000], now=1.0)
            stored = start + 1000
    assert stored > 0
    np.testing.assert_array_equal(table.lookup(fids[:stored]), rows[:stored])  # what it had, it still serves
    table.close()


def test_a_process_that_meets_a_full_tmpfs_exits_with_the_error_not_a_signal(tiny_tmpfs):
    code = (f"from server.table import SharedEmbeddingTable\n"
            f"SharedEmbeddingTable.create({str(tiny_tmpfs / 't')!r}, 16, capacity=1_000_000)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1 and "SharedMemoryFull" in done.stderr  # not -7 (SIGBUS)
