"""Waking a log's reader when its writer (in any process) appends, instead of polling.

A ``DirectoryWatch`` holds one Linux inotify descriptor watching directories
of segment logs for a write, a new file or a rename into them (IN_MODIFY,
IN_CREATE, IN_MOVED_TO). ``wait(timeout_s)`` blocks in ``select`` until one
of them happens or the timeout passes, so an idle reader costs one wake-up
per timeout, and a record that lands ends the wait at once.

No lost wake-up: events queue in the descriptor from the moment a directory
is watched, so the rule for a reader is "watch, then read until empty, then
wait"; a record appended between the empty read and the wait is already an
event. A wake-up may be spurious (an event the last read already covered):
callers read again and find nothing, which costs one read.

Where inotify is unavailable (not Linux, or the watch limit reached), ``wait``
sleeps for the timeout: the reader polls as it did before, never misses.
Not thread-safe: one watch per reading thread.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import time
from pathlib import Path

log = logging.getLogger(__name__)

IN_MODIFY, IN_MOVED_TO, IN_CREATE = 0x2, 0x80, 0x100
_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000
_MASK = IN_MODIFY | IN_MOVED_TO | IN_CREATE


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1, libc.inotify_add_watch  # noqa: B018 (present on Linux only)
        return libc
    except (OSError, AttributeError):
        return None


class DirectoryWatch:
    """Wakes when any of the watched directories changes (module docstring).

    Args:
        directories: the directories to watch; one that does not exist yet is skipped (``add`` it later).
    """

    def __init__(self, directories=()):
        self._libc = _libc()
        self._fd = -1
        self._watched: set[Path] = set()
        if self._libc is not None:
            fd = self._libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd < 0:
                log.warning("inotify unavailable (%s): log readers poll", os.strerror(ctypes.get_errno()))
            self._fd = fd
        for directory in directories:
            self.add(directory)

    @property
    def active(self) -> bool:
        """True when ``wait`` wakes on a change (else it only sleeps)."""
        return self._fd >= 0

    @property
    def watching(self) -> int:
        """How many directories are watched."""
        return len(self._watched)

    def add(self, directory) -> bool:
        """Watches ``directory`` too; False if it does not exist (or cannot be watched)."""
        directory = Path(directory)
        if directory in self._watched:
            return True
        if self._fd < 0 or not directory.is_dir():
            return False
        if self._libc.inotify_add_watch(self._fd, os.fsencode(directory), _MASK) < 0:
            code = ctypes.get_errno()
            log.warning("cannot watch %s (%s): its reader polls", directory, os.strerror(code))
            if code == errno.ENOSPC:  # the watch limit: stop trying, every wait becomes a sleep
                self.close()
            return False
        self._watched.add(directory)
        return True

    def wait(self, timeout_s: float) -> bool:
        """Blocks until a watched directory changes (True) or ``timeout_s`` passes (False)."""
        if self._fd < 0:
            time.sleep(max(0.0, timeout_s))
            return False
        ready, _, _ = select.select([self._fd], [], [], max(0.0, timeout_s))
        if not ready:
            return False
        try:
            while os.read(self._fd, 65536):
                pass
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "DirectoryWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LogsWatch:
    """Wakes when any log under ``roots`` (one directory per instance, server.streams.local) is appended to;
    an instance's directory created later is watched from the wake-up its creation causes."""

    def __init__(self, roots):
        self._roots = [Path(r) for r in roots]
        self._watch = DirectoryWatch()
        self._refresh()

    def _refresh(self) -> None:
        for root in self._roots:
            if self._watch.add(root):
                for directory in root.iterdir():
                    if directory.is_dir():
                        self._watch.add(directory)

    @property
    def active(self) -> bool:
        return self._watch.active

    def wait(self, timeout_s: float) -> bool:
        """Blocks until a log may hold a new record (True) or ``timeout_s`` passes (False)."""
        woke = self._watch.wait(timeout_s)
        if woke or self._watch.watching < len(self._roots):
            self._refresh()
        return woke

    def close(self) -> None:
        self._watch.close()
