"""The quality guard's rollback on the JetStream bus, against a real 3-node nats-server cluster: planned
from the bus itself (the snapshot at or before S from the object store, the records since from the
DELTAS stream), emitted as fenced delta records; a replica that joins from the bus ends at the state at
S, rows and dense weights byte for byte; a rollback that cannot be done keeps the hold.
(The JetStream backend alone: test_jetstream_bus.py.)"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from server.features import shipped_schema
from server.streams.deltas import DENSE, DeltaRecord
from server.streams.delta_log import read_through
from server.streams.jetstream import BusConfig, JetStreamStreams
from server.streams.nats_cluster import NatsCluster
from server.streams.snapshots import load_latest_snapshot, write_snapshot
from server.table import EmbeddingTable
from trainer.guard import HELD
from trainer.guard_owner import TrainerGuard
from trainer.model import TrainerModel
from updater.rollback import RollbackRangeError, read_state, rollback_now

SCHEMA = shipped_schema()
USERS = np.stack([SCHEMA.encode({"user_id": u, "hour": u % 24}, SCHEMA.user_slots) for u in range(300)])
ITEMS = np.stack([SCHEMA.encode({"item_id": i, "genre": i % 7}, SCHEMA.item_slots) for i in range(6000)])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with NatsCluster(tmp_path_factory.mktemp("nats")) as c:
        yield c


def bus(cluster: NatsCluster, user: str, replica: str = "r0") -> BusConfig:
    return BusConfig(url=cluster.url, credentials=str(cluster.credentials(user)), replica=replica)


def train_and_emit(model, writer, rng, steps, items=3000):
    for _ in range(steps):
        u, i = rng.integers(0, len(USERS), 64), rng.integers(0, items, 64)
        model.train_step(USERS[u], ITEMS[i], rng.integers(0, 2, 64).astype(np.float32), now=time.time())
        writer.append(model.take_delta(writer.next_seq))


def replica_state(streams: JetStreamStreams) -> tuple[dict[int, bytes], dict, int]:
    """What a replica joining now holds: the bus's newest snapshot, then every record after it."""
    streams.fetch_snapshot()
    snapshot = load_latest_snapshot(streams.data_dir)
    seq = int(streams.snapshot_pointer()["seq"])
    state = dict(zip(*_items(snapshot.table)))
    dense = snapshot.dense_state
    head = streams.delta_head()[0]
    reader = streams.open_delta_reader(seq)
    try:
        got = list(read_through(reader, seq, head, timeout_s=30, where="the replica's reader"))
    finally:
        reader.close()
    for record in got:
        if record.kind == DENSE:
            dense = record.dense_state
            continue
        state.update((f, r.tobytes()) for f, r in zip(record.fids.tolist(), record.values))
        for f in record.evicted.tolist():
            state.pop(f, None)
    return state, dense, head


def use_bus(monkeypatch, cluster: NatsCluster) -> None:
    """Trainers made in this test (OnlineTrainer reads the environment) write to the cluster."""
    for key, value in bus(cluster, "trainer").to_env().items():
        monkeypatch.setenv(key, value)


def joining_replica(cluster: NatsCluster, tmp_path) -> tuple[dict[int, bytes], dict]:
    """Rows and dense weights of a replica that joins from the bus now."""
    replica = JetStreamStreams(tmp_path / "replica", bus(cluster, "replica", "r1"))
    try:
        rows, dense, _ = replica_state(replica)
    finally:
        replica.close()
    return rows, dense


def _items(table):
    fids, rows = [], []
    for f, r, _ in table.items():
        fids += f.tolist()
        rows += [x.tobytes() for x in r]
    return fids, rows


def model_state(model: TrainerModel) -> dict[int, bytes]:
    out = {}
    for f, r, _ in model.table.items():
        out.update((k, v[: model.dim].tobytes()) for k, v in zip(f.tolist(), r))
    return out


def dense_bytes(state: dict) -> dict:
    return {k: np.ascontiguousarray(np.asarray(v)).tobytes() for k, v in state.items()}


