"""Starts the real ``tritonserver`` on this project's model repository.

Where things come from:
    binary    --tritonserver PATH, else the one in the nvidia-pytriton wheel
              (pytriton/tritonserver/bin), else ``tritonserver`` on PATH
              (the official container)
    backend   with the wheel's binary: a backend directory is assembled under
              $TMPDIR/monolith-rt-backends-<uid>/ (a path without spaces: the
              stub is started through a shell), symlinking the wheel's libtriton_python.so and the
              Python-backend stub built for *this* interpreter's version
              (symlinks keep the libraries' $ORIGIN rpath working); with any
              other binary, that install's own backends are used
    Python    the stub runs the first ``python3`` on PATH with the libpython
              found on LD_LIBRARY_PATH, so this interpreter's bin/ goes first
              on PATH and its lib/ on LD_LIBRARY_PATH: the models then import
              this package and its dependencies from the same environment

Security defaults: HTTP, gRPC and metrics bind to 127.0.0.1; model control
mode is ``none`` (load/unload requests are refused); the only paths Triton or
the models use come from flags and the environment, never from requests.

One data directory, one server: ``start`` takes the flock
``<data_dir>/server.lock`` (non-blocking) before tritonserver exists, passes
the locked descriptor to tritonserver and closes its own copy, so the lock
lives exactly as long as that tritonserver (and any model stub that inherited
it), whoever started it and however its starter died. A second server on the
same directory is refused at once (DataDirInUse), before it starts anything
or removes anything of the first. Once the recorded holder is dead, the lock
can only be held by model stubs it left behind, which exit within a second
of their server: a claim then waits for them (up to ORPHAN_WAIT_S) instead of
refusing, so a restart right after a crash or a kill -9 goes through. (The ranker's own check at model load,
server.runtime.shared_ranker, still covers a tritonserver started without this class.)
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from server.procs import free_port, group_members, proc_stat, processes

DEFAULT_MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
_READY_POLL_S = 0.1
_LOST_STUB_GRACE_S = 5.0

log = logging.getLogger(__name__)


class TritonStartError(RuntimeError):
    """tritonserver did not become ready; the message carries its log's tail."""


class DataDirInUse(TritonStartError):
    """Another server runs on this data directory (it holds ``<data_dir>/server.lock``)."""


DATA_DIR_LOCK = "server.lock"
ORPHAN_WAIT_S = 5.0


