"""SharedEmbeddingTable: one embedding table in shared memory for every ranker process of a host.

The kernels, layout and seqlock protocol are server.table.cuckoo's, unchanged: the
arrays simply live in files under a directory on tmpfs (/dev/shm), mapped
MAP_SHARED by every process, so the table's bytes exist once however many
ranker instances read it.

Directory layout (one per server; see ``shm_directory``)::

    control               uint64[512]: the shared header, below
    setup.lock            flock: held while a process creates or attaches
    writer.lock           flock: the writer lease (the kernel drops it when its holder dies)
    gen-<g>.keys          uint64[C]        generation g's arrays, as in server.table.cuckoo
    gen-<g>.rows          [C, W]           rows in the row type (server.table.quantize.storage_layout)
    gen-<g>.stamps        float64[C]
    gen-<g>.versions      uint64[V]
    blob-<name>-<v>       an opaque blob (the dense weights) at version v

    control[MAGIC]        b"MRTSHM01"      control[GENERATION]  current generation g
    control[DIM]          D                control[COUNT]       keys in generation g
    control[STRIPES]      V                control[NEWEST]      newest stamp (float64 bits)
    control[MAX_LOAD]     load bound (float64 bits)
    control[ROW_DTYPE]    the row type's code (0 fp32, 1 fp16, 2 int8: server.table.quantize.row_dtype_code)
    control[DIRTY]        1 while the writer changes the table
    control[OWNER]        who created it (the server's identity)
    control[WRITER_PID]   the writer's pid
    control[READY]        1 once the creator filled it
    control[USER + i]     words for the owner's own use (delta_seq, blob versions)

Cross-process protocol (the in-process one of server.table.cuckoo holds within a
generation):
    * one writer at a time, the holder of ``writer.lock`` (flock: released by
      the kernel when the holder dies, so another process takes over with no
      coordinator); any number of lock-free readers in any process.
    * growth: the writer fills gen-<g+1> while readers use gen-<g>, then
      stores GENERATION = g+1 and unlinks gen-<g>. A reader checks GENERATION
      before each batch and maps the new files; until then it reads gen-<g>,
      which no writer touches again (its mapping outlives the unlink).
    * a writer killed mid-write leaves DIRTY = 1, possibly a stripe odd for
      ever, a row half-written in place, a key in two slots (see
      server.table.cuckoo). Readers stuck on the odd stripe give up (STUCK) and look
      again for a new generation; the next writer repairs before anything else:
      it rehashes gen-<g> into gen-<g+1> (one copy per key, COUNT recounted)
      and publishes it. Rows half-written in place belong to the record that
      was being applied: the caller re-applies it (absolute values), resuming
      after the last sequence number it had recorded as complete.
    * USER words are written by the writer and read by anyone; a word is an
      aligned 8-byte store, never torn.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import shutil
import time
from pathlib import Path

import numpy as np

from server.table.cuckoo import EMPTY_KEY, SLOTS
from server.table.local import EmbeddingTable, SnapshotError, TableArrays, pow2_at_least, read_snapshot
from server.table.quantize import row_dtype_code, row_dtype_of_code

__all__ = ["FileLock", "NotTheWriter", "SharedEmbeddingTable", "SharedMemoryFull", "shm_directory"]

SHM_ROOT = Path("/dev/shm")
_MAGIC = int.from_bytes(b"MRTSHM01", "little")
_CONTROL_WORDS = 512
MAGIC, DIM, STRIPES, MAX_LOAD, GENERATION, COUNT, NEWEST, DIRTY, OWNER, WRITER_PID, READY, ROW_DTYPE = range(12)
USER = 64  # control[USER:] belongs to the owner (the ranker keeps delta_seq and blob versions there)
_ATTACH_POLL_S = 0.01


class NotTheWriter(RuntimeError):
    """A process that does not hold the writer lease tried to change the table."""


def shm_directory(data_dir: str | os.PathLike, root: Path = SHM_ROOT) -> Path:
    """The shared table directory of the server on ``data_dir``: one name per
    data directory, so two servers never mix their tables."""
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return root / f"monolith-{digest}"


class SharedMemoryFull(OSError):
    """The filesystem of the shared table (tmpfs, /dev/shm) has no room for it: refused with what to do,
    where a sparse file would have been mapped and a first touch past the room killed the process (SIGBUS)."""


def _map(path: Path, nbytes: int, create: bool) -> mmap.mmap:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            _reserve(fd, path, nbytes)
        return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _reserve(fd: int, path: Path, nbytes: int) -> None:
    """Allocates the file's pages now (posix_fallocate), so a full tmpfs says so here, as an error."""
    try:
        os.posix_fallocate(fd, 0, max(nbytes, 1))
    except OSError as exc:
        path.unlink(missing_ok=True)
        if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        stat = os.statvfs(path.parent)
        free, size = stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize
        raise SharedMemoryFull(
            exc.errno, f"the shared embedding table needs {nbytes:,} more bytes in {path.parent.parent} "
            f"({free:,} of {size:,} bytes free) for {path.name}: give it more room (docker run --shm-size=4g, or "
            "in Kubernetes a memory-backed emptyDir mounted at /dev/shm), or set the ranker's model parameter "
            "shared_table to \"false\" (a private table per instance)") from None