def test_the_guard_rolls_back_on_the_bus_from_the_object_store_and_the_stream(cluster, tmp_path):
    rng = np.random.default_rng(5)
    trainer = JetStreamStreams(tmp_path / "trainer", bus(cluster, "trainer"))
    replica = JetStreamStreams(tmp_path / "replica", bus(cluster, "replica", "r1"))
    try:
        trainer.ensure_streams()
        trainer.run(trainer.js.purge_stream("MONOLITH_DELTAS"))
        model, writer = TrainerModel(SCHEMA), trainer.open_delta_writer()
        train_and_emit(model, writer, rng, 4)
        writer.append(DeltaRecord.dense(writer.next_seq, time.time(), model.dense_state()))
        p = writer.next_seq - 1
        # The snapshot lives in the object store only (not in the trainer's data directory), and
        # retention dropped the records before it: the state at S must come from the bus.
        trainer.publish_snapshot(write_snapshot(tmp_path / "elsewhere", model.serving_table(),
                                                model.dense_state(), p), p)
        writer.delete_before(p + 1)
        train_and_emit(model, writer, rng, 3)
        s = writer.next_seq - 1
        guard = TrainerGuard(tmp_path / "trainer", SCHEMA, streams=trainer)
        assert guard.streams is trainer
        at_s = replica_state(replica)
        assert at_s[2] == s
        train_and_emit(model, writer, rng, 4, items=6000)  # the poison: new rows too
        writer.append(DeltaRecord.dense(writer.next_seq, time.time(), model.dense_state()))  # a poisoned dense record
        model.train_step(USERS[:8], ITEMS[5990:5998], np.ones(8, np.float32), now=time.time())  # held, never emitted
        assert dense_bytes(model.dense_state()) != dense_bytes(at_s[1])

        # The guard decided a rollback to a seq the bus no longer retains: refused, the hold stays.
        guard.guard.state, guard.guard.rollback_to = HELD, p - 1
        guard.poll_control(model, writer, time.time(), monotonic_s=1.0)
        state = read_state(tmp_path / "trainer")
        assert not guard.emitting and state["rollback_to"] == p - 1 and state["rollback_failures"] == 1
        assert f"retained range {p}..{writer.next_seq - 1}" in state["last_action"]
        assert "emission stays held" in state["last_action"]
        metrics = (tmp_path / "trainer" / "guard" / "metrics.prom").read_text()
        assert "monolith_guard_rollback_pending 1.0" in metrics and "monolith_guard_state 1.0" in metrics

        # To S: planned from the object store's snapshot at P and the stream's records P+1.., appended fenced.
        guard.guard.rollback_to = s
        guard.poll_control(model, writer, time.time(), monotonic_s=10.0)
        state = read_state(tmp_path / "trainer")
        assert guard.emitting, state["last_action"]
        assert state["last_action"].startswith(f"rollback to seq {s}")
        assert "dense weights restored" in state["last_action"]
        assert guard.unconfirmed == {"to_seq": s, "end_seq": writer.next_seq - 1}
        rows, dense, _ = replica_state(replica)
        assert rows == at_s[0]  # byte for byte; rows created after S deleted
        assert dense_bytes(dense) == dense_bytes(at_s[1])
        assert model_state(model) == at_s[0]
        assert dense_bytes(model.dense_state()) == dense_bytes(at_s[1])
        assert model.take_delta(writer.next_seq) is None  # nothing held goes out afterwards

        # The operator's command on the bus, with the trainer holding the lease: refused with the same range.
        with pytest.raises(RollbackRangeError, match=rf"retained range {p}\.\.{writer.next_seq - 1} of the "
                                                     rf"JetStream delta stream"):
            rollback_now(tmp_path / "trainer", 999, SCHEMA, streams=trainer)
        train_and_emit(model, writer, rng, 2, items=6000)
        writer.close()
        # ... and with no trainer: the command takes the lease and appends the rollback itself.
        assert "no trainer running" in rollback_now(tmp_path / "trainer", s, SCHEMA, streams=trainer)
        rows, dense, _ = replica_state(replica)
        assert rows == at_s[0] and dense_bytes(dense) == dense_bytes(at_s[1])
    finally:
        replica.close()
        trainer.close()


