"""The real tritonserver, started by the launcher on free loopback ports, over HTTP and gRPC."""

import shutil
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from server.client import InferError, RankerClient
from server.dense import initial_dense_state
from server.features import fid, shipped_schema
from server.host.launcher import TritonServer
from server.runtime.ranker import RankerRuntime, RankRequest
from server.streams.records import FeatureRecord, FeedbackRecord
from server.streams.snapshots import write_snapshot
from server.table import EmbeddingTable
from tests.logs import logged

SCHEMA = shipped_schema()
PROTOCOLS = ["http", "grpc"]


def request_for(user_id: int, item_ids, genres=("Drama",)):
    return SCHEMA.encode_request(
        {"user_id": user_id, "user_age": "25-34", "user_gender": "F", "hour": 9, "weekday": 2},
        [{"item_id": i, "item_genres": list(genres), "item_year": 1990 + i % 10} for i in item_ids],
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with TritonServer(tmp_path_factory.mktemp("serving")) as srv:
        yield srv


@pytest.fixture(params=PROTOCOLS)
def client(request, server):
    url = server.http_url if request.param == "http" else server.grpc_url
    with RankerClient(url, protocol=request.param) as c:
        yield c


        time.sleep(0.05)


def test_scores_are_probabilities_and_deterministic(client):
    user, items = request_for(1, range(100))
    scores, seq = client.rank(user, items, request_id=b"det-1")
    again, _ = client.rank(user, items, request_id=b"det-2")
    assert scores.shape == (100,) and scores.dtype == np.float32
    assert np.all((scores > 0) & (scores < 1))
    assert seq == 0
    np.testing.assert_array_equal(scores, again)


def test_http_and_grpc_agree(server):
    user, items = request_for(3, range(20))
    with RankerClient(server.http_url, "http") as h, RankerClient(server.grpc_url, "grpc") as g:
        np.testing.assert_array_equal(h.rank(user, items, b"a")[0], g.rank(user, items, b"b")[0])


def _good():
    user, items = request_for(2, range(5))
    return {"user_fids": user, "item_fids": items, "request_id": np.array([b"good"], dtype=np.object_)}


def _with(**changes):
    tensors = _good()
    for name, value in changes.items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value
    return tensors


_USER, _ITEMS = request_for(2, range(5))
_RESERVED = _ITEMS.copy()
_RESERVED[1, 0] = np.uint64(2**64 - 1)
_WRONG_SLOT = _ITEMS.copy()
_WRONG_SLOT[0, 0] = np.uint64(fid(3, "F"))

BAD_RANK_REQUESTS = [
    ("missing item_fids", _with(item_fids=None), "item_fids"),
    ("missing request_id", _with(request_id=None), "request_id"),
    ("wrong dtype", _with(user_fids=_USER.astype(np.int64)), "user_fids"),
    ("wrong rank", _with(item_fids=_ITEMS.ravel()), "item_fids"),
    ("no candidates", _with(item_fids=np.empty((0, SCHEMA.item_width), np.uint64)), "1 to 4096 candidates, got 0"),
    ("too many candidates", _with(item_fids=np.ones((4097, SCHEMA.item_width), np.uint64) * np.uint64(fid(10, 1))),
     "got 4097"),
    ("item width", _with(item_fids=_ITEMS[:, :-1]), f"requires {SCHEMA.item_width} columns"),
    ("user width", _with(user_fids=_USER[:-1]), f"requires {SCHEMA.user_width} FIDs"),
    ("reserved key", _with(item_fids=_RESERVED), "reserved value"),
    ("wrong slot", _with(item_fids=_WRONG_SLOT), "FID of slot 3"),
    ("request_id too long", _with(request_id=np.array([b"x" * 300], dtype=np.object_)), "1 to 256 bytes, got 300"),
    ("empty request_id", _with(request_id=np.array([b""], dtype=np.object_)), "1 to 256 bytes, got 0"),
    ("nan timestamp", {**_good(), "timestamp": np.array([np.nan])}, "finite time"),
    ("timestamp a month ahead", {**_good(), "timestamp": np.array([time.time() + 40 * 86400.0])},
     "'timestamp' requires a time within 300 s ahead of and 86400 s behind the server's clock"),
    ("timestamp a year behind", {**_good(), "timestamp": np.array([time.time() - 365 * 86400.0])},
     "365.0 days behind it"),
]


@pytest.mark.parametrize("name, tensors, message", BAD_RANK_REQUESTS, ids=[b[0] for b in BAD_RANK_REQUESTS])
def test_bad_requests_get_clear_errors_and_serving_continues(client, name, tensors, message):
    with pytest.raises(InferError, match=message):
        client.infer("ranker", {name: value[None] for name, value in tensors.items()}, ["scores", "delta_seq"])
    scores, _ = client.rank(_USER, _ITEMS, request_id=b"after-bad")
    assert scores.shape == (5,)


def test_feature_log_records_scored_requests(server, client):
    user, items = request_for(11, range(7))
    rid = f"flog-{client.protocol}".encode()
    stamp = float(int(time.time()) - 3600) + 0.5  # a client's own time, within the window (server.clock)
    scores, seq = client.rank(user, items, request_id=rid, timestamp_s=stamp)
    mine = logged(server.data_dir / "feature_log", FeatureRecord.decode, rid)
    assert len(mine) == 1
    record = mine[0]
    assert record.request_time_s == stamp and record.delta_seq == seq
    np.testing.assert_array_equal(record.user_fids, user)
    np.testing.assert_array_equal(record.item_fids, items)
    np.testing.assert_array_equal(record.scores, scores)


def test_feedback_is_durable_before_ack(server, client):
    rid = f"fb-{client.protocol}".encode()
    item_fids = np.array([fid(10, 4), fid(10, 5)], dtype=np.uint64)
    event_time = float(int(time.time()) - 600)
    assert client.feedback(rid, item_fids, [1.0, 0.0], event_time_s=event_time) == 2
    # Acknowledged means appended and synced: the record is readable right now, no polling.
    mine = logged(server.data_dir / "feedback_log", FeedbackRecord.decode, rid, timeout_s=0)
    assert len(mine) == 1
    assert mine[0].item_fids.tolist() == item_fids.tolist()
    assert mine[0].labels.tolist() == [1.0, 0.0]
    assert mine[0].event_time_s == event_time and mine[0].accepted_time_s > event_time


def test_concurrent_feedback_shares_fsyncs_and_is_durable_when_acked(server):
    """8 clients at once: Triton hands the feedback model several requests
    per execution (one fsync for all of them), and every acknowledged
    action is in the log at the moment of its acknowledgement."""
    def stats():
        with RankerClient(server.grpc_url, "grpc") as c:
            s = c.raw.get_inference_statistics("feedback", as_json=True)["model_stats"][0]
        return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))

    before = stats()
    missing = []

    def client_thread(c):
        with RankerClient(server.grpc_url, "grpc") as conn:
            for k in range(60):
                rid = f"group-{c}-{k}".encode()
                assert conn.feedback(rid, [fid(10, k + 1)], [1.0]) == 1
                if k % 20 == 0 and not logged(server.data_dir / "feedback_log", FeedbackRecord.decode, rid,
                                                timeout_s=0):
                    missing.append(rid)

    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    inferences, executions = (a - b for a, b in zip(stats(), before))
    assert inferences == 480 and not missing
    assert executions < inferences, "no two concurrent feedback requests shared an execution (and its fsync)"


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"request_id": np.array([[b"r"]], np.object_), "item_fids": np.array([[5]], np.uint64),
          "labels": np.array([[1.0, 2.0]], np.float32)}, "one label per item FID"),
        ({"request_id": np.array([[b"r"]], np.object_), "item_fids": np.array([[0]], np.uint64),
          "labels": np.array([[1.0]], np.float32)}, "reserved value"),
        ({"request_id": np.array([[b"r"]], np.object_), "item_fids": np.array([[5]], np.uint64),
          "labels": np.array([[np.inf]], np.float32)}, "finite"),
        ({"request_id": np.array([b"r"], np.object_), "item_fids": np.array([5], np.uint64),
          "labels": np.array([1.0], np.float32)}, "batch"),
        ({"request_id": np.array([[b"r"]], np.object_), "item_fids": np.array([[5]], np.uint64),
          "labels": np.array([[1.0]], np.float32), "event_time": np.array([[time.time() + 40 * 86400.0]])},
         "'event_time' requires a time within 300 s ahead of"),
    ],
)
def test_bad_feedback_is_refused(client, tensors, message):
    with pytest.raises(InferError, match=message):
        client.infer("feedback", tensors, ["accepted"])
    assert client.feedback(b"ok", [fid(10, 1)], [1.0]) == 1


