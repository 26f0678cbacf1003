"""Kill anywhere, lose nothing: server and trainer SIGKILLed at random moments under traffic.

Traffic: ranking requests (3 candidates) each followed by a click on the
first candidate. The trainer runs with every impression kept (negative rate
1), short windows, frequent snapshots and dense syncs. Twice each, at a
random moment, the trainer or the whole server process tree is killed with
SIGKILL and restarted. Then, once everything has drained:

    feedback   every acknowledged click is in the feedback log exactly once
    training   every click in the log was joined, or counted as an orphan
               (its request's feature record was still in the server's
               queue when the server died): none vanished
    stream     the delta stream verifies: every checksum, no sequence gap
    state      the server, caught up, holds exactly the trainer's serving
               rows (same FIDs, same bytes) and its dense weights
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

import torch

from server.client import RankerClient
from server.features import load_schema
from server.launcher import DEFAULT_MODEL_REPOSITORY, TritonServer
from server.records import FeedbackRecord
from server.segment_log import SegmentLogReader
from server.snapshot import list_snapshots, load_latest_snapshot
from server.table import EmbeddingTable
from server.tensor_io import decode_tensors
from updater.tools import verify

SCHEMA = load_schema(DEFAULT_MODEL_REPOSITORY / "ranker" / "feature_schema.json")


def start_trainer(data):
    return subprocess.Popen([sys.executable, "-m", "server.cli", "train", "online", "--data-dir", str(data),
                             "--window-s", "1", "--negative-rate", "1", "--snapshot-interval-s", "1",
                             "--dense-interval-s", "2", "--sync-interval-ms", "100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


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
                        user, items = SCHEMA.encode_request(
                            {"user_id": k % 50}, [{"item_id": (k * 3 + c) % 400} for c in range(3)])
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
    last_seq = meta["delta_seq"]

    # state: the caught-up server equals the trainer, rows and dense weights
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
    assert actual.keys() == expected.keys()
    assert actual == expected
    trainer_dense = {k[6:]: v for k, v in decode_tensors((checkpoint / "dense.bin").read_bytes()).items()
                     if k.startswith("dense.")}
    for name, tensor in trainer_dense.items():
        assert torch.equal(served.dense_state[name], tensor), name
