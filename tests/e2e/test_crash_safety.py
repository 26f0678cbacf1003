"""Kill anywhere, lose nothing: server and trainer SIGKILLed at random moments under traffic.

Traffic: ranking requests (3 candidates) each followed by a click on the
first candidate, with an ID pool too large for rows to be touched again
(every request a new user and new items). The trainer runs at the default
negative rate (0.1), short windows, frequent snapshots and dense syncs.
Twice each, at a random moment, the trainer or the whole server process
tree is killed with SIGKILL and restarted. Then, once everything has drained:

    feedback   every acknowledged click is in the feedback log exactly once
    training   every click in the log was joined, or counted as an orphan
               (its request's feature record was still in the server's
               queue when the server died): none vanished
    stream     the delta stream verifies: every checksum, no sequence gap
    state      the server, caught up, holds exactly the trainer's serving
               rows (same FIDs, same bytes) and its dense weights

A second test kills only the trainer, between two syncs after its
checkpoint, so that the stream (and the server) hold records the restored
trainer never made: the restarted trainer must reconcile them.
"""

import json
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter


from server.client import RankerClient
from server.features import shipped_schema
from server.host.launcher import TritonServer
from server.streams.records import FeedbackRecord
from server.streams import SegmentLogReader
from server.streams.snapshots import list_snapshots, load_latest_snapshot
from server.table import EmbeddingTable
from server.tensor_io import decode_tensors, encode_tensors
from updater.tools import scan, verify

SCHEMA = shipped_schema()


