"""The JetStream backend against a real 3-node nats-server cluster with auth on: delta stream
fencing, dedup, chunking, corruption; logs with checksums; snapshots through the object store;
permissions. (The servers and trainer on the bus: tests/e2e/test_scale_out.py.)"""

from __future__ import annotations

import time
import zlib

import numpy as np
import pytest

from server.streams.snapshots import load_latest_snapshot, write_snapshot
from server.streams import FEEDBACK
from server.streams.jetstream import (DELTA_SUBJECT, BusConfig, BusError, FencedError, JetStreamStreams,
                                      frame_records)
from server.streams.nats_cluster import NatsCluster
from server.streams.records import FeedbackRecord
from server.table import EmbeddingTable
from server.streams.deltas import DeltaError, DeltaRecord

MAX_PAYLOAD = 64 << 10  # small, so that realistic dense records are split into parts


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with NatsCluster(tmp_path_factory.mktemp("nats"), max_payload=MAX_PAYLOAD) as c:
        admin = JetStreamStreams(tmp_path_factory.mktemp("admin"), bus(c, "trainer"))
        admin.ensure_streams(duplicate_window_s=1.0)  # short, so a test can replay past it
        admin.close()
        yield c


def bus(cluster: NatsCluster, user: str, replica: str = "r0") -> BusConfig:
    return BusConfig(url=cluster.url, credentials=str(cluster.credentials(user)), replica=replica)


@pytest.fixture
def streams(cluster, tmp_path):
    opened = []

    def open_(user: str = "trainer", replica: str = "r0", sub: str = "d") -> JetStreamStreams:
        s = JetStreamStreams(tmp_path / f"{sub}{len(opened)}", bus(cluster, user, replica))
        opened.append(s)
        return s
    yield open_
    for s in opened:
        s.close()


def purge_deltas(trainer: JetStreamStreams) -> None:
    trainer.run(trainer.js.purge_stream("MONOLITH_DELTAS"))


def sparse(seq: int, rng, rows: int = 50, dim: int = 8) -> DeltaRecord:
    fids = rng.integers(1, 2**62, rows, dtype=np.uint64)
    return DeltaRecord.sparse(seq, time.time(), fids, rng.standard_normal((rows, dim)).astype(np.float32))


def read_all(reader, expect: int, timeout_s: float = 10.0) -> list:
    out, deadline = [], time.monotonic() + timeout_s
    while len(out) < expect and time.monotonic() < deadline:
        out += reader.read()
        time.sleep(0.01)
    return out


def test_deltas_round_trip_with_parts_and_the_second_writer_is_fenced(streams, rng):
    trainer = streams()
    purge_deltas(trainer)
    writer = trainer.open_delta_writer()
    first = writer.next_seq
    # 240 KB: split into 4+ parts at a 64 KiB max payload
    dense = {"w": np.random.default_rng(0).standard_normal((300, 200), dtype=np.float32)}
    records = [sparse(first, rng), DeltaRecord.dense(first + 1, time.time(), dense), sparse(first + 2, rng)]
    for record in records:
        writer.append(record)
    reader = streams("replica").open_delta_reader(first - 1)
    got = read_all(reader, 3)
    assert [r.seq for r in got] == [first, first + 1, first + 2]
    assert got[0].fids.tobytes() == records[0].fids.tobytes() and got[0].values.tobytes() == records[0].values.tobytes()
    assert got[1].dense_state["w"].tobytes() == dense["w"].tobytes()
    parts = trainer.run(trainer.js.stream_info("MONOLITH_DELTAS")).state.messages
    assert parts >= 6

    # A second trainer cannot start while the first holds the lease ...
    with pytest.raises(FencedError, match="holds the lease"):
        streams().open_delta_writer(lease_wait_s=0.5)
    # ... and when the first was paused past its lease (a zombie), the second takes over and the
    # zombie's next publish is refused by the expected last sequence.
    writer.lease._heartbeat.cancel()  # paused: its lease lapses
    trainer.run(_purge_lease(trainer))
    second = streams().open_delta_writer(lease_wait_s=0.5)
    assert second.next_seq == first + 3
    second.append(sparse(first + 3, rng))
    with pytest.raises(FencedError, match="another writer published"):
        writer.append(sparse(first + 3, rng))
    with pytest.raises(FencedError):  # and stays fenced
        writer.append(sparse(first + 4, rng))
    second.append(sparse(first + 4, rng))
    got = read_all(reader, 2)
    assert [r.seq for r in got] == [first + 3, first + 4]  # nothing of the fenced writer interleaved
    reader.close()
    # A reader starting in the middle finds its place by binary search over the retained stream.
    middle = streams("replica").open_delta_reader(first + 1)
    assert [r.seq for r in read_all(middle, 3)] == [first + 2, first + 3, first + 4]
    middle.close()
    second.close()


