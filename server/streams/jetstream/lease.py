"""The trainer lease: one writer of the delta stream at a time.

The holder creates a key-value entry (``monolith_lease``/trainer) that expires LEASE_TTL_S after
its last write, and rewrites it every LEASE_TTL_S / 4 with an expected revision; a second trainer
finds it held and refuses to start (after waiting a TTL for a dead holder's entry to expire).
The lease alone leaves a race (a paused holder that lost its lease without knowing); the delta
writer's expected last sequence on every publish closes it (server.streams.jetstream.deltas).
``fenced`` says why this holder must write nothing more, once it must not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import nats
import nats.js.errors

from server.streams.names import DELTAS
from server.streams.bus import BusError, FencedError
from server.streams.jetstream.client import LEASE_BUCKET, LEASE_KEY, LEASE_TTL_S, STREAM_NAMES

if TYPE_CHECKING:
    from server.streams.jetstream.streams import JetStreamStreams

log = logging.getLogger(__name__)


class TrainerLease:
    """Holds the lease for ``holder`` from construction until ``release``; raises FencedError at
    construction if another trainer still holds it after ``wait_s``."""

    def __init__(self, streams: JetStreamStreams, holder: str, wait_s: float = LEASE_TTL_S + 2):
        self._streams = streams
        self.holder = holder
        self.fenced: str | None = None
        self._heartbeat = None
        streams.run(self._acquire(wait_s), wait_s + 30)

    async def _acquire(self, wait_s: float) -> None:
        kv = await self._streams.js.key_value(LEASE_BUCKET)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                revision = await kv.create(LEASE_KEY, self.holder.encode())
                break
            except (asyncio.TimeoutError, nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError) as exc:
                if time.monotonic() >= deadline:  # the bus did not answer (a failover): not a verdict
                    raise BusError(f"trainer lease: no answer from the bus within {wait_s:.0f} s: {exc!r}") from exc
            except nats.js.errors.KeyWrongLastSequenceError:
                if time.monotonic() >= deadline:
                    try:
                        holder = (await kv.get(LEASE_KEY)).value.decode()
                    except Exception:
                        holder = "?"
                    raise FencedError(f"another trainer ({holder}) holds the lease on the delta stream "
                                      f"{STREAM_NAMES[DELTAS]}: refusing to write (a lease expires {LEASE_TTL_S:.0f} s "
                                      f"after its holder stops; waited {wait_s:.0f} s)") from None
                await asyncio.sleep(0.5)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat(kv, revision))

    async def _beat(self, kv, revision: int) -> None:
        while not self.fenced:
            await asyncio.sleep(LEASE_TTL_S / 4)
            try:
                revision = await kv.update(LEASE_KEY, self.holder.encode(), last=revision)
                continue
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            except Exception as exc:  # a transient bus failure: the next beat tries again
                log.warning("trainer lease refresh failed: %r", exc)
                continue
            try:  # it expired (refreshes lost in a failover) and nobody took it: take it again; the
                # expected last sequence on every publish still refuses us if another writer wrote since
                revision = await kv.create(LEASE_KEY, self.holder.encode())
                log.warning("trainer lease had expired (refreshes lost to the bus); taken again")
            except nats.js.errors.KeyWrongLastSequenceError:
                self.fenced = (f"the trainer lease on the delta stream {STREAM_NAMES[DELTAS]} was taken by another "
                               f"trainer after it expired (this trainer, {self.holder}, was paused or cut off past "
                               f"{LEASE_TTL_S:.0f} s): this trainer stops")
                log.error("%s", self.fenced)
            except Exception as exc:
                log.warning("trainer lease: taking it again failed: %r", exc)

    async def confirm(self) -> None:
        """Raises FencedError unless the bus says this holder holds the lease now (read, not remembered):
        a holder paused past the TTL (GC, SIGSTOP, a slow disk) learns it lost the lease before it moves
        the snapshot pointer or purges."""
        if self.fenced:
            raise FencedError(self.fenced)
        kv = await self._streams.js.key_value(LEASE_BUCKET)
        try:
            holder = (await kv.get(LEASE_KEY)).value
        except nats.js.errors.KeyNotFoundError:
            holder = None
        if holder != self.holder.encode():
            self.fenced = (f"the trainer lease on the delta stream {STREAM_NAMES[DELTAS]} is held by "
                           f"{holder.decode() if holder else 'nobody'}, not this trainer ({self.holder}; paused or "
                           f"cut off past {LEASE_TTL_S:.0f} s): it moves no snapshot pointer and purges nothing")
            raise FencedError(self.fenced)

    def release(self) -> None:
        """Gives the lease up (a successor need not wait for it to expire)."""
        if self._heartbeat is None:
            return
        heartbeat, self._heartbeat = self._heartbeat, None

        async def release():
            heartbeat.cancel()
            if not self.fenced:
                kv = await self._streams.js.key_value(LEASE_BUCKET)
                entry = await kv.get(LEASE_KEY)
                if entry.value == self.holder.encode():
                    await kv.purge(LEASE_KEY)
        try:
            self._streams.run(release(), 10.0)
        except Exception as exc:
            log.warning("releasing the trainer lease: %r", exc)
