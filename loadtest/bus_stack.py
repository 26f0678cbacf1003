"""A scale-out stack on loopback: a NATS JetStream cluster, N serving replicas, one trainer.

Each replica is ``monolith-rt serve --bus ...`` with its own data directory and replica id
(the hosts of a real deployment); the trainer is ``monolith-rt train online --bus ...`` with
its own data directory (its checkpoints and local snapshots). Only the bus joins them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from server.streams.bus import BusConfig
from server.streams.jetstream import JetStreamStreams
from server.streams.nats_cluster import NatsCluster
from server.host.supervisor import ServeProcess


@dataclass
class BusStack:
    root: Path
    cluster: NatsCluster
    servers: list = field(default_factory=list)
    trainers: list = field(default_factory=list)  # subprocess.Popen, newest last

    def bus(self, user: str, replica: str = "r0") -> BusConfig:
        return BusConfig(url=self.cluster.url, credentials=str(self.cluster.credentials(user)), replica=replica)

    def replica_env(self, replica: str) -> dict:
        return {**os.environ, "OMP_NUM_THREADS": "1", **self.bus("replica", replica).to_env()}

    def start_replica(self, name: str, extra_args: tuple[str, ...] = ()) -> ServeProcess:
        """``monolith-rt serve`` as replica ``name`` with ``extra_args`` (e.g. ``--row-dtype int8``)."""
        server = ServeProcess(self.root / name, list(extra_args), env=self.replica_env(name)).start()
        self.servers.append(server)
        return server

    def kill_replica(self, server: ServeProcess) -> None:
        """kill -9 of a whole serving host: tritonserver's group (server and stubs) and serve."""
        os.killpg(server.triton_pid, signal.SIGKILL)
        server.process.kill()
        server.process.wait()
        self.servers.remove(server)

    def start_trainer(self, data_dir: Path | None = None, sync_interval_ms: float = 200.0, window_s: float = 2.0,
                      negative_rate: float = 0.1, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        data_dir = Path(data_dir or self.root / "trainer")
        (data_dir / "logs").mkdir(parents=True, exist_ok=True)
        log = open(data_dir / "logs" / "trainer.log", "ab")
        log_offset = log.tell()  # a restart appends to the same log
        bus = self.bus("trainer")
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "train", "online", "--data-dir", str(data_dir), "--bus", bus.url,
             "--bus-credentials", bus.credentials, "--sync-interval-ms", str(sync_interval_ms),
             "--window-s", str(window_s), "--negative-rate", str(negative_rate), *extra],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        log.close()
        process.data_dir, process.log_offset = data_dir, log_offset
        self.trainers.append(process)
        return process

    def wait_trainer_ready(self, process, timeout_s: float = 90.0) -> None:
        log = process.data_dir / "logs" / "trainer.log"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"trainer exited with code {process.returncode}: {log.read_text()[-2000:]}")
            with open(log, "rb") as f:
                f.seek(process.log_offset)
                if b"online trainer on" in f.read():
                    return
            time.sleep(0.1)
        raise RuntimeError(f"trainer not up after {timeout_s} s: {log.read_text()[-2000:]}")

    def stop_trainer(self, process, timeout_s: float = 60.0) -> int:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def admin(self) -> JetStreamStreams:
        """A trainer-rights connection (close it after use)."""
        return JetStreamStreams(self.root / "admin", self.bus("trainer"))


@contextmanager
def spawn_bus_stack(root: str | Path, replicas: int = 2, nats_nodes: int = 3, trainer: bool = True,
                    **trainer_args):
    """Yields a BusStack with the cluster up, the streams created, ``replicas`` servers ready
    (started two at a time) and, with ``trainer``, the trainer up; stops everything on exit."""
    root = Path(root)
    with ExitStack() as stack:
        cluster = stack.enter_context(NatsCluster(root / "nats", nodes=nats_nodes))
        bus = BusStack(root, cluster)
        admin = bus.admin()
        try:
            admin.ensure_streams()
        finally:
            admin.close()
        stack.callback(lambda: [s.stop() for s in bus.servers])
        stack.callback(lambda: [bus.stop_trainer(p) for p in bus.trainers])
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(bus.start_replica, [f"r{i}" for i in range(replicas)]))
        bus.servers.sort(key=lambda server: server.data_dir.name)  # r0, r1, ... whichever was ready first
        if trainer:
            bus.wait_trainer_ready(bus.start_trainer(**trainer_args))
        yield bus


def served_seq(client) -> int:
    """The delta_seq a replica answers at now (one tiny ranking request)."""
    from server.features import shipped_schema

    user, items = shipped_schema().encode_request({"user_id": 1}, [{"item_id": 1}])
    return client.rank(user, items, request_id=b"seq")[1]


def quiesce_and_compare(stack: BusStack, timeout_s: float = 60.0) -> dict:
    """Stops the trainer (it emits its last records and a snapshot at seq S), waits until every
    replica serves at S, stops them (each writes its own snapshot) and compares each replica's rows
    (FIDs and bytes) and dense weights with the trainer's snapshot, its rows as quantized to the
    replica's row type (``serve --row-dtype``; fp32: the same bytes). Returns {"final_seq",
    "trainer_rows", "replicas_identical", "per_replica": [{"replica", "delta_seq", "rows",
    "fids_differ", "rows_differ", "dense_equal"}]}; dense_equal: the same names, dtypes, shapes and bytes."""
    from server.client import RankerClient
    from server.streams.snapshots import load_latest_snapshot, load_snapshot
    from server.tensor_io import encode_tensors

    for process in stack.trainers:
        stack.stop_trainer(process)
    final = load_latest_snapshot(stack.trainers[0].data_dir)
    for server in stack.servers:
        with RankerClient(server.grpc_url, "grpc") as client:
            deadline = time.monotonic() + timeout_s
            while served_seq(client) < final.delta_seq and time.monotonic() < deadline:
                time.sleep(0.1)
        server.stop()
    trainer_rows = {final.table.row_dtype: _rows(final)}
    per_replica = []
    for server in stack.servers:
        served = load_latest_snapshot(server.data_dir)
        actual = _rows(served) if served is not None else {}
        row_dtype = served.table.row_dtype if served is not None else final.table.row_dtype
        if row_dtype not in trainer_rows:  # the trainer's rows as quantized to the replica's row type
            trainer_rows[row_dtype] = _rows(load_snapshot(final.path, row_dtype))
        expected = trainer_rows[row_dtype]
        per_replica.append({
            "replica": server.data_dir.name, "delta_seq": served.delta_seq if served is not None else 0,
            "rows": len(actual), "fids_differ": len(actual.keys() ^ expected.keys()),
            "rows_differ": sum(actual.get(f) != v for f, v in expected.items()),
            "dense_equal": served is not None
            and encode_tensors(served.dense_state) == encode_tensors(final.dense_state)})
    identical = all(r["delta_seq"] == final.delta_seq and r["fids_differ"] == r["rows_differ"] == 0
                    and r["dense_equal"] for r in per_replica)
    return {"final_seq": final.delta_seq, "trainer_rows": len(final.table), "replicas_identical": identical,
            "per_replica": per_replica}


def _rows(snapshot) -> dict:
    return {f: row.tobytes() for fids, values, _ in snapshot.table.items() for f, row in zip(fids.tolist(), values)}