async def _purge_lease(streams):
    kv = await streams.js.key_value("monolith_lease")
    await kv.purge("trainer")


def test_retry_is_deduplicated_and_corrupt_or_duplicate_records_are_never_applied(streams, rng):
    trainer = streams()
    purge_deltas(trainer)
    writer = trainer.open_delta_writer()
    seq = writer.next_seq
    good = sparse(seq, rng).encode()
    headers = {"Nats-Msg-Id": "retry-1", "Mrt-Seq": str(seq), "Mrt-Part": "0", "Mrt-Parts": "1",
               "Mrt-Crc": f"{zlib.crc32(good):08x}"}
    acks = [trainer.run(trainer.js.publish(DELTA_SUBJECT, good, headers=dict(headers))) for _ in range(2)]
    assert acks[1].duplicate and acks[1].seq == acks[0].seq  # the retry landed once
    # The same record again under another id (a replay): counted and skipped, not applied twice.
    trainer.run(trainer.js.publish(DELTA_SUBJECT, good, headers={**headers, "Nats-Msg-Id": "replay"}))
    # Then a record whose bytes were changed after its checksum was taken.
    bad = bytearray(sparse(seq + 1, rng).encode())
    crc = f"{zlib.crc32(bytes(bad)):08x}"
    bad[60] ^= 0xFF
    trainer.run(trainer.js.publish(DELTA_SUBJECT, bytes(bad), headers={
        "Nats-Msg-Id": "bad", "Mrt-Seq": str(seq + 1), "Mrt-Part": "0", "Mrt-Parts": "1", "Mrt-Crc": crc}))
    reader = streams("replica").open_delta_reader(seq - 1)
    got = read_all(reader, 1)
    assert [r.seq for r in got] == [seq]
    deadline = time.monotonic() + 10
    with pytest.raises(DeltaError, match="checksum"):
        while time.monotonic() < deadline:
            assert reader.read() == []  # the replay is skipped; the corrupt record raises
            time.sleep(0.01)
    assert reader.duplicates == 1
    with pytest.raises(DeltaError):  # sticky: nothing after it is applied either
        reader.read()
    reader.close()
    # A gap (a record missing) is refused too.
    purge_deltas(trainer)
    writer.close()
    writer = trainer.open_delta_writer()
    start = writer.next_seq
    writer.append(sparse(start, rng))
    writer.next_seq += 1  # as if seq start+1 had been lost
    writer.append(sparse(start + 2, rng))
    reader = streams("replica").open_delta_reader(start - 1)
    assert [r.seq for r in read_all(reader, 1)] == [start]
    with pytest.raises(DeltaError, match="gap"):
        read_all(reader, 1)
    reader.close()
    writer.close()


def test_replica_credentials_cannot_publish_a_delta_nor_purge(streams, rng):
    replica = streams("replica")
    manager = replica.nc.jsm(timeout=1.0)
    with pytest.raises(Exception):
        replica.run(replica.js.publish(DELTA_SUBJECT, sparse(1, rng).encode(), timeout=1.0))
    with pytest.raises(Exception):
        replica.run(manager.purge_stream("MONOLITH_DELTAS"))
    with pytest.raises(Exception):
        replica.run(manager.delete_stream("MONOLITH_DELTAS"))
    deadline = time.monotonic() + 5
    while len(replica.errors) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 'permissions violation for publish to "monolith.deltas"' in replica.errors[0]
    assert all("permissions violation" in e for e in replica.errors)
    trainer = streams()
    assert trainer.run(trainer.js.stream_info("MONOLITH_DELTAS")).config.name == "MONOLITH_DELTAS"
    # ... and the trainer may not write the replicas' logs.
    with pytest.raises(Exception):
        trainer.run(trainer.js.publish("monolith.feedback.r9.x", b"x", timeout=1.0))


