"""One ranker state per server, shared by all of its ranker instances.

Triton starts one stub process per ranker instance (``instance_group.count``).
With the model parameter ``shared_table`` (the default) they share, through
one ``SharedEmbeddingTable`` in ``shm_directory(data_dir)``:

    table                  the embedding rows (their bytes exist once)
    user[DELTA_SEQ]        the delta_seq the table and dense weights reflect
    user[DENSE_VERSION]    version of blob "dense" (the dense weights), +1 per publish
    user[SERVER_PID]       the tritonserver this table belongs to
    user[SNAPSHOT_SEQ]     the seq of the snapshot the table was created from

Who does what:
    * setup (under the flock ``<data_dir>/shared-table.lock``): the server's
      identity is its tritonserver (the stub's parent) pid and start time,
      hashed, stored as the table's owner. The first instance of a server
      finds no table of its owner, removes any leftover of another (a crashed
      server; refused while that server is still alive) and creates one from
      the newest snapshot; later instances attach. Every instance holds
      ``members.lock`` shared while it lives.
    * exactly one instance holds the writer lease and runs the DeltaApplier;
      the others retry the lease every ``LEASE_RETRY_S``. A takeover (the
      kernel frees the lease when the holder dies) repairs the table
      (``acquire_writer``) and resumes after user[DELTA_SEQ]: the record that
      was in flight is applied again (absolute values, idempotent).
    * the writer writes user[DELTA_SEQ] only once a record is wholly applied,
      and publishes dense weights as blob then DENSE_VERSION, before the
      record's DELTA_SEQ.
    * a reader loads a new dense version on its follower thread (off the
      request path). A batch reads DELTA_SEQ, then DENSE_VERSION; if the
      version is newer than its dense module (the follower has not caught up)
      the batch loads it first, so a response stamped S always reflects the
      dense weights of every record up to S. The blob is the dense state's
      server.tensor_io bytes; it decodes to numpy arrays, as the writer's.
    * close: the writer writes the serving snapshot; the last instance out
      (``members.lock`` taken exclusive) removes the directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import threading
from pathlib import Path

from server.dense import fit_dense_state, initial_dense_state
from server.procs import proc_stat
from server.runtime.ranker import RankerRuntime
from server.table.cuckoo import SLOTS
from server.table.shared import FileLock, SharedEmbeddingTable, shm_directory
from server.streams.snapshots import list_snapshots, load_latest_snapshot, write_snapshot
from server.table import EmbeddingTable
from server.tensor_io import decode_tensors, encode_tensors

log = logging.getLogger(__name__)

DELTA_SEQ, DENSE_VERSION, SERVER_PID, SNAPSHOT_SEQ = range(4)
DENSE_BLOB = "dense"
LEASE_RETRY_S = 0.5
FOLLOW_INTERVAL_S = 0.05  # dense loads are rare; a batch that sees a newer version first loads it itself


def process_identity(pid: int) -> int | None:
    """A 63-bit id of process ``pid`` (pid + start time: a reused pid differs), None if it is gone: exited,
    or a zombie (dead, not yet reaped: a tritonserver killed with its ``serve`` stays one until init reaps it)."""
    fields = proc_stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    start_ticks = fields[19]
    digest = hashlib.sha256(f"{pid}:{start_ticks}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1 or 1


def _locked(path: Path, mode: int) -> FileLock:
    lock = FileLock(path)
    lock.acquire(mode=mode)
    return lock


class SharedRankerRuntime(RankerRuntime):
    """A RankerRuntime whose table, delta_seq and dense weights live in the
    server's shared table (see the module docstring). ``server_pid``: the
    tritonserver whose instances share it (default: this process's parent)."""

    def __init__(self, schema, data_dir, instance: str, make_applier=None, server_pid: int | None = None,
                 shm_root: Path | None = None, row_dtype: str = "fp32"):
        self._server_pid = os.getppid() if server_pid is None else server_pid
        self._shm_root = shm_root
        self._stop = threading.Event()
        self._dense_lock = threading.Lock()
        self._follower = None
        super().__init__(schema, data_dir, instance, make_applier, row_dtype)

    # ------------------------------------------------------------------ setup

    def _load_state(self) -> None:
        data_dir = Path(self.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        directory = shm_directory(data_dir) if self._shm_root is None else shm_directory(data_dir, self._shm_root)
        owner = process_identity(self._server_pid)
        if owner is None:
            raise RuntimeError(f"shared table requires a live tritonserver (pid {self._server_pid}), found none")
        setup = _locked(data_dir / "shared-table.lock", fcntl.LOCK_EX)
        try:
            table = self._attach(directory, owner)
            created = table is None
            if created:
                table = self._create(directory, owner)
            self._members = _locked(directory / "members.lock", fcntl.LOCK_SH)
        finally:
            setup.close()
        self._shared = table
        self._user = table.user
        self._dense_version = -1
        self._dense = None
        self._load_dense()
        self._snapshot_seq = int(self._user[SNAPSHOT_SEQ])
        role = "created" if created else "attached to"
        self.startup_message = (f"{role} shared table {directory}: {len(table)} rows ({table.row_dtype}), "
                                f"delta_seq {self.delta_seq}, "
                                f"writer: {'this instance' if table.is_writer else 'another instance'}"
                                + (f" ({self._created_from})" if created else ""))

    def _attach(self, directory: Path, owner: int) -> SharedEmbeddingTable | None:
        """The table of this server if there is a complete one; removes a leftover of another."""
        if not directory.exists():
            return None
        try:
            table = SharedEmbeddingTable.attach(directory, timeout_s=0.0)
        except (OSError, ValueError, TimeoutError) as exc:  # a creator died mid-way: incomplete
            log.warning("removing incomplete shared table %s (%s)", directory, exc)
            SharedEmbeddingTable.remove(directory)
            return None
        if table.owner == owner:
            if table.row_dtype != self.row_dtype:
                table.close()
                raise RuntimeError(f"shared table {directory} stores {table.row_dtype} rows, this instance requires "
                                   f"{self.row_dtype}: every instance of one server requires the same row_dtype")
            table.acquire_writer()
            return table
        other_pid = int(table.user[SERVER_PID])
        table.close()
        if process_identity(other_pid) == table.owner:
            raise RuntimeError(f"shared table {directory} belongs to tritonserver pid {other_pid}, still running: "
                               f"one data directory requires one server, got two")
        log.warning("removing shared table %s left by tritonserver pid %d (gone)", directory, other_pid)
        SharedEmbeddingTable.remove(directory)
        return None

    def _create(self, directory: Path, owner: int) -> SharedEmbeddingTable:
        schema = self.schema
        snapshot = load_latest_snapshot(self.data_dir, self.row_dtype)
        if snapshot is not None and snapshot.table.dim != schema.dim:
            raise ValueError(f"snapshot {snapshot.path} has dim {snapshot.table.dim}, schema requires {schema.dim}")
        table = SharedEmbeddingTable.create(directory, schema.dim, owner=owner, row_dtype=self.row_dtype)
        user = table.user
        user[SERVER_PID] = self._server_pid
        if snapshot is None:
            dense_state, seq = initial_dense_state(schema.num_fields, schema.dim, schema.dense), 0
            self._created_from = (f"no snapshot in {self.data_dir / 'snapshots'}: empty table, dense weights "
                                  f"initialised from seed {schema.dense.get('seed', 0)}")
        else:
            _replace_rows(table, snapshot.table)
            dense_state = fit_dense_state(snapshot.dense_state, schema.num_fields, schema.dim, schema.dense)
            seq = snapshot.delta_seq
            self._created_from = f"from snapshot {snapshot.path}"
        table.publish_blob(DENSE_BLOB, 1, encode_tensors(dense_state))
        user[DENSE_VERSION] = 1
        user[DELTA_SEQ] = user[SNAPSHOT_SEQ] = seq
        table.mark_ready()
        return table

    # ------------------------------------------------- state the applier drives

    @property
    def table(self) -> SharedEmbeddingTable:
        return self._shared

    @table.setter
    def table(self, other: EmbeddingTable) -> None:
        """The applier's snapshot reload: the rows of ``other`` replace the shared ones."""
        _replace_rows(self._shared, other)

    @property
    def delta_seq(self) -> int:
        return int(self._user[DELTA_SEQ])

    @delta_seq.setter
    def delta_seq(self, seq: int) -> None:
        self._user[DELTA_SEQ] = seq

    @property
    def dense(self):
        return self._dense

    @dense.setter
    def dense(self, state) -> None:
        """Writer: publishes the weights (blob, then version), then serves them."""
        with self._dense_lock:
            version = int(self._user[DENSE_VERSION]) + 1
            self._shared.publish_blob(DENSE_BLOB, version, encode_tensors(state))
            self._user[DENSE_VERSION] = version
            self._dense, self._dense_version = state, version

    def _load_dense(self):
        """The dense state of the newest published version (loaded if newer than ours)."""
        with self._dense_lock:
            while (version := int(self._user[DENSE_VERSION])) != self._dense_version:
                blob = self._shared.read_blob(DENSE_BLOB, version)
                if blob is None:
                    continue  # a newer version replaced it meanwhile
                self._dense, self._dense_version = decode_tensors(blob), version
            return self._dense

    def _serving_state(self):
        seq = int(self._user[DELTA_SEQ])
        if int(self._user[DENSE_VERSION]) != self._dense_version:
            return seq, self._load_dense()
        return seq, self._dense

    # ------------------------------------------------------ writer and follower

    def _start_updater(self) -> None:
        if self._shared.is_writer:
            self.updater.catch_up()  # before Triton calls this instance ready
            self.updater.start()
        self._follower = threading.Thread(target=self._follow, name="shared-follower", daemon=True)
        self._follower.start()

    def _follow(self) -> None:
        """Loads new dense weights; retries the writer lease until it holds it."""
        ticks_per_retry = max(1, round(LEASE_RETRY_S / FOLLOW_INTERVAL_S))
        tick = 0
        while not self._stop.wait(FOLLOW_INTERVAL_S):
            try:
                if int(self._user[DENSE_VERSION]) != self._dense_version:
                    self._load_dense()
                tick += 1
                if not self._shared.is_writer and tick % ticks_per_retry == 0 and self._shared.acquire_writer():
                    log.warning("took over the writer lease of %s at delta_seq %d", self._shared.directory,
                                self.delta_seq)
                    self.updater.start()
            except Exception as exc:  # never die silently: the next tick tries again
                log.error("shared table follower: %r", exc)

    # ------------------------------------------------------------------ close

    def close(self, snapshot: bool = True) -> Path | None:
        self._stop.set()
        if self._follower is not None:
            self._follower.join(2.0)
        if self.updater is not None:
            self.updater.stop()
        self.feature_log.close()
        self.streams.close()
        written = None
        setup = _locked(self.data_dir / "shared-table.lock", fcntl.LOCK_EX)
        try:
            table = self._shared
            seq = self.delta_seq
            if snapshot and table.is_writer and seq > self._snapshot_seq and not any(
                p.name == f"{seq:020d}" for p in list_snapshots(self.data_dir)
            ):
                written = write_snapshot(self.data_dir, table, self._dense, seq)
                log.info("wrote serving snapshot %s at delta_seq %d", written, seq)
            table.close()
            if self._members.acquire(blocking=False):  # the last instance of this server
                SharedEmbeddingTable.remove(table.directory)
            self._members.close()
        finally:
            setup.close()
        return written


def _replace_rows(table: SharedEmbeddingTable, other: EmbeddingTable) -> None:
    """Writer: a new generation holding exactly the rows of ``other`` (of the same row type), published in one
    step."""
    if other.row_dtype != table.row_dtype:
        raise ValueError(f"replacing the rows of a {table.row_dtype} shared table requires {table.row_dtype} rows, "
                         f"got {other.row_dtype}")
    with table._write_lock:
        source = other._state
        new = table._rehashed(source, max(2, source.keys.shape[0] // SLOTS))
        table._state = new
        table._count = len(other)
        table._newest_stamp = other.newest_stamp
    for array in (new.keys, new.rows, new.stamps):
        _drop_pages(array)


def _drop_pages(array) -> None:
    """Unmaps this process's pages of a shared mapping (the data stays in the
    file): a writer that filled a whole generation then holds only the pages it
    reads again, like every other instance, not a private-looking copy."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    if base is not None:
        base.madvise(mmap.MADV_DONTNEED)