def test_metrics_and_model_control_is_off(server, client):
    client.rank(_USER, _ITEMS, request_id=b"metrics")
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    for name in ("monolith_table_rows", "monolith_delta_seq", "monolith_feature_log_written_total",
                 "monolith_requests_rejected_total", "nv_inference_count"):
        assert name in text
    unload = urllib.request.Request(f"http://{server.http_url}/v2/repository/models/ranker/unload", data=b"{}",
                                    method="POST")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(unload, timeout=5)
    assert client.raw.is_model_ready("ranker")


def test_restart_loads_the_snapshot(tmp_path):
    """A snapshot in the data dir is what a (re)started server serves from."""
    rng = np.random.default_rng(5)
    user, items = request_for(9, range(30), genres=("Action", "Comedy"))
    fids = np.unique(np.concatenate([user, items.ravel()]))
    fids = fids[fids != 0]
    table = EmbeddingTable(SCHEMA.dim)
    table.upsert(fids, rng.normal(0, 0.5, (len(fids), SCHEMA.dim)).astype(np.float32), now=1.0)
    dense = initial_dense_state(SCHEMA.num_fields, SCHEMA.dim, {**SCHEMA.dense, "seed": 99})
    write_snapshot(tmp_path / "data", table, dense, delta_seq=17)
    local = tmp_path / "local"
    shutil.copytree(tmp_path / "data", local)
    runtime = RankerRuntime(SCHEMA, local, "local")
    expected = runtime.score([RankRequest(b"x", 1.0, user, items)])[0][0]
    runtime.close()

    with TritonServer(tmp_path / "data") as srv, RankerClient(srv.grpc_url, "grpc") as c:
        scores, seq = c.rank(user, items, request_id=b"snap")
    assert seq == 17
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    with TritonServer(tmp_path / "fresh") as srv, RankerClient(srv.grpc_url, "grpc") as c:
        fresh, seq = c.rank(user, items, request_id=b"fresh")
    assert seq == 0 and not np.allclose(fresh, scores)


