"""A whole local stack on loopback: `monolith-rt serve` (fronts + supervised tritonserver) + the online trainer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from server.host.supervisor import ServeProcess


@contextmanager
def spawn_stack(data_dir: str | Path, sync_interval_ms: float = 200.0, window_s: float = 30.0,
                negative_rate: float = 0.1, trainer: bool = True, trainer_args: tuple[str, ...] = (),
                serve_args: tuple[str, ...] = ()):
    """Yields (server, trainer_process or None); stops both on exit (the
    trainer with SIGTERM, so it writes its snapshot and checkpoint)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    process = None
    with ServeProcess(data_dir, list(serve_args)) as server:
        if trainer:
            log = open(data_dir / "logs" / "trainer.log", "ab")
            process = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "train", "online", "--data-dir", str(data_dir),
                 "--sync-interval-ms", str(sync_interval_ms), "--window-s", str(window_s),
                 "--negative-rate", str(negative_rate), *trainer_args],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
            log.close()
        try:
            yield server, process
        finally:
            if process is not None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def wait_trainer_ready(data_dir: Path, process, timeout_s: float = 60.0) -> None:
    """The trainer holds the delta stream's writer lock once it is up."""
    log = Path(data_dir) / "logs" / "trainer.log"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"trainer exited with code {process.returncode}: {log.read_text()[-2000:]}")
        if log.exists() and "online trainer on" in log.read_text():
            return
        time.sleep(0.1)
    raise RuntimeError(f"trainer not up after {timeout_s} s")


class Target(NamedTuple):
    url: str
    data_dir: Path | None  # the spawned server's (None for a given URL)
    metrics_url: str | None  # the spawned server's (None for a given URL)


def target_url(stack, url: str | None, protocol: str, label: str, prepare=None) -> Target:
    """``url`` as given, or the address of a server spawned on a temporary
    data dir (stopped when ``stack``, an ExitStack, closes; ``prepare``, if
    given, is called with the data dir before the server starts)."""
    if url is not None:
        return Target(url, None, None)
    data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"monolith-{label}-")))
    if prepare is not None:
        prepare(data_dir)
    print(f"[{label}] starting monolith-rt serve", file=sys.stderr, flush=True)
    server = stack.enter_context(ServeProcess(data_dir))
    return Target(server.grpc_url if protocol == "grpc" else server.http_url, data_dir, server.metrics_url)


def read_metric(metrics_url: str, name: str, model: str = "ranker") -> float:
    """The sum of a Prometheus metric over the instances of ``model``."""
    import urllib.request

    total, seen = 0.0, False
    for line in urllib.request.urlopen(metrics_url, timeout=5).read().decode().splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    if not seen:
        raise ValueError(f"metric {name} of model {model} is not exported at {metrics_url}")
    return total
