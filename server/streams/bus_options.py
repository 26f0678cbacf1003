"""The ``--bus`` options of ``serve`` and ``train online``, and ``--spawn-nats``.

``configure_bus`` turns the options into a BusConfig and puts it in this process's environment,
where ``open_streams`` (here, in Triton's model processes, in the trainer) finds it. Secrets
never travel on a command line or in the environment: only the paths of the files holding them.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile

__all__ = ["add_bus_options", "configure_bus"]


def add_bus_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bus", default=None,
                        help="where the streams and snapshots live: 'local' (segment files in --data-dir, the "
                        "default) or NATS JetStream servers, nats://h1:4222,nats://h2:4222,nats://h3:4222 "
                        "(default: $MONOLITH_BUS, else local)")
    parser.add_argument("--bus-credentials", default=None,
                        help="file with the NATS user's credentials: two lines, user and password (or a NATS "
                        ".creds file, which needs the nkeys package); mode 0600 (default: $MONOLITH_BUS_CREDENTIALS)")
    parser.add_argument("--bus-tls-ca", default=None, help="CA file to verify the NATS servers with (TLS)")
    parser.add_argument("--bus-tls-cert", default=None, help="client certificate for NATS TLS (with --bus-tls-key)")
    parser.add_argument("--bus-tls-key", default=None, help="client key for NATS TLS (with --bus-tls-cert)")
    parser.add_argument("--replica-id", default=None,
                        help="this serving host's name in the log subjects and metrics, [A-Za-z0-9_-] "
                        "(default: $MONOLITH_REPLICA_ID, else r0)")
    parser.add_argument("--spawn-nats", action="store_true",
                        help="start a 3-node NATS JetStream cluster on loopback for this process's lifetime "
                        "(about 1 s; auth on; its URL and credentials files are printed) and use it as --bus")


def configure_bus(args: argparse.Namespace, role: str):
    """The bus the options name (``role``: "replica" or "trainer", whose credentials --spawn-nats uses),
    exported to the environment of this process and its children. Raises BusError for an unusable
    credentials or TLS file, ValueError for a malformed option."""
    from server.streams.bus import BusConfig

    env = BusConfig.from_env()
    if args.spawn_nats:
        url, credentials = _spawn(role)
    else:
        url, credentials = args.bus or env.url, args.bus_credentials or env.credentials
    bus = BusConfig(url=url, credentials=credentials, tls_ca=args.bus_tls_ca or env.tls_ca,
                    tls_cert=args.bus_tls_cert or env.tls_cert, tls_key=args.bus_tls_key or env.tls_key,
                    replica=args.replica_id or env.replica)
    if not bus.local:
        bus.connect_options()  # reads the credentials and TLS files now: a bad one is refused before anything starts
    os.environ.update(bus.to_env())
    return bus


def _spawn(role: str) -> tuple[str, str]:
    from server.streams.bus import BusConfig
    from server.streams.jetstream import JetStreamStreams
    from server.streams.nats_cluster import NatsCluster

    cluster = NatsCluster(tempfile.mkdtemp(prefix="monolith-nats-")).start()
    atexit.register(shutil.rmtree, cluster.root, ignore_errors=True)  # runs after stop (last in, first out)
    atexit.register(cluster.stop)
    admin = JetStreamStreams(cluster.root / "admin", BusConfig(url=cluster.url,
                                                               credentials=str(cluster.credentials("trainer"))))
    try:
        admin.ensure_streams()
    finally:
        admin.close()
    print(f"spawned NATS JetStream cluster: --bus {cluster.url} (credentials: trainer "
          f"{cluster.credentials('trainer')}, replica {cluster.credentials('replica')})", file=sys.stderr, flush=True)
    return cluster.url, str(cluster.credentials(role))