class FileLock:
    """An flock(2) on ``path`` (created 0600 if missing). The lock belongs to the open file, so the
    OS drops it when its holder dies: the lease a dead writer held is free again at once."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def acquire(self, blocking: bool = True, mode: int = fcntl.LOCK_EX) -> bool:
        """Takes the lock (``mode``: LOCK_EX or LOCK_SH); False when ``blocking`` is off and it is held."""
        try:
            fcntl.flock(self._fd, mode | (0 if blocking else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            return False

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)  # drops the lock


class _WriterSection:
    """The writer's lock: the thread lock of EmbeddingTable, plus the lease
    check and the DIRTY mark around every change."""

    def __init__(self, table: "SharedEmbeddingTable"):
        self._table = table
        self._lock = table._thread_lock

    def __enter__(self):
        self._lock.acquire()
        if not self._table.is_writer:
            self._lock.release()
            raise NotTheWriter(f"process {os.getpid()} does not hold the writer lease of {self._table.directory}")
        self._table._control[DIRTY] = 1

    def __exit__(self, *exc):
        self._table._control[DIRTY] = 0
        self._lock.release()


class SharedEmbeddingTable(EmbeddingTable):
    """An EmbeddingTable whose storage is shared by every process that opens
    ``directory`` (see the module docstring). ``create`` makes a new one;
    ``attach`` opens an existing one; both readers and the writer use the
    ordinary EmbeddingTable methods. Writing requires ``acquire_writer``."""

    def __init__(self, directory: Path, control: mmap.mmap, sketch_width: int = 1 << 20, sketch_depth: int = 4):
        self.directory = Path(directory)
        self._control_map = control
        self._control = np.frombuffer(control, dtype=np.uint64)
        self._control_f = self._control.view(np.float64)
        if int(self._control[MAGIC]) != _MAGIC:
            raise SnapshotError(f"{self.directory}/control is not a shared table control block")
        try:
            row_dtype = row_dtype_of_code(int(self._control[ROW_DTYPE]))
        except ValueError as exc:
            raise SnapshotError(f"{self.directory}/control: {exc}") from None
        self._configure(int(self._control[DIM]), float(self._control_f[MAX_LOAD]), sketch_width, sketch_depth,
                        int(self._control[STRIPES]), row_dtype)
        self._thread_lock = self._write_lock
        self._write_lock = _WriterSection(self)
        self._lease = FileLock(self.directory / "writer.lock")
        self.is_writer = False
        self._arrays: TableArrays | None = None
        self._maps: list[mmap.mmap] = []

    # ------------------------------------------------------------ construction

    @classmethod
    def create(cls, directory: str | os.PathLike, dim: int, *, capacity: int = 1024, max_load_factor: float = 0.98,
               stripes: int = 1 << 14, owner: int = 0, row_dtype: str = "fp32", **sketch) -> "SharedEmbeddingTable":
        """A new empty table in ``directory`` (which must not exist), held
        as writer by this process; ``mark_ready`` lets attachers in."""
        code = row_dtype_code(row_dtype)
        directory = Path(directory)
        directory.mkdir(mode=0o700)
        control = _map(directory / "control", _CONTROL_WORDS * 8, create=True)
        words = np.frombuffer(control, dtype=np.uint64)
        words[DIM], words[STRIPES], words[OWNER], words[ROW_DTYPE] = dim, stripes, owner, code
        words.view(np.float64)[MAX_LOAD] = max_load_factor
        words.view(np.float64)[NEWEST] = -np.inf
        words[MAGIC] = _MAGIC
        table = cls(directory, control, **sketch)
        if not table.acquire_writer():
            raise RuntimeError(f"cannot take the writer lease of the new table {directory}")
        try:
            first = table._allocate(max(2, pow2_at_least(-(-int(capacity) // SLOTS))))
        except SharedMemoryFull:
            table.close()
            shutil.rmtree(directory, ignore_errors=True)
            raise
        table._state = first
        return table

    @classmethod
    def attach(cls, directory: str | os.PathLike, timeout_s: float = 60.0, **sketch) -> "SharedEmbeddingTable":
        """Opens the table in ``directory`` once its creator marked it ready."""
        directory = Path(directory)
        control = _map(directory / "control", _CONTROL_WORDS * 8, create=False)
        words = np.frombuffer(control, dtype=np.uint64)
        deadline = time.monotonic() + timeout_s
        while not words[READY]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"shared table {directory} not ready after {timeout_s} s")
            time.sleep(_ATTACH_POLL_S)
        return cls(directory, control, **sketch)

    @classmethod
    def create_from_snapshot(cls, directory, path, row_dtype: str | None = None,
                             **table_args) -> "SharedEmbeddingTable":
        """A new table holding the snapshot at ``path``, in ``row_dtype`` (default: the snapshot's)."""
        data = read_snapshot(path)
        table_args.setdefault("capacity", int(data.keys.shape[0] / 0.9) + SLOTS)
        table = cls.create(directory, data.dim, row_dtype=row_dtype or data.row_dtype, **table_args)
        table.fill_from_snapshot(path, data)
        return table

    def mark_ready(self) -> None:
        self._control[READY] = 1

    @staticmethod
    def remove(directory: str | os.PathLike) -> None:
        shutil.rmtree(directory, ignore_errors=True)

    @property
    def owner(self) -> int:
        return int(self._control[OWNER])

    @property
    def user(self) -> np.ndarray:
        """control[USER:]: uint64 words for the owner (writer writes, all read)."""
        return self._control[USER:]

    # --------------------------------------------------------------- the lease

    def acquire_writer(self, blocking: bool = False) -> bool:
        """Takes the writer lease if free; a table left DIRTY by a dead
        writer is repaired first. True if this process is now the writer."""
        if self.is_writer:
            return True
        if not self._lease.acquire(blocking):
            return False
        self.is_writer = True
        self._control[WRITER_PID] = os.getpid()
        if self._control[DIRTY]:
            self.repair()
        return True

    def release_writer(self) -> None:
        if self.is_writer:
            self.is_writer = False
            self._lease.release()

    def repair(self) -> None:
        """Writer only: a fresh generation with one copy of every key, COUNT
        recounted (what a writer killed mid-write may have left wrong)."""
        with self._write_lock:
            old = self._state
            new = self._rehashed(old, old.keys.shape[0] // SLOTS, dedupe=True)
            self._count = int(np.count_nonzero(new.keys != EMPTY_KEY))
            self._state = new

    # ------------------------------------------------------------- blobs

    def publish_blob(self, name: str, version: int, data: bytes) -> None:
        """Writes blob ``name`` at ``version`` (temp file + rename), removing older versions."""
        tmp = self.directory / f".blob-{name}-{version}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.directory / f"blob-{name}-{version}")
        for old in self.directory.glob(f"blob-{name}-*"):
            if old.name != f"blob-{name}-{version}":
                old.unlink(missing_ok=True)

    def read_blob(self, name: str, version: int) -> bytes | None:
        try:
            return (self.directory / f"blob-{name}-{version}").read_bytes()
        except FileNotFoundError:
            return None  # replaced by a newer version meanwhile

    # ------------------------------------------- storage hooks of EmbeddingTable

    @property
    def _count(self) -> int:
        return int(self._control[COUNT])

    @_count.setter
    def _count(self, value: int) -> None:
        self._control[COUNT] = value

    @property
    def _newest_stamp(self) -> float:
        return float(self._control_f[NEWEST])

    @_newest_stamp.setter
    def _newest_stamp(self, value: float) -> None:
        self._control_f[NEWEST] = value

    @property
    def _state(self) -> TableArrays:
        generation = int(self._control[GENERATION])
        if self._arrays is None or self._arrays.generation != generation:
            self._map_generation(generation)
        return self._arrays

    @_state.setter
    def _state(self, new: TableArrays) -> None:
        """Publishes a generation this writer filled; the previous one's files go."""
        previous = int(self._control[GENERATION])
        self._control[GENERATION] = new.generation
        self._arrays = new
        if previous != new.generation:
            self._unlink_generation(previous)

    def _allocate(self, n_buckets: int) -> TableArrays:
        generation = max(int(self._control[GENERATION]), self._arrays.generation if self._arrays else 0) + 1
        while (self.directory / f"gen-{generation}.keys").exists():
            generation += 1
        arrays = self._open_generation(generation, n_buckets, create=True)
        arrays.keys.fill(EMPTY_KEY)
        return arrays

    def _release(self, arrays: TableArrays) -> None:
        self._unlink_generation(arrays.generation)

    def _on_stuck(self) -> None:
        time.sleep(0.001)  # a dead writer's stripe: wait for the repaired generation

    def _map_generation(self, generation: int) -> None:
        while True:
            try:
                n_buckets = os.stat(self.directory / f"gen-{generation}.keys").st_size // (8 * SLOTS)
                self._arrays = self._open_generation(generation, n_buckets, create=False)
                return
            except FileNotFoundError:  # replaced by a newer generation meanwhile
                newer = int(self._control[GENERATION])
                if newer == generation:
                    raise
                generation = newer

    def _open_generation(self, generation: int, n_buckets: int, create: bool) -> TableArrays:
        capacity = n_buckets * SLOTS
        stripes = min(self._stripes, n_buckets)
        shapes = {"keys": ((capacity,), np.uint64), "rows": ((capacity, self._storage_width), self._storage_dtype),
                  "stamps": ((capacity,), np.float64), "versions": ((stripes,), np.uint64)}
        arrays = {}
        for part, (shape, dtype) in shapes.items():
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            try:
                mapping = _map(self.directory / f"gen-{generation}.{part}", nbytes, create)
            except SharedMemoryFull:
                self._unlink_generation(generation)  # the parts made so far: no half generation stays
                raise
            if hasattr(mmap, "MADV_HUGEPAGE"):
                try:
                    mapping.madvise(mmap.MADV_HUGEPAGE)
                except OSError:
                    pass  # tmpfs without huge pages: plain pages still work
            arrays[part] = np.frombuffer(mapping, dtype=dtype).reshape(shape)
        return TableArrays(arrays["keys"], arrays["rows"], arrays["stamps"], arrays["versions"], self.max_load_factor,
                       generation)

    def _unlink_generation(self, generation: int) -> None:
        for part in ("keys", "rows", "stamps", "versions"):
            (self.directory / f"gen-{generation}.{part}").unlink(missing_ok=True)

    def close(self) -> None:
        self.release_writer()
        self._lease.close()


def mapping_bytes(pid: int, path_prefix: str, fields=("Private_Clean", "Private_Dirty")) -> int:
    """Sum of ``fields`` (kB in smaps) over the mappings of ``pid`` whose file starts with path_prefix."""
    total_kb, inside = 0, False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's first line
                parts = line.split()
                inside = len(parts) >= 6 and parts[5].startswith(path_prefix)
            elif inside and head[:-1] in fields:
                total_kb += int(line.split()[1])
    return total_kb * 1024
