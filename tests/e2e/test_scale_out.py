"""Scale-out on NATS JetStream with the real things: a 3-node nats-server cluster (auth on),
Triton replicas (``monolith-rt serve --bus``), the trainer (``monolith-rt train online --bus``).

One long scenario (starting Triton is the expensive part) and one trainer-only test:
  * traffic on two replicas; kill -9 of one NATS node under traffic (no acknowledged feedback
    lost, replicas keep applying, freshness recovers); kill -9 of a replica and a restart (it
    catches up from the object-store snapshot + the stream); a third replica started after
    retention dropped the early deltas joins from a snapshot; after quiescing, every replica's
    table equals the trainer's serving rows byte for byte, and the dense weights match.
  * a second trainer started while the first runs is fenced; the first keeps writing.
Partitions (network namespaces, a node cut off under traffic): tests/e2e/test_partition.py.
"""

from __future__ import annotations

import json
import time

import numpy as np

from loadtest.bus_stack import quiesce_and_compare, served_seq, spawn_bus_stack
from loadtest.freshness import probe_once
from server.client import RankerClient
from server.features import shipped_schema
from server.streams.snapshots import list_snapshots, load_latest_snapshot
from server.streams import FEATURES, FEEDBACK
from server.streams.records import FeatureRecord, FeedbackRecord

SCHEMA = shipped_schema()


def drive(clients, requests: int, rng, acked: set, start: int = 0) -> None:
    """``requests`` ranking requests round-robin over ``clients`` (10 candidates from a pool of
    200,000 items, users from a million); a click on one candidate for every second request.
    The request ids of acknowledged feedback go into ``acked``."""
    for k in range(start, start + requests):
        client = clients[k % len(clients)]
        user, items = SCHEMA.encode_request({"user_id": int(rng.integers(1, 1_000_000)), "hour": k % 24},
                                            [{"item_id": int(i)} for i in rng.integers(1, 200_000, 10)])
        rid = f"t{k}".encode()
        try:
            client.rank(user, items, request_id=rid)
            if k % 2 == 0:
                client.feedback(rid, items[:1, 0], [1.0])
                acked.add(rid)
        except Exception as exc:  # e.g. while a NATS node is down: not acknowledged, not counted
            print(f"request {k}: {exc!r}")


def read_feedback_ids(stack) -> set:
    admin = stack.admin()
    try:
        got = set()
        for instance in admin.instances(FEEDBACK):
            reader = admin.open_reader(FEEDBACK, instance)
            deadline = time.monotonic() + 20
            total = admin.run(admin.js.stream_info("MONOLITH_FEEDBACK", subjects_filter=">")).state.subjects[
                f"monolith.feedback.{instance}"]
            seen = 0
            while seen < total and time.monotonic() < deadline:
                batch = reader.read()
                seen += len(batch)
                got |= {FeedbackRecord.decode(p).request_id for _, p in batch}
                time.sleep(0.01)
            reader.close()
        return got
    finally:
        admin.close()


