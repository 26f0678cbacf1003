"""BackgroundAppender: a thread owning a segment log writer, so request handlers never wait on disk.

Concurrency: ``submit`` and ``submit_all`` from any number of threads; the
thread alone touches the writer.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from server.streams.log import SegmentLogWriter

__all__ = ["BackgroundAppender"]

log = logging.getLogger(__name__)


class BackgroundAppender:
    """A thread that owns ``writer``, so that request handlers never wait on disk.

    The thread takes everything queued, appends it, calls ``writer.sync()`` once,
    then releases that batch's ``wait=True`` submitters (group commit). At most
    ``max_queue`` records wait, plus one batch being written. Counters (plain
    ints): ``written`` (appended and synced), ``bytes_written`` (their payloads),
    ``shed`` (refused, queue full), ``failed`` (append or the sync after it
    raised; may or may not be in the log). Each accepted submit ends up in
    exactly one of ``written`` and ``failed``.

    ``linger_s`` > 0: the thread waits that long after the first queued record
    before writing, so one append run and one sync cover everything that came
    meanwhile (fewer syncs per record under load); a submitter that waits
    (``wait=True``, ``flush``) or ``close`` ends the wait at once.
    """

    def __init__(self, writer: SegmentLogWriter, *, max_queue: int = 10000, name: str = "log", linger_s: float = 0.0):
        if max_queue < 1:
            raise ValueError(f"max_queue requires >= 1, got {max_queue}")
        if linger_s < 0:
            raise ValueError(f"linger_s requires >= 0, got {linger_s}")
        self._linger_s, self._hurry = linger_s, threading.Event()
        self.name, self._writer, self._max_queue = name, writer, max_queue
        self.written = self.shed = self.failed = self.bytes_written = 0
        self._queue: deque[tuple[int, bytes, list | None]] = deque()  # (sequence, payload, [error] if waited on)
        self._lock = threading.Lock()
        self._nonempty, self._space, self._progress = (threading.Condition(self._lock) for _ in range(3))
        self._submitted = self._completed = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"segment-log-{name}", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Records waiting in the queue, not counting the batch being written."""
        return len(self._queue)

    def submit(self, payload: bytes, *, wait: bool = False, timeout_s: float | None = None) -> bool:
        """Queue one record. If the queue stays full for ``timeout_s`` (None: until
        space), count it in ``shed`` and return False. With ``wait=True``, return once
        the record is appended and synced, or raise the writer's exception."""
        if not wait:
            return self._enqueue(payload, None, timeout_s) is not None
        (outcome,) = self.submit_all([payload], timeout_s=timeout_s)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def submit_all(self, payloads: list[bytes], *, timeout_s: float | None = None) -> list[bool | Exception]:
        """Queues every record, then waits until all are appended and synced:
        one sync can cover them all (group commit across the caller's batch).
        Per record: True (durable), False (shed: the queue stayed full for
        ``timeout_s``) or the writer's exception."""
        tickets = [self._enqueue(payload, [None], timeout_s) for payload in payloads]
        last = max((t[0] for t in tickets if t is not None), default=0)
        with self._lock:
            self._progress.wait_for(lambda: self._completed >= last)
        return [False if t is None else (t[1][0] if t[1][0] is not None else True) for t in tickets]

    def _enqueue(self, payload: bytes, ticket: list | None, timeout_s: float | None) -> tuple[int, list | None] | None:
        """(sequence, ticket) of the queued record, or None if it was shed."""
        if (n := len(payload)) > (limit := self._writer.max_payload_bytes):
            raise ValueError(f"payload of {n} bytes exceeds max_payload_bytes={limit}")
        with self._lock:
            if not self._closed and len(self._queue) >= self._max_queue:
                self._space.wait_for(lambda: self._closed or len(self._queue) < self._max_queue, timeout_s)
            if self._closed:
                raise RuntimeError(f"BackgroundAppender {self.name!r} is closed")
            if len(self._queue) >= self._max_queue:
                self.shed += 1
                return None
            self._submitted += 1
            sequence = self._submitted
            self._queue.append((sequence, payload, ticket))
            self._nonempty.notify()
        if ticket is not None:
            self._hurry.set()
        return sequence, ticket

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything submitted so far is appended and synced; False on timeout."""
        self._hurry.set()
        with self._lock:
            target = self._submitted
            return self._progress.wait_for(lambda: self._completed >= target, timeout_s)

    def close(self) -> None:
        """Flush, stop the thread and close the writer; later submits raise RuntimeError."""
        with self._lock:
            already, self._closed = self._closed, True
            self._nonempty.notify_all()
            self._space.notify_all()
        self._hurry.set()
        self._thread.join()
        if not already:
            self._writer.close()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._nonempty.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
            if self._linger_s:
                self._hurry.wait(self._linger_s)
                self._hurry.clear()
            with self._lock:
                batch = list(self._queue)
                self._queue.clear()
                self._space.notify_all()
            try:
                self._write_batch(batch)
            except BaseException as exc:  # the thread must not die with submitters parked on it
                log.exception("log %r: unexpected error writing a batch of %d records", self.name, len(batch))
                self.failed += len(batch)
                for _, _, ticket in batch:
                    if ticket is not None and ticket[0] is None:
                        ticket[0] = exc
            finally:
                with self._lock:
                    self._completed = batch[-1][0]
                    self._progress.notify_all()

    def _write_batch(self, batch: list[tuple[int, bytes, list | None]]) -> None:
        appended, first_error = [], None
        for _, payload, ticket in batch:
            try:
                self._writer.append(payload)
            except Exception as exc:
                first_error = first_error or exc
                self.failed += 1
                if ticket is not None:
                    ticket[0] = exc
            else:
                appended.append((payload, ticket))
        if first_error is not None:
            failures = len(batch) - len(appended)
            log.error("log %r: %d of %d appends failed, first: %r", self.name, failures, len(batch), first_error)
        try:
            self._writer.sync()
        except Exception as exc:
            log.error("log %r: sync after %d appends failed: %r", self.name, len(appended), exc)
            self.failed += len(appended)
            for _, ticket in appended:
                if ticket is not None:
                    ticket[0] = exc
            return
        self.written += len(appended)
        self.bytes_written += sum(len(payload) for payload, _ in appended)
