"""Processes and ports, read from /proc and the socket layer: used by the launcher and the
supervisor, inside the ranker stub (is a lease holder alive?), by the NATS test cluster and by
the benchmarks that split CPU between processes. Linux only, like the rest of the server.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first, as
    fields 3.. of proc(5)), or None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads); 0 if it is gone."""
    fields = proc_stat(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def processes():
    """(pid, state, ppid, pgrp) of every process, from /proc/<pid>/stat."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := proc_stat(int(entry.name))) is not None:
            yield int(entry.name), fields[0], int(fields[1]), int(fields[2])


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    return [pid for pid, state, _, pgrp in processes() if pgrp == pgid and state != "Z"]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS); 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_available_bytes() -> int:
    """MemAvailable of /proc/meminfo: what new allocations can take without swapping (page cache included)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")