def test_replicas_survive_node_and_replica_kills_and_converge_byte_for_byte(tmp_path):
    rng = np.random.default_rng(14)
    acked: set = set()
    with spawn_bus_stack(tmp_path, replicas=2, sync_interval_ms=200, window_s=1.0, negative_rate=0.1,
                         extra=("--snapshot-interval-s", "2", "--dense-interval-s", "3")) as stack:
        r0, r1 = stack.servers
        trainer = stack.trainers[0]
        c0, c1 = RankerClient(r0.grpc_url, "grpc"), RankerClient(r1.grpc_url, "grpc")
        drive([c0, c1], 120, rng, acked)
        assert probe_once(c0, SCHEMA, 0, timeout_s=10) is not None, "no freshness before the faults"

        # kill -9 of one NATS node under traffic: both replicas keep applying.
        stack.cluster.kill(1)
        seqs = served_seq(c0), served_seq(c1)
        drive([c0, c1], 120, rng, acked, start=1000)
        fresh = probe_once(c1, SCHEMA, 1, timeout_s=15)
        assert fresh is not None, "freshness did not recover with one NATS node down"
        deadline, k = time.monotonic() + 15, 1500
        while not (served_seq(c0) > seqs[0] and served_seq(c1) > seqs[1]):
            assert time.monotonic() < deadline, "a replica stopped applying"
            drive([c0, c1], 4, rng, acked, start=k)
            k += 4
            time.sleep(0.2)
        stack.cluster.start_node(1)

        # kill -9 of replica r1; traffic on r0 until retention has dropped the first deltas.
        stack.kill_replica(r1)
        c1.close()
        admin = stack.admin()
        deadline = time.monotonic() + 60
        k = 2000
        while admin.run(admin.js.stream_info("MONOLITH_DELTAS")).state.first_seq <= 1:
            assert time.monotonic() < deadline, "retention never dropped the first deltas"
            drive([c0], 20, rng, acked, start=k)
            k += 20
        admin.close()
        r1 = stack.start_replica("r1")  # the same data dir, no local snapshot: object store + stream
        # A late replica, its first deltas gone from the stream, serving int8 rows: the trainer's fp32 snapshot
        # and deltas quantized on the way in, and compared with the trainer's rows as quantized.
        r2 = stack.start_replica("r2", ("--row-dtype", "int8"))
        c1, c2 = RankerClient(r1.grpc_url, "grpc"), RankerClient(r2.grpc_url, "grpc")
        assert list_snapshots(r2.data_dir), "the late replica did not start from a snapshot"
        drive([c0, c1, c2], 90, rng, acked, start=5000)

        # Quiesce: the trainer stops (final sparse + dense records and a snapshot at seq S).
        time.sleep(2.5)  # the join window closes on the last impressions
        for client in (c0, c1, c2):
            client.close()
        result = quiesce_and_compare(stack)
        assert trainer.returncode == 0
        assert result["trainer_rows"] > 200  # admission keeps only IDs seen often enough
        assert [r["replica"] for r in result["per_replica"]] == ["r0", "r1", "r2"]
        assert result["replicas_identical"], result
        assert load_latest_snapshot(r2.data_dir).table.row_dtype == "int8"  # r2 served, and kept, int8 rows
        got = read_feedback_ids(stack)
        assert acked <= got, f"{len(acked - got)} acknowledged feedback records missing from the stream"
        checkpoint = sorted((trainer.data_dir / "trainer").iterdir())[-1]
        positions = json.loads((checkpoint / "meta.json").read_text())["positions"]
        for replica in ("r0", "r1", "r2"):  # the trainer read every replica's logs
            assert any(key.startswith(f"{FEATURES}/{replica}.") for key in positions), positions


def test_second_trainer_is_fenced_and_the_first_keeps_writing(tmp_path):
    with spawn_bus_stack(tmp_path, replicas=0, sync_interval_ms=100, window_s=0.5, negative_rate=0.1) as stack:
        first = stack.trainers[0]
        replica = stack.bus("replica", "rF")
        from server.streams.jetstream import JetStreamStreams

        logs = JetStreamStreams(tmp_path / "rF", replica)
        features, feedback = logs.open_writer(FEATURES, "ranker_0"), logs.open_writer(FEEDBACK, "feedback_0")

        def feed(n: int, start: int) -> None:
            for k in range(start, start + n):
                rid = f"f{k}".encode()
                user, items = SCHEMA.encode_request({"user_id": k}, [{"item_id": k * 3 + c} for c in range(3)])
                now = time.time()
                features.append(FeatureRecord(rid, now, 0, user, items, np.full(3, 0.5, np.float32)).encode())
                feedback.append(FeedbackRecord(rid, now, now, items[:1, 0].copy(), np.ones(1, np.float32)).encode())
            features.sync()
            feedback.sync()

        admin = stack.admin()

        def head() -> int:
            return admin.delta_head()[0]
        try:
            feed(50, 0)
            deadline = time.monotonic() + 30
            while head() == 0:
                assert time.monotonic() < deadline, "the first trainer wrote no delta"
                time.sleep(0.1)
            second = stack.start_trainer(tmp_path / "trainer2", sync_interval_ms=100, window_s=0.5)
            for k in range(8):  # the first keeps writing while the second tries
                feed(20, 1000 + 20 * k)
                time.sleep(0.3)
            assert second.wait(60) == 4
            log = (second.data_dir / "logs" / "trainer.log").read_text()
            assert "holds the lease" in log, log[-2000:]
            before = head()
            feed(40, 5000)
            deadline = time.monotonic() + 20
            while head() <= before:
                assert time.monotonic() < deadline, "the first trainer stopped writing"
                time.sleep(0.1)
            assert first.poll() is None
            # No record of the second interleaved: seqs are 1..head, each written by one writer id.
            reader = admin.open_delta_reader(0)
            seqs = []
            deadline = time.monotonic() + 20
            while len(seqs) < head() and time.monotonic() < deadline:
                seqs += [r.seq for r in reader.read()]
            reader.close()
            assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= head() - 1
        finally:
            admin.close()
            logs.close()
