"""A network partition, not a crash: the three NATS nodes run as separate hosts (one network
namespace each, joined by veth pairs to a bridge in this test's namespace, where the writers
run), one node is cut off (its link down) under traffic, then healed.

Checks: every feedback record JetStream acknowledged is in the stream after the heal; the
delta stream holds exactly the records the trainer's writer had acknowledged, in order, and a
replica's reader gets them all; all three nodes hold the same last sequence of both streams
(the cut-off node caught up). Skipped, saying why, where namespaces cannot be made (not root,
no ``ip``). The serving replicas here are the replicas' stream clients in this process, not
Triton (tests/e2e/test_scale_out.py runs Triton replicas through node crashes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import numpy as np
import pytest

from server.streams import FEEDBACK
from server.streams.bus import BusConfig, BusError
from server.streams.jetstream import JetStreamStreams
from server.streams.nats_cluster import NatsCluster
from server.streams.records import FeedbackRecord
from server.streams.deltas import DeltaRecord

SUBNET = "10.214.{}.{}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def hosts():
    """Three namespaces mrt<pid>n1..n3 at 10.214.<k>.11-13, bridged to this namespace (10.214.<k>.1)."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("the partition test needs root and iproute2 (ip netns, veth) to make its own hosts")
    tag, k = f"mrt{os.getpid() % 100000}", os.getpid() % 250 + 1
    bridge, names = f"{tag}br", [f"{tag}n{i}" for i in (1, 2, 3)]
    try:
        _ip("link", "add", bridge, "type", "bridge")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a bridge here ({exc.stderr.strip()}): network namespaces unavailable")
    try:
        _ip("addr", "add", f"{SUBNET.format(k, 1)}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, ns in enumerate(names, start=1):
            _ip("netns", "add", ns)
            _ip("link", "add", f"{ns}h", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", f"{ns}h", "master", bridge, "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET.format(k, 10 + i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield [SUBNET.format(k, 10 + i) for i in (1, 2, 3)], names
    finally:
        for ns in names:
            subprocess.run(["ip", "link", "del", f"{ns}h"], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def _last_seqs(cluster: NatsCluster, index: int) -> dict:
    out = {}
    for account in cluster.jsz(index).get("account_details", []):
        for stream in account.get("stream_detail", []):
            out[stream["name"]] = stream["state"]["last_seq"]
    return out


def _leader(streams: JetStreamStreams, timeout_s: float = 20.0) -> str:
    """The delta stream's leader (JetStream answers 503 while it elects one)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            leader = streams.run(streams.js.stream_info("MONOLITH_DELTAS")).cluster.leader
            if leader:
                return leader
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def test_cut_off_node_loses_no_acknowledged_record_and_catches_up(tmp_path, hosts):
    ips, names = hosts
    rng = np.random.default_rng(7)
    with NatsCluster(tmp_path / "nats", hosts=ips, netns=names) as cluster:
        def bus(user, replica="p0"):
            return BusConfig(url=cluster.url, credentials=str(cluster.credentials(user)), replica=replica)
        trainer = JetStreamStreams(tmp_path / "trainer", bus("trainer"))
        replica = JetStreamStreams(tmp_path / "replica", bus("replica"))
        try:
            trainer.ensure_streams()
            deltas = trainer.open_delta_writer()
            feedback = replica.open_writer(FEEDBACK, "feedback_0")
            acked, written = set(), []

            def traffic(batches: int, start: int) -> None:
                for b in range(start, start + batches):
                    ids = [f"p{b}-{i}".encode() for i in range(20)]
                    for rid in ids:
                        feedback.append(FeedbackRecord(rid, 1.0, 1.0, np.array([7], np.uint64),
                                                       np.ones(1, np.float32)).encode())
                    try:
                        feedback.sync()
                        acked.update(ids)
                    except BusError:
                        pass  # not acknowledged: a caller would have got an error
                    record = DeltaRecord.sparse(deltas.next_seq, time.time(), rng.integers(1, 2**62, 30, dtype=np.uint64),
                                                rng.standard_normal((30, 8)).astype(np.float32))
                    deltas.append(record)  # waits out the failover (or raises, failing the test)
                    written.append(record)
                    time.sleep(0.05)

            traffic(10, 0)
            # Cut off the delta stream's leader: a new one must be elected under traffic, and
            # clients connected to it must notice a silent link (no reset) and fail over.
            leader = _leader(trainer)
            cut = int(leader[1:]) - 1
            _ip("link", "set", f"{names[cut]}h", "down")
            with pytest.raises(OSError):
                cluster.jsz(cut)  # really unreachable
            traffic(30, 100)
            assert _leader(trainer) != leader
            _ip("link", "set", f"{names[cut]}h", "up")
            traffic(10, 200)

            reader = trainer.open_reader(FEEDBACK, "p0.feedback_0")
            got, deadline = set(), time.monotonic() + 30
            while not acked <= got and time.monotonic() < deadline:
                got |= {FeedbackRecord.decode(p).request_id for _, p in reader.read()}
                time.sleep(0.05)
            reader.close()
            assert len(acked) >= 800, f"only {len(acked)} of 1000 records acknowledged"
            assert acked <= got, f"{len(acked - got)} acknowledged records lost"

            follower = replica.open_delta_reader(0)
            seen, deadline = [], time.monotonic() + 30
            while len(seen) < len(written) and time.monotonic() < deadline:
                seen += follower.read()
                time.sleep(0.02)
            follower.close()
            assert [r.seq for r in seen] == [r.seq for r in written]
            assert all(a.values.tobytes() == b.values.tobytes() for a, b in zip(seen, written))

            deadline = time.monotonic() + 30
            while True:  # the healed node caught up: every node holds the same stream ends
                views = [_last_seqs(cluster, i) for i in range(3)]
                ends = [(v.get("MONOLITH_DELTAS"), v.get("MONOLITH_FEEDBACK")) for v in views]
                if len(set(ends)) == 1 and ends[0][0] is not None:
                    break
                assert time.monotonic() < deadline, f"nodes disagree after the heal: {ends}"
                time.sleep(0.2)
            deltas.close()
        finally:
            replica.close()
            trainer.close()
