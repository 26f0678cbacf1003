"""``monolith-rt serve``: the fronts callers reach, and a supervised tritonserver behind them.

    callers ──HTTP──▶ HttpFront    (host:http_port)    ─┐
            ──gRPC──▶ GrpcFront    (host:grpc_port)    ─┼─▶ tritonserver on 127.0.0.1 private ports
            ──HTTP──▶ MetricsFront (host:metrics_port) ─┘   (its /metrics + the front's and supervisor's)

Supervision: when tritonserver exits without being asked to (crash, OOM
kill, kill -9), or one of its model stubs does (Triton would keep that model
instance failing every request while reporting ready), its whole process group is killed and reaped (no model stub
outlives it: this process is the stubs' child subreaper, and each stub also
exits on its own when its parent goes, see server.runtime.triton_adapter), then it
is started again after a backoff (0.5 s, doubling, at most 10 s). A start
loads the newest snapshot and replays the delta stream, so it serves at the
same or a newer delta_seq; acknowledged feedback is already on disk. More
than ``max_restarts`` exits within ``restart_window_s`` means something is
wrong that restarting will not fix: serve gives up and exits 3. SIGINT or
SIGTERM stops everything cleanly (exit 0). While tritonserver restarts, the
fronts stay up and answer 503 / UNAVAILABLE (health says not ready).

Everything runs on one asyncio loop (uvloop) in this process; starting
tritonserver (which blocks until it is ready) runs on an executor thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.front.auth import load_api_key
from server.front.grpc import GrpcFront
from server.front.http import HttpFront, MetricsFront
from server.front.validate import FrontLimits
from server.host.launcher import DEFAULT_MODEL_REPOSITORY, TritonServer, TritonStartError
from server.procs import free_port, processes

log = logging.getLogger(__name__)

EXIT_GAVE_UP = 3
_POLL_S = 0.2
_PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class RestartPolicy:
    """Backoff between restarts, and when to give up."""

    max_restarts: int = 5
    window_s: float = 300.0
    first_backoff_s: float = 0.5
    max_backoff_s: float = 10.0

    def __post_init__(self):
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts requires >= 0, got {self.max_restarts}")
        if not 0 < self.first_backoff_s <= self.max_backoff_s:
            raise ValueError(f"requires 0 < first_backoff_s <= max_backoff_s, got {self.first_backoff_s}, "
                             f"{self.max_backoff_s}")

    def backoff_s(self, recent_exits: int) -> float:
        return min(self.max_backoff_s, self.first_backoff_s * 2 ** max(0, recent_exits - 1))


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``monolith-rt serve`` takes; validated once, here."""

    data_dir: Path
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    tritonserver: str | None = None
    startup_timeout_s: float = 120.0
    api_key_file: Path | None = None
    limits: FrontLimits = field(default_factory=FrontLimits)
    restarts: RestartPolicy = field(default_factory=RestartPolicy)
    grpc_direct: bool = False

    def __post_init__(self):
        if self.grpc_direct and self.api_key_file is not None:
            raise ValueError("--grpc-direct cannot check API keys (Triton would need the key on its command line); "
                             "drop one of --grpc-direct and --api-key-file")
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} requires 0..65535 (0 = a free port), got {port}")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s requires > 0, got {self.startup_timeout_s}")


@dataclass
class SupervisorStats:
    restarts: int = 0
    last_exit_code: int | None = None
    stub_exits: int = 0


