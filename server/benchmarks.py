"""What every ``bench`` command shares (each benchmark module, ``<what>_bench.py``, sits beside the
code it measures and compares it with a baseline in the same run).
"""

from __future__ import annotations

import subprocess
import sys


def progress(tag: str, message: str) -> None:
    """A benchmark's progress line on stderr ("[bench table] ..."), so stdout stays its result."""
    print(f"[{tag}] {message}", file=sys.stderr, flush=True)


class BusyCores:
    """``n`` processes spinning on the CPU while the block runs: the other work of a serving host
    (Triton, the fronts, other instances) that a benchmark's threads wait behind."""

    def __init__(self, n: int):
        self._n, self._procs = n, []

    def __enter__(self):
        self._procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self._n)]
        return self

    def __exit__(self, *exc):
        for proc in self._procs:
            proc.kill()
            proc.wait()
