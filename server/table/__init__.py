"""The collisionless embedding table: FID -> row (read and written as float32; stored as fp32, fp16 or int8).

    cuckoo.py    the numba kernels (layout, invariants, seqlock protocol in its docstring)
    _atomics.py  acquire/release loads, stores and fences for the kernels
    local.py     EmbeddingTable: the owner of one process's table (growth, admission, expiry, snapshots)
    shared.py    SharedEmbeddingTable: the same table in shared memory for every ranker process
                 of a host (its cross-process protocol in its docstring)
    quantize.py  row types of a serving table: fp32, fp16, int8 with a per-row scale
    table_bench.py  `monolith-rt bench table`
    read_probe.py   ReadProbe: timed lookups on a live table from a thread or another process (`bench scale`)
"""

from server.table.cuckoo import EMPTY_KEY
from server.table.local import EmbeddingTable, SnapshotError, read_snapshot
from server.table.shared import NotTheWriter, SharedEmbeddingTable, SharedMemoryFull, shm_directory

__all__ = ["EMPTY_KEY", "EmbeddingTable", "NotTheWriter", "SharedEmbeddingTable", "SharedMemoryFull", "SnapshotError",
           "read_snapshot", "shm_directory"]