def become_subreaper() -> None:
    """Orphaned descendants (model stubs whose tritonserver died) are re-parented
    to this process instead of init, so we can see and reap them."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("cannot become a child subreaper; orphaned stubs are reaped by init")


def reap_orphans(keep: int | None) -> None:
    """Reaps exited children that were re-parented to us (stubs), leaving
    ``keep`` (tritonserver, whose exit status Popen must collect) alone."""
    me = os.getpid()
    for pid, state, ppid, _ in processes():
        if state == "Z" and ppid == me and pid != keep:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


class Supervisor:
    """Runs the fronts and keeps tritonserver running (see the module docstring)."""

    def __init__(self, config: ServeConfig, announce=print):
        self.config = config
        self.stats = SupervisorStats()
        self._announce = announce
        self._api_key = load_api_key(config.api_key_file)
        self._stopping = asyncio.Event()
        self.triton = self._new_triton()
        self.triton.claim_data_dir()  # a data directory another server uses is refused here, before any start
        limits = config.limits
        self.http = HttpFront("127.0.0.1", self.triton.http_port, limits, self._api_key)
        self.grpc = GrpcFront(self.triton.grpc_url, limits, self._api_key, stats=self.http.stats,
                              in_flight=self.http.in_flight)
        self.metrics = MetricsFront("127.0.0.1", self.triton.metrics_port, self._metrics_text)
        self.ports: dict[str, int] = {}

    def _new_triton(self) -> TritonServer:
        config = self.config
        grpc_host, grpc_port = (config.host, config.grpc_port or free_port(config.host)) if config.grpc_direct \
            else ("127.0.0.1", free_port())
        return TritonServer(config.data_dir, config.model_repository, host="127.0.0.1", grpc_host=grpc_host,
                            http_port=free_port(), grpc_port=grpc_port, metrics_port=free_port(),
                            tritonserver=config.tritonserver, startup_timeout_s=config.startup_timeout_s)

    def _metrics_text(self) -> bytes:
        from server.front.metrics import exposition
        from server.streams.usage import exposition as disk_exposition

        return exposition(self.http.stats, self.stats) + disk_exposition(self.config.data_dir)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        become_subreaper()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        await loop.run_in_executor(None, self.triton.start)
        config = self.config
        self.ports = {
            "http": await self.http.start(config.host, config.http_port),
            "grpc": self.triton.grpc_port if config.grpc_direct else await self.grpc.start(config.host, config.grpc_port),
            "metrics": await self.metrics.start(config.host, config.metrics_port),
        }
        self._announce(self.describe())
        try:
            return await self._supervise()
        finally:
            await self.http.close()
            await self.grpc.close()
            await self.metrics.close()
            await loop.run_in_executor(None, self.triton.stop)
            reap_orphans(keep=None)

    def describe(self) -> str:
        host, triton = self.config.host, self.triton
        return (f"ready\n  HTTP         http://{host}:{self.ports['http']}\n  gRPC         {host}:{self.ports['grpc']}\n"
                f"  metrics      http://{host}:{self.ports['metrics']}/metrics\n"
                f"  triton-http  {triton.http_url} (private: unchecked, for benchmarks only)\n"
                f"  triton-grpc  {triton.grpc_url} ({'public: --grpc-direct' if self.config.grpc_direct else 'private'})\n"
                f"  triton-pid   {triton.process.pid}\n"
                f"  data         {triton.data_dir}\n"
                f"  API key      {'required' if self._api_key is not None else 'off'}")

    def _suspects(self) -> str:
        """The requests Triton had when it died (server.front.inflight), for the crash's log line."""
        lines = self.http.in_flight.suspects()
        if not lines:
            return "\nno request was in flight through the fronts"
        shown = "".join(f"\n  {line}" for line in lines[:20])
        more = f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else ""
        return f"\nrequests in flight through the fronts ({len(lines)}):{shown}{more}"

    async def _supervise(self) -> int:
        loop = asyncio.get_running_loop()
        exits: list[float] = []
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), _POLL_S)
                return 0
            except asyncio.TimeoutError:
                pass
            code = self.triton.process.poll()
            if code is None:
                lost = self.triton.lost_stubs()
                if not lost:
                    continue
                self.stats.stub_exits += 1
                log.error("model stub(s) %s of tritonserver exited; Triton does not start them again (the model "
                          "would fail every request): restarting tritonserver; last lines of its log:\n%s%s",
                          lost, self.triton.log_tail(10), self._suspects())
            else:
                self.stats.last_exit_code = code
                log.error("tritonserver exited with code %s; last lines of its log:\n%s%s", code,
                          self.triton.log_tail(10), self._suspects())
            now = time.monotonic()
            exits = [t for t in exits if now - t < self.config.restarts.window_s] + [now]
            await loop.run_in_executor(None, self.triton.kill)
            reap_orphans(keep=None)
            if len(exits) > self.config.restarts.max_restarts:
                log.error("tritonserver failed %d times within %.0f s: giving up (see %s)", len(exits),
                          self.config.restarts.window_s, self.triton.log_path)
                return EXIT_GAVE_UP
            backoff_s = self.config.restarts.backoff_s(len(exits))
            log.warning("restarting tritonserver in %.1f s (restart %d)", backoff_s, self.stats.restarts + 1)
            try:
                await asyncio.wait_for(self._stopping.wait(), backoff_s)
                return 0
            except asyncio.TimeoutError:
                pass
            try:
                await loop.run_in_executor(None, self.triton.start)
            except (TritonStartError, OSError) as exc:
                log.error("restart failed: %s", exc)
                continue  # counted as another exit on the next pass
            self.stats.restarts += 1
            log.warning("tritonserver restarted (pid %d, restart %d)", self.triton.process.pid, self.stats.restarts)


@dataclass
class ServeProcess:
    """``monolith-rt serve`` as a child process on free ports (tests, load tests, the demo):
    ``with ServeProcess(data_dir) as serve:`` starts it and waits for "ready";
    ``serve.http_url``, ``grpc_url``, ``metrics_url`` are the fronts,
    ``triton_http_url`` / ``triton_grpc_url`` Triton's private ports (no
    checks: benchmarks only), ``triton_pid`` its pid at start."""

    data_dir: Path
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 180.0
    env: dict | None = None
    process: object = field(default=None, init=False)
    urls: dict = field(default_factory=dict, init=False)

    def start(self) -> "ServeProcess":
        import subprocess
        import sys

        self.data_dir = Path(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = self.data_dir / "serve.stderr"
        cmd = [sys.executable, "-m", "server.cli", "serve", "--data-dir", str(self.data_dir), "--http-port", "0",
               "--grpc-port", "0", "--metrics-port", "0", *self.extra_args]
        with open(self.stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                            env=self.env, cwd=Path(__file__).resolve().parents[2])
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            parts = line.split()
            if len(parts) >= 2 and parts[0] in ("HTTP", "gRPC", "metrics", "triton-http", "triton-grpc"):
                self.urls[parts[0]] = parts[1].removeprefix("http://")
            if len(parts) == 2 and parts[0] == "triton-pid":
                self.triton_pid = int(parts[1])
            if parts and parts[0] == "API":
                return self
        self.stop()
        raise RuntimeError(f"monolith-rt serve did not become ready; see {self.stderr_path}:\n"
                           + self.stderr_path.read_text(errors="replace")[-3000:])

    @property
    def http_url(self) -> str:
        return self.urls["HTTP"]

    @property
    def grpc_url(self) -> str:
        return self.urls["gRPC"]

    @property
    def metrics_url(self) -> str:
        return "http://" + self.urls["metrics"]

    @property
    def triton_http_url(self) -> str:
        return self.urls["triton-http"]

    @property
    def triton_grpc_url(self) -> str:
        return self.urls["triton-grpc"]

    def stop(self, timeout_s: float = 60.0) -> int | None:
        import subprocess

        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "ServeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