def test_logs_publish_per_replica_and_skip_corrupt_or_duplicate_messages(streams, rng):
    replica = streams("replica", replica="rA")
    writer = replica.open_writer(FEEDBACK, "feedback_0")
    records = [FeedbackRecord(f"q{i}".encode(), 1.0 + i, 2.0 + i, np.array([i + 1], np.uint64),
                              np.array([1.0], np.float32)) for i in range(20)]
    for half in (records[:10], records[10:]):  # two groups: two messages of 10 records
        for r in half:
            writer.append(r.encode())
        writer.sync()  # returns once JetStream acknowledged them
    with pytest.raises(ValueError, match="max payload"):
        writer.append(b"x" * MAX_PAYLOAD)
    trainer = streams()
    subject = replica.subject(FEEDBACK, "rA.feedback_0")
    payload = frame_records([records[0].encode()])
    # Injected through a replica's connection (the trainer may not publish to the logs):
    replica.run(replica.js.publish(subject, payload, headers={"Nats-Msg-Id": "forged", "Mrt-Crc": "deadbeef"}))
    for _ in range(2):  # a replay past the stream's dedup window (1 s here): same id, a new stream seq
        ack = replica.run(replica.js.publish(subject, payload, headers={"Nats-Msg-Id": "again",
                                                                        "Mrt-Crc": f"{zlib.crc32(payload):08x}"}))
        assert not ack.duplicate
        time.sleep(1.2)
    assert "rA.feedback_0" in trainer.instances(FEEDBACK)
    reader = trainer.open_reader(FEEDBACK, "rA.feedback_0")
    got = read_all(reader, 21)
    decoded = [FeedbackRecord.decode(p) for _, p in got]
    assert [d.request_id for d in decoded[:20]] == [r.request_id for r in records]
    assert len(decoded) == 21  # the forged message is skipped; "again" is kept once
    assert reader.corrupt == 1 and reader.duplicates == 1
    # Resume from a position (what a checkpoint stores): exactly the records after it.
    position = got[9][0] + 1
    reader.close()
    resumed = trainer.open_reader(FEEDBACK, "rA.feedback_0", start_record=position)
    assert [FeedbackRecord.decode(p).request_id for _, p in read_all(resumed, 11)][:10] == \
        [r.request_id for r in records[10:]]
    resumed.close()


def test_snapshot_goes_through_the_object_store_with_a_checksummed_pointer(streams, tmp_path, rng):
    trainer = streams()
    table = EmbeddingTable(8)
    fids = rng.integers(1, 2**62, 1000, dtype=np.uint64)
    table.upsert(fids, rng.standard_normal((1000, 8)).astype(np.float32), now=1.0)
    path = write_snapshot(trainer.data_dir, table, {"w": np.ones(3, np.float32)}, 77)
    pointer = trainer.publish_snapshot(path, 77)
    assert pointer["seq"] == 77 and len(pointer["sha256"]) == 64
    replica = streams("replica", sub="replica")
    fetched = replica.fetch_snapshot()
    snap = load_latest_snapshot(replica.data_dir)
    assert fetched is not None and snap.delta_seq == 77
    assert np.array_equal(snap.table.lookup(fids), table.lookup(fids))
    assert replica.fetch_snapshot() is None  # already as new locally
    # A pointer whose checksum does not match what the store holds: refused, nothing written.
    trainer.run(_put_pointer(trainer, {**pointer, "seq": 78, "sha256": "0" * 64}))
    with pytest.raises(BusError, match="SHA-256"):
        replica.fetch_snapshot()
    assert load_latest_snapshot(replica.data_dir).delta_seq == 77
    trainer.run(_put_pointer(trainer, pointer))


async def _put_pointer(streams, pointer):
    import json
    kv = await streams.js.key_value("monolith_pointers")
    await kv.put("snapshot", json.dumps(pointer).encode())


def test_killing_a_node_loses_no_acknowledged_log_record(cluster, streams):
    replica = streams("replica", replica="rK")
    writer = replica.open_writer(FEEDBACK, "feedback_0")
    acked: set[bytes] = set()
    for batch in range(30):
        if batch == 10:
            cluster.kill(0)  # kill -9 of one of the three nodes under traffic
        ids = [f"k{batch}-{i}".encode() for i in range(20)]
        for rid in ids:
            writer.append(FeedbackRecord(rid, 1.0, 1.0, np.array([1], np.uint64), np.array([1.0], np.float32)).encode())
        try:
            writer.sync()
            acked.update(ids)
        except BusError:
            pass  # not acknowledged: the caller would have got an error
    cluster.start_node(0)
    reader = streams().open_reader(FEEDBACK, "rK.feedback_0")
    got = {FeedbackRecord.decode(p).request_id for _, p in read_all(reader, len(acked), timeout_s=20)}
    reader.close()
    assert len(acked) >= 400 and acked <= got