def claim_data_dir(data_dir: Path, orphan_wait_s: float = ORPHAN_WAIT_S) -> int:
    """A descriptor holding the exclusive flock on ``<data_dir>/server.lock``
    (the directory is created if missing); DataDirInUse if another server holds it.
    While the holder recorded in the file is dead, waits up to ``orphan_wait_s``
    for the stubs it left (module docstring)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / DATA_DIR_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + orphan_wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "pid unknown"
            if not _alive(holder) and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            os.close(fd)
            raise DataDirInUse(f"data directory {data_dir} is in use by another server ({holder}, holding {path}): "
                               "one data directory requires one server, got two; stop that server or choose another "
                               "data directory") from None
    _write_holder(fd, f"starter pid {os.getpid()}")
    return fd


def _alive(holder: str) -> bool:
    """Whether the process a lock file names ("tritonserver pid N") still runs; True when it names none."""
    word = holder.rsplit(" ", 1)[-1]
    if not word.isdigit():
        return True
    fields = proc_stat(int(word))
    return fields is not None and fields[0] not in "ZX"


def _write_holder(fd: int, holder: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode() + b"\n", 0)


def _pytriton_root() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def find_tritonserver(explicit: str | os.PathLike | None = None) -> Path:
    """The tritonserver binary to run (see the module docstring for the order)."""
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"--tritonserver {path} is not an executable file")
        return path
    root = _pytriton_root()
    if root is not None:
        return root / "bin" / "tritonserver"
    found = shutil.which("tritonserver")
    if found:
        return Path(found)
    raise FileNotFoundError("no tritonserver: install nvidia-pytriton, put tritonserver on PATH, "
                            "or pass --tritonserver PATH")


def assemble_backend_dir(target: Path | None = None) -> Path | None:
    """Builds <target>/python from the wheel for this interpreter; None when
    the wheel is absent (the binary's own backends apply). The default target
    is a per-user folder under the temp dir, not the data dir: the Python
    backend starts its stub through a shell without quoting, so the stub's
    path must hold no whitespace (a data dir may). Links are replaced
    atomically, so servers starting together can share the folder."""
    root = _pytriton_root()
    if root is None:
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(f"nvidia-pytriton has no Python-backend stub for Python {version} ({stub})")
    if target is None:
        target = Path(tempfile.gettempdir()) / f"monolith-rt-backends-{os.getuid()}" / f"py{version}"
    _require_no_whitespace("the Triton backend directory", target)
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    links = {
        "libtriton_python.so": root / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": root / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub,
    }
    for name, source in links.items():
        link = python_dir / name
        if link.is_symlink() and os.readlink(link) == str(source):
            continue
        temporary = python_dir / f".{name}.{os.getpid()}"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(source)
        os.replace(temporary, link)
    return target


def _require_no_whitespace(what: str, path: Path) -> None:
    if any(c.isspace() for c in str(path)):
        raise ValueError(f"{what} {str(path)!r} contains whitespace; Triton's Python backend starts its stub "
                         "through a shell without quoting, so it requires a path without spaces")


def server_environment(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    libs = [sysconfig.get_config_var("LIBDIR") or ""]
    root = _pytriton_root()
    if root is not None:
        libs.insert(0, str(root.parent.parent / "nvidia_pytriton.libs"))
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    env["MONOLITH_DATA_DIR"] = str(data_dir)
    env.pop("MONOLITH_API_KEY_FILE", None)  # the front checks keys; Triton and the models never see them
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@dataclass
class TritonServer:
    """A tritonserver process: ``with TritonServer(data_dir) as server:`` starts
    it on free loopback ports (or the ones given), waits until ready, and stops
    it on exit. Its log goes to <data_dir>/logs/tritonserver.log."""

    data_dir: Path
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    host: str = "127.0.0.1"
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    tritonserver: str | None = None
    startup_timeout_s: float = 120.0
    extra_args: list[str] = field(default_factory=list)
    grpc_host: str | None = None  # default: host
    process: subprocess.Popen | None = field(default=None, init=False)
    stub_pids: list[int] = field(default_factory=list, init=False)  # model stubs, once ready
    _claim_fd: int | None = field(default=None, init=False, repr=False)  # server.lock, until tritonserver holds it

    def __post_init__(self):
        self.data_dir = Path(self.data_dir).resolve()
        self.model_repository = Path(self.model_repository).resolve()
        self.grpc_host = self.grpc_host or self.host
        self.http_port = self.http_port or free_port(self.host)
        self.grpc_port = self.grpc_port or free_port(self.grpc_host)
        self.metrics_port = self.metrics_port or free_port(self.host)
        self.log_path = self.data_dir / "logs" / "tritonserver.log"
        # "triton_" first: Triton releases since mid-2025 refuse to register shared-memory keys with
        # that prefix through their shared-memory API (README, "Which Triton"); ours would be open otherwise
        self.shm_prefix = f"triton_monolith_{os.getpid()}_{self.http_port}_"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        binary = find_tritonserver(self.tritonserver)
        cmd = [
            str(binary),
            f"--model-repository={self.model_repository}",
            "--model-control-mode=none",
            "--disable-auto-complete-config",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.grpc_host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
            "--metrics-config=summary_latencies=true",  # per-model latency quantiles for the dashboard (server/ops)
            "--pinned-memory-pool-byte-size=0",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        _require_no_whitespace("the model repository", self.model_repository)
        if self.tritonserver is None:
            backends = assemble_backend_dir()
            if backends is not None:
                cmd.append(f"--backend-directory={backends}")
        return cmd + list(self.extra_args)

    def claim_data_dir(self) -> None:
        """Takes ``<data_dir>/server.lock`` now (idempotent), so that a busy data directory is refused
        before anything else happens; ``start`` hands it to tritonserver. Raises DataDirInUse."""
        if self._claim_fd is None:
            self._claim_fd = claim_data_dir(self.data_dir)

    def start(self) -> "TritonServer":
        self.claim_data_dir()
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            cmd = self.command()
            with open(self.log_path, "ab") as log_file:
                self.process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                                env=server_environment(self.data_dir), start_new_session=True,
                                                pass_fds=(self._claim_fd,))
            _write_holder(self._claim_fd, f"tritonserver pid {self.process.pid}")
        finally:
            os.close(self._claim_fd)  # from here on, tritonserver's copy holds the lock
            self._claim_fd = None
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.host}:{self.http_port}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonStartError(f"tritonserver exited with code {self.process.returncode} before it was "
                                       f"ready; last lines of {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if response.status == 200:
                        self.stub_pids = [pid for pid, state, ppid, _ in processes()
                                          if ppid == self.process.pid and state != "Z"]
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(_READY_POLL_S)
        self.stop()
        raise TritonStartError(f"tritonserver not ready after {self.startup_timeout_s:.0f} s; last lines of "
                               f"{self.log_path}:\n{self.log_tail()}")

    def lost_stubs(self) -> list[int]:
        """The model stubs (tritonserver's children once it was ready) that have
        exited since. Triton does not start a stub again: every request to that
        model instance fails ("Stub process ... is not healthy") while the
        server still reports ready."""
        return [pid for pid in self.stub_pids
                if (fields := proc_stat(pid)) is None or fields[0] in "ZX" or int(fields[1]) != self.process.pid]

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (Triton drains and unloads models), then SIGKILL after timeout_s;
        then any process left in its group (a model stub) is killed too."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            if lost := self.lost_stubs():
                # Triton waits for a dead stub's model until its exit timeout (30 s): give the
                # live stubs time to finalize (snapshot, log flush), not the dead one.
                timeout_s = min(timeout_s, _LOST_STUB_GRACE_S)
                log.warning("tritonserver lost stub(s) %s: stopping it with %.0f s of grace", lost, timeout_s)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.process.returncode

    def kill(self, timeout_s: float = 10.0) -> None:
        """SIGKILL the whole process group (server and model stubs, also stubs
        that outlived a dead server), as a crash would, and wait until none is left."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        deadline = time.monotonic() + timeout_s
        while group_members(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._remove_shared_memory()

    def _remove_shared_memory(self) -> None:
        shm = Path("/dev/shm")
        if shm.is_dir():
            for leftover in shm.glob(f"{self.shm_prefix}*"):
                leftover.unlink(missing_ok=True)
        from server.table.shared import shm_directory

        shutil.rmtree(shm_directory(self.data_dir), ignore_errors=True)  # the ranker's shared table

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
