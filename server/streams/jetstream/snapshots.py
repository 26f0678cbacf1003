"""Snapshots on JetStream: an object store of snapshot directories and a pointer to the newest.

    object store monolith_snapshots   "snapshot-<seq:020d>": a tar of the snapshot directory
    key-value monolith_pointers["snapshot"] -> the newest {"seq", "object", "sha256", "bytes",
                                    "position"}   (position: the stream sequence of the first DELTAS
                                    message after the snapshot)

The trainer publishes (upload, then move the pointer, then delete objects beyond ``keep``); the
pointer moves only forward and only for the lease holder: the holder is read from the lease entry
before the upload and before the pointer write, and the write is a compare-and-set on the entry's
revision that refuses a seq at or below the pointer's (FencedError), so a trainer paused past its
lease (a zombie) can never point new replicas at an older snapshot than the stream retains; a
replica fetches the newest into its data directory before it loads (checked against the
pointer's SHA-256, and the tar must hold plain files only), so a late or lagging replica joins
from the snapshot plus the retained deltas.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import nats.js.errors

from server.streams.bus import BusError, FencedError
from server.streams.jetstream.client import POINTER_BUCKET, POINTER_KEY, SNAPSHOT_BUCKET
from server.streams.jetstream.deltas import position_of
from server.streams.snapshots import atomic_directory, list_snapshots, snapshot_root

if TYPE_CHECKING:
    from server.streams.jetstream.streams import JetStreamStreams

log = logging.getLogger(__name__)


class SnapshotStore:
    """The snapshot objects and their pointer, through one ``JetStreamStreams`` connection."""

    def __init__(self, streams: JetStreamStreams):
        self._streams = streams
        self._uploaded: list[str] = []  # snapshot objects this process wrote (and older ones it found), oldest first

    def publish(self, directory: Path, seq: int, keep: int = 2, lease=None) -> dict:
        """Uploads a snapshot directory to the object store, then points the key-value entry at it;
        older objects beyond ``keep`` are deleted. Returns the pointer. With ``lease`` (the delta
        writer's TrainerLease), only while it is held; the pointer only ever moves forward (module
        docstring). Raises FencedError when either fence refuses."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for child in sorted(Path(directory).iterdir()):
                tar.add(child, arcname=child.name)
        data = buffer.getvalue()
        name = f"snapshot-{int(seq):020d}"

        async def upload():
            kv = await self._streams.js.key_value(POINTER_BUCKET)
            await self._forward(kv, seq, lease)
            store = await self._streams.js.object_store(SNAPSHOT_BUCKET)
            await store.put(name, data)
            position, _ = await position_of(self._streams, seq + 1)
            pointer = {"seq": int(seq), "object": name, "sha256": hashlib.sha256(data).hexdigest(),
                       "bytes": len(data), "position": position}
            if not self._uploaded:  # the newest before this process's first upload
                previous = await self._read_pointer(kv)
                self._uploaded += [previous["object"]] if previous else []
            while True:  # compare-and-set on the entry's revision: forward only, holder only
                revision = await self._forward(kv, seq, lease)
                try:
                    if revision is None:
                        await kv.create(POINTER_KEY, json.dumps(pointer).encode())
                    else:
                        await kv.update(POINTER_KEY, json.dumps(pointer).encode(), last=revision)
                    break
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue  # moved meanwhile: judge the new value
            self._uploaded.append(name)
            while len(self._uploaded) > max(keep, 1):
                try:
                    await store.delete(self._uploaded[0])
                except Exception as exc:  # gone already: nothing to keep track of
                    log.warning("snapshot store: deleting %s: %r", self._uploaded[0], exc)
                del self._uploaded[0]
            return pointer
        return self._streams.run(upload(), 120.0)

    @staticmethod
    async def _forward(kv, seq: int, lease) -> int | None:
        """The pointer entry's revision (None: no entry), once the lease (if any) is confirmed held and the
        pointer is behind ``seq``; raises FencedError otherwise."""
        if lease is not None:
            await lease.confirm()
        try:
            entry = await kv.get(POINTER_KEY)
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None:  # deleted or purged
            return entry.revision
        current = json.loads(entry.value)["seq"]
        if current >= seq:
            raise FencedError(f"snapshot pointer: the bus points at seq {current}, this trainer's snapshot is at seq "
                              f"{seq}: the pointer only moves forward (a trainer paused past its lease?); not moved")
        return entry.revision

    @staticmethod
    async def _read_pointer(kv) -> dict | None:
        try:
            entry = await kv.get(POINTER_KEY)
        except nats.js.errors.KeyNotFoundError:
            return None
        return json.loads(entry.value)

    def pointer(self) -> dict | None:
        async def read():
            return await self._read_pointer(await self._streams.js.key_value(POINTER_BUCKET))
        return self._streams.run(read(), 20.0)

    def fetch(self) -> Path | None:
        """Downloads the newest snapshot named by the pointer into ``data_dir``/snapshots/<seq>, unless
        a local snapshot is at least as new; returns the directory written, or None. A download whose
        SHA-256 differs from the pointer's, or a tar holding anything but plain files, is refused."""
        pointer = self.pointer()
        if pointer is None:
            return None
        local = list_snapshots(self._streams.data_dir)
        if local and int(local[-1].name) >= pointer["seq"]:
            return None

        async def download():
            store = await self._streams.js.object_store(SNAPSHOT_BUCKET)
            return (await store.get(pointer["object"])).data
        data = self._streams.run(download(), 120.0)
        digest = hashlib.sha256(data).hexdigest()
        if digest != pointer["sha256"]:
            raise BusError(f"snapshot {pointer['object']}: SHA-256 {digest}, the pointer requires "
                           f"{pointer['sha256']}: not loaded")
        final = snapshot_root(self._streams.data_dir) / f"{int(pointer['seq']):020d}"
        try:
            unpack(pointer["object"], data, final)
        except OSError:
            if not final.is_dir():  # else another instance of this server fetched it meanwhile
                raise
        log.info("fetched snapshot %s (seq %d, %d bytes) from the bus", pointer["object"], pointer["seq"], len(data))
        return final

    def seqs(self) -> list[int]:
        """The seqs of the snapshots the object store holds, oldest first (a rollback's bases)."""
        async def names():
            store = await self._streams.js.object_store(SNAPSHOT_BUCKET)
            try:
                return [info.name for info in await store.list(ignore_deletes=True) if not info.deleted]
            except nats.js.errors.NotFoundError:  # no object yet
                return []
        return sorted(int(n[len("snapshot-"):]) for n in self._streams.run(names(), 20.0)
                      if n.startswith("snapshot-") and n[len("snapshot-"):].isdigit())

    def download(self, seq: int, final: Path) -> Path:
        """The snapshot at ``seq`` from the object store into the directory ``final`` (written whole or not
        at all); raises BusError when the store does not hold it (deleted meanwhile) or it is not plain files."""
        name = f"snapshot-{int(seq):020d}"

        async def get():
            store = await self._streams.js.object_store(SNAPSHOT_BUCKET)
            return (await store.get(name)).data
        try:
            data = self._streams.run(get(), 120.0)
        except nats.js.errors.NotFoundError as exc:
            raise BusError(f"snapshot {name} is no longer in the object store {SNAPSHOT_BUCKET}") from exc
        unpack(name, data, Path(final))
        return Path(final)


def unpack(name: str, data: bytes, final: Path) -> None:
    """A snapshot tar into ``final`` (atomically); raises BusError when it holds anything but plain files."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        bad = [m.name for m in members if not m.isfile() or "/" in m.name or m.name.startswith(".")]
        if bad:
            raise BusError(f"snapshot {name} holds entries that are not plain files: {bad}")
        with atomic_directory(final) as tmp:
            for member in members:
                (tmp / member.name).write_bytes(tar.extractfile(member).read())