def test_concurrent_requests_batched_together_get_their_own_scores(server):
    """Dynamic batching hands execute() several requests (different N) at once:
    each must get exactly the scores it gets when sent alone."""
    requests = [request_for(100 + k, range(k * 3, k * 3 + 5 + k)) for k in range(8)]
    with RankerClient(server.grpc_url, "grpc") as client:
        alone = [client.rank(u, i, request_id=b"alone")[0] for u, i in requests]
    results: dict[int, list] = {k: [] for k in range(len(requests))}

    def send(k):
        with RankerClient(server.grpc_url, "grpc") as c:
            for _ in range(20):
                results[k].append(c.rank(*requests[k], request_id=f"c{k}".encode())[0])

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, scores in results.items():
        assert len(scores) == 20
        for s in scores:
            np.testing.assert_allclose(s, alone[k], rtol=1e-6)
    stats = RankerClient(server.grpc_url, "grpc").raw.get_inference_statistics("ranker", as_json=True)
    model = stats["model_stats"][0]
    assert int(model["execution_count"]) < int(model["inference_count"]), "no request was ever batched"


def test_a_batch_dimension_above_one_is_refused(client):
    user, items = request_for(1, range(3))
    tensors = {"user_fids": np.stack([user, user]), "item_fids": np.stack([items, items]),
               "request_id": np.array([[b"a"], [b"b"]], dtype=np.object_)}
    with pytest.raises(InferError, match="batch dimension of 1"):
        client.infer("ranker", tensors, ["scores"])


def test_a_data_dir_with_spaces_serves(tmp_path):
    with TritonServer(tmp_path / "data dir with spaces") as spaced, RankerClient(spaced.grpc_url, "grpc") as client:
        user, items = request_for(1, [1, 2])
        assert client.rank(user, items, request_id=b"spaces")[0].shape == (2,)