def start_trainer(data, snapshot_interval_s=1.0, dense_interval_s=2.0):
    return subprocess.Popen([sys.executable, "-m", "server.cli", "train", "online", "--data-dir", str(data),
                             "--window-s", "1", "--negative-rate", "0.1", "--snapshot-interval-s",
                             str(snapshot_interval_s), "--dense-interval-s", str(dense_interval_s),
                             "--sync-interval-ms", "100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def never_seen_request(k):
    """Request k: a new user and three new items (no row is touched twice)."""
    return SCHEMA.encode_request({"user_id": 10_000_000 + k}, [{"item_id": 10_000_000 + 3 * k + c} for c in range(3)])


def assert_server_equals_trainer(tmp_path, server, data, checkpoint):
    """Catches the server up to the checkpoint's seq, stops it (it writes its
    own snapshot) and compares rows (FIDs and bytes) and dense weights."""
    last_seq = json.loads((checkpoint / "meta.json").read_text())["delta_seq"]
    with RankerClient(server.grpc_url, "grpc") as client:
        user, items = SCHEMA.encode_request({"user_id": 1}, [{"item_id": 1}])
        deadline = time.monotonic() + 30
        while client.rank(user, items, request_id=b"final")[1] < last_seq:
            assert time.monotonic() < deadline, "server never caught up"
            time.sleep(0.05)
    trainer_snapshot = [p for p in list_snapshots(data) if p.name == f"{last_seq:020d}"][0]
    shutil.move(str(trainer_snapshot), tmp_path / "trainer_snapshot")  # so the server writes its own
    server.stop()
    served = load_latest_snapshot(data)
    assert served.delta_seq == last_seq

    trainer_table = EmbeddingTable.load(checkpoint / "table.snap")
    expected = {f: row[: SCHEMA.dim].tobytes() for fids, rows, _ in trainer_table.items()
                for f, row in zip(fids.tolist(), rows)}
    actual = {f: row.tobytes() for fids, rows, _ in served.table.items() for f, row in zip(fids.tolist(), rows)}
    only_served, only_trained = len(actual.keys() - expected.keys()), len(expected.keys() - actual.keys())
    assert only_served == only_trained == 0, f"{only_served} FIDs only served, {only_trained} only in the trainer"
    differ = sum(actual[f] != row for f, row in expected.items())
    assert differ == 0, f"{differ} of {len(expected)} rows differ"
    trainer_dense = {k[6:]: v for k, v in decode_tensors((checkpoint / "dense.bin").read_bytes()).items()
                     if k.startswith("dense.")}
    assert encode_tensors(served.dense_state) == encode_tensors(trainer_dense)  # names, shapes and bytes


def read_all(directory, decode):
    out = []
    for instance in sorted(p for p in directory.iterdir() if p.is_dir()):
        with SegmentLogReader(instance) as reader:
            out += [decode(payload) for _, payload in reader.read()]
    return out


def test_kill_anywhere_lose_nothing(tmp_path):
    data = tmp_path / "data"
    rng = random.Random(11)
    server = TritonServer(data).start()
    trainer = start_trainer(data)
    current = {"url": server.grpc_url}
    acked: list[bytes] = []
    stop = threading.Event()

    def traffic():
        k = 0
        while not stop.is_set():
            try:
                with RankerClient(current["url"], "grpc", timeout_s=5.0) as client:
                    while not stop.is_set():
                        user, items = never_seen_request(k)
                        rid = f"k{k}".encode()
                        k += 1
                        client.rank(user, items, request_id=rid)
                        client.feedback(rid, items[:1, 0], [1.0])
                        acked.append(rid)
                        time.sleep(0.004)
            except Exception:  # the server is down: try again shortly, on its new address
                time.sleep(0.1)

    thread = threading.Thread(target=traffic)
    thread.start()
    kills = []
    try:
        for victim in ("trainer", "server", "trainer", "server"):
            time.sleep(rng.uniform(2.0, 4.0))
            kills.append((victim, len(acked)))
            if victim == "trainer":
                trainer.send_signal(signal.SIGKILL)
                trainer.wait()
                trainer = start_trainer(data)
            else:
                server.kill()
                server = TritonServer(data).start()
                current["url"] = server.grpc_url
        time.sleep(2.0)
    finally:
        stop.set()
        thread.join()
    time.sleep(2.5)  # every join window closes and is trained
    trainer.send_signal(signal.SIGTERM)
    _, err = trainer.communicate(timeout=60)
    assert trainer.returncode == 0, err[-3000:]
    assert len(acked) > 500 and all(before < len(acked) for _, before in kills), kills

    # feedback: every acknowledged click exactly once
    logged = Counter(r.request_id for r in read_all(data / "feedback_log", FeedbackRecord.decode))
    assert all(logged[rid] == 1 for rid in acked), [rid for rid in acked if logged[rid] != 1][:5]
    assert max(logged.values()) == 1

    # training: nothing vanished between the logs and the trainer
    checkpoint = sorted((data / "trainer").iterdir())[-1]
    meta = json.loads((checkpoint / "meta.json").read_text())
    counters = meta["counters"]
    assert counters["joined"] + counters["orphans"] == sum(logged.values()), counters
    assert counters["unmatched"] == 0
    assert counters["joined"] > 0.9 * len(acked), counters

    # stream: checksums and sequence
    ok, message = verify(data / "deltas")
    assert ok, message

    # state: the caught-up server equals the trainer, rows and dense weights
    assert_server_equals_trainer(tmp_path, server, data, checkpoint)


def test_trainer_killed_between_syncs_restarts_into_agreement(tmp_path):
    """kill -9 of the trainer a few syncs after its checkpoint: the server
    has applied records the restored trainer never made (rows of new IDs
    that nothing touches again). On restart the trainer reconciles them;
    in the end serving rows == trainer rows byte for byte, no extra FIDs."""
    data = tmp_path / "data"
    server = TritonServer(data).start()
    trainers = [start_trainer(data, snapshot_interval_s=1.5, dense_interval_s=0.7)]
    stop = threading.Event()

    def traffic():
        with RankerClient(server.grpc_url, "grpc", timeout_s=5.0) as client:
            k = 0
            while not stop.is_set():
                user, items = never_seen_request(k)
                rid = f"k{k}".encode()
                client.rank(user, items, request_id=rid)
                if k % 2 == 0:
                    client.feedback(rid, items[:1, 0], [1.0])
                k += 1
                time.sleep(0.004)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not list((data / "trainer").glob("0*")):
            assert time.monotonic() < deadline and trainers[0].poll() is None, "trainer never checkpointed"
            time.sleep(0.02)
        while len(scan_seqs(data)) < newest_checkpoint_seq(data) + 4:  # a dense and some sparse syncs past it
            assert time.monotonic() < deadline, "no syncs after the checkpoint"
            time.sleep(0.02)
        trainers[0].send_signal(signal.SIGKILL)
        trainers[0].wait()
        assert max(scan_seqs(data)) > newest_checkpoint_seq(data), "killed right at a checkpoint: nothing to undo"
        trainers.append(start_trainer(data, snapshot_interval_s=1.5, dense_interval_s=0.7))
        time.sleep(2.0)
        stop.set()
        thread.join()
        time.sleep(2.0)  # every join window closes and is trained
        trainers[1].send_signal(signal.SIGTERM)
        _, err = trainers[1].communicate(timeout=60)
        assert trainers[1].returncode == 0, err[-3000:]
        assert "reconciled" in err, err[-3000:]
        ok, message = verify(data / "deltas")
        assert ok, message
        assert_server_equals_trainer(tmp_path, server, data, sorted((data / "trainer").iterdir())[-1])
    finally:
        stop.set()
        thread.join()
        server.kill()
        for trainer in trainers:
            if trainer.poll() is None:
                trainer.kill()


def newest_checkpoint_seq(data):
    return int(sorted((data / "trainer").glob("0*"))[-1].name)


def scan_seqs(data):
    return [record.seq for _, _, _, record in scan(data / "deltas")] if (data / "deltas").is_dir() else []