ZOMBIE = r"""
import json, sys, time
import torch
from server.streams.jetstream import BusConfig, JetStreamStreams
from server.streams.snapshots import write_snapshot
from server.streams.deltas import DeltaRecord
from server.table import EmbeddingTable

url, creds, data_dir = sys.argv[1:4]
streams = JetStreamStreams(data_dir, BusConfig(url=url, credentials=creds, replica="z"))
writer = streams.open_delta_writer()
for _ in range(2):
    writer.append(DeltaRecord.dense(writer.next_seq, time.time(), {"w": torch.ones(3)}))
seq = writer.next_seq - 1
path = write_snapshot(data_dir, EmbeddingTable(8), {"w": torch.ones(3)}, seq)
print(json.dumps({"ready": seq}), flush=True)
sys.stdin.readline()  # paused here (SIGSTOP) past the lease; another trainer takes over
out = {}
for name, act in (("pointer", lambda: streams.publish_snapshot(path, seq)),
                  ("purge", lambda: writer.delete_before(seq + 1))):
    try:
        act()
        out[name] = "done"
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out), flush=True)
"""


def test_a_trainer_paused_past_its_lease_moves_no_pointer_and_purges_nothing(cluster, tmp_path):
    """SIGSTOP after its appends, another trainer takes over and publishes a newer snapshot, SIGCONT:
    the paused trainer's snapshot pointer write and purge are refused (lease confirmed on the bus, the
    pointer's compare-and-set moves only forward)."""
    import json
    import os
    import signal
    import subprocess
    import sys

    admin = JetStreamStreams(tmp_path / "admin", bus(cluster, "trainer"))
    admin.ensure_streams()
    admin.run(admin.js.purge_stream("MONOLITH_DELTAS"))
    zombie = subprocess.Popen([sys.executable, "-c", ZOMBIE, cluster.url, str(cluster.credentials("trainer")),
                               str(tmp_path / "zombie")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        z = json.loads(zombie.stdout.readline())["ready"]
        os.kill(zombie.pid, signal.SIGSTOP)
        writer = admin.open_delta_writer()  # waits for the paused holder's lease to expire
        for _ in range(3):
            writer.append(DeltaRecord.dense(writer.next_seq, time.time(), {"w": torch.zeros(3)}))
        n = writer.next_seq - 1
        admin.publish_snapshot(write_snapshot(tmp_path / "new", EmbeddingTable(8), {"w": torch.zeros(3)}, n), n)
        first = admin.run(admin.js.stream_info("MONOLITH_DELTAS")).state.first_seq
        os.kill(zombie.pid, signal.SIGCONT)
        zombie.stdin.write("go\n")
        zombie.stdin.flush()
        out = json.loads(zombie.stdout.readline())
        assert zombie.wait(60) == 0
    finally:
        if zombie.poll() is None:
            os.kill(zombie.pid, signal.SIGCONT)
            zombie.kill()
    assert z < n
    assert out["pointer"].startswith("FencedError") and out["purge"].startswith("FencedError"), out
    assert admin.snapshot_pointer()["seq"] == n  # never moved backwards
    assert admin.run(admin.js.stream_info("MONOLITH_DELTAS")).state.first_seq == first  # nothing purged
    writer.close()
    admin.close()


def test_a_rollback_killed_before_its_checkpoint_on_the_bus_is_carried_out_again_exactly_once(cluster, tmp_path,
                                                                                             monkeypatch):
    """The local bus's crash test (tests/trainer/test_guard.py) on JetStream: a rollback appended to the
    DELTAS stream, then the trainer gone before the checkpoint that makes it durable. The restarted trainer
    (its checkpoint holds the poison) reconciles the stream, plans the rollback again from the bus and
    appends it; a replica joining from the bus ends at the state at S, rows and dense weights; a second
    restart past a checkpoint recognises it done, the guard's state intact."""
    from trainer.online import OnlineTrainer
    from updater.rollback import write_control

    use_bus(monkeypatch, cluster)
    rng = np.random.default_rng(9)
    admin = JetStreamStreams(tmp_path / "admin", bus(cluster, "trainer"))
    admin.ensure_streams()
    admin.run(admin.js.purge_stream("MONOLITH_DELTAS"))
    admin.close()
    data = tmp_path / "trainer"
    trainer = OnlineTrainer(SCHEMA, data)
    try:
        train_and_emit(trainer.model, trainer.writer, rng, 3)
        trainer.publish()  # the base snapshot the rollback is planned from (in the object store)
        train_and_emit(trainer.model, trainer.writer, rng, 2)
        trainer.writer.append(DeltaRecord.dense(trainer.writer.next_seq, time.time(), trainer.model.dense_state()))
        s = trainer.writer.next_seq - 1
        at_s = model_state(trainer.model), dense_bytes(trainer.model.dense_state())
        train_and_emit(trainer.model, trainer.writer, rng, 2, items=6000)  # the poison, emitted ...
        trainer.publish()  # ... and in the checkpoint
        train_and_emit(trainer.model, trainer.writer, rng, 2, items=6000)
        trainer.guard.guard.quarantine[777] = 10**9
        trainer.guard.guard.holds = 3
        write_control(data, rollback_to_seq=s)
        trainer.guard.poll_control(trainer.model, trainer.writer, time.time(), monotonic_s=1.0)
        assert trainer.guard.unconfirmed is not None, read_state(data)["last_action"]
    finally:
        trainer.close()  # gone: no publish, no checkpoint after the rollback
    restarted = OnlineTrainer(SCHEMA, data)
    try:
        assert "reconciled" in restarted.start_message and "carried out again" in restarted.start_message
        assert model_state(restarted.model) == at_s[0]
        assert dense_bytes(restarted.model.dense_state()) == at_s[1]
        assert restarted.guard.guard.quarantine.get(777) == 10**9 and restarted.guard.guard.holds == 3
        rolled = read_state(data)["rows_rolled_back"]
        restarted.publish()  # now durable
    finally:
        restarted.close()
    rows, dense = joining_replica(cluster, tmp_path)
    assert rows == at_s[0] and dense_bytes(dense) == at_s[1]
    again = OnlineTrainer(SCHEMA, data)
    try:
        assert "carried out again" not in again.start_message and "reconciled" not in again.start_message
        assert again.guard.unconfirmed is None and again.guard.guard.rows_rolled_back == rolled
    finally:
        again.close()


def test_a_restarted_trainer_reconciles_the_bus_to_its_checkpoint(cluster, tmp_path, monkeypatch):
    """Records past the checkpoint (new rows, a dense record) undone on JetStream at restart: a replica that
    joins from the bus holds the checkpoint's rows and dense weights. (The reconcile once stopped at the
    JetStream reader's first empty read, before its messages arrived: it undid nothing.)"""
    from trainer.online import OnlineTrainer

    use_bus(monkeypatch, cluster)
    rng = np.random.default_rng(11)
    data = tmp_path / "trainer"
    trainer = OnlineTrainer(SCHEMA, data)
    try:
        train_and_emit(trainer.model, trainer.writer, rng, 3)
        trainer.publish()
        at_checkpoint = model_state(trainer.model), dense_bytes(trainer.model.dense_state())
        train_and_emit(trainer.model, trainer.writer, rng, 3, items=6000)  # new rows too
        trainer.writer.append(DeltaRecord.dense(trainer.writer.next_seq, time.time(), trainer.model.dense_state()))
    finally:
        trainer.close()  # gone before the next checkpoint
    restarted = OnlineTrainer(SCHEMA, data)
    try:
        assert "reconciled 4 stream records" in restarted.start_message, restarted.start_message
    finally:
        restarted.close()
    rows, dense = joining_replica(cluster, tmp_path)
    assert rows == at_checkpoint[0] and dense_bytes(dense) == at_checkpoint[1]
