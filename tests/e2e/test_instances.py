"""Two ranker instances over one shared table, on the real tritonserver."""

import functools
import os
import signal
import threading
import time
import urllib.request

import numpy as np
import pytest

from server.client import InferError, RankerClient
from server.features import PAD_FID, shipped_schema
from server.host.instances import repository_with_instances
from server.host.launcher import TritonServer
from server.procs import processes
from server.runtime.ranker import RankerRuntime, RankRequest
from server.table.shared import WRITER_PID, shm_directory
from tests import waiting
from server.streams.deltas import DeltaRecord
from server.streams.delta_log import FileDeltaWriter

pytestmark = pytest.mark.slow

SCHEMA = shipped_schema()
USER, ITEMS = SCHEMA.encode_request({"user_id": 5, "hour": 7}, [{"item_id": i, "item_genres": ["Drama"]}
                                                              for i in range(20)])
FIDS = np.unique(np.concatenate([USER, ITEMS.ravel()]))
FIDS = FIDS[FIDS != PAD_FID]
# One FID in all: its score tells which whole row it was computed from (a torn row matches none).
PROBE_USER, PROBE_ITEMS = SCHEMA.encode_request({}, [{"item_id": 7}])


def rows_of(seq: int, fids: np.ndarray) -> np.ndarray:
    """The rows record ``seq`` writes: a known function of FID and seq."""
    base = (fids % np.uint64(1000)).astype(np.float32)[:, None] / 1000.0 - 0.5
    return (base + np.float32(seq % 7) / 10 + np.arange(SCHEMA.dim, dtype=np.float32) / 100).astype(np.float32)


def reference_scores(tmp_path, seq: int, user=USER, items=ITEMS) -> np.ndarray:
    """What the request scores once record ``seq`` set the request's rows (default dense weights)."""
    runtime = RankerRuntime(SCHEMA, tmp_path / f"reference-{seq}", "ref")
    try:
        fids = np.unique(np.concatenate([user, items.ravel()]))
        fids = fids[fids != PAD_FID]
        runtime.table.upsert(fids, rows_of(seq, fids), now=1.0)
        return runtime.score([RankRequest(b"r", 1.0, user, items)])[0][0]
    finally:
        runtime.close(snapshot=False)


def by_instance(server, name) -> dict[str, float]:
    out = {}
    for line in urllib.request.urlopen(server.metrics_url, timeout=5).read().decode().splitlines():
        if line.startswith(name + "{") and 'model="ranker"' in line:
            labels = line[line.index("{") + 1 : line.index("}")]
            instance = dict(part.split("=", 1) for part in labels.split(","))["instance"].strip('"')
            out[instance] = float(line.rsplit(" ", 1)[1])
    return out


wait_until = functools.partial(waiting.wait_until, timeout_s=60.0, poll_s=0.1)


class Traffic:
    """Threads sending the same request until stopped; keeps every (scores, seq) and every error."""

    def __init__(self, url, threads=3, user=USER, items=ITEMS):
        self.answers, self.errors = [], []
        self._request = user, items
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(url,), daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, url):
        with RankerClient(url, "grpc") as client:
            while not self._stop.is_set():
                try:
                    self.answers.append(client.rank(*self._request, request_id=b"traffic"))
                except InferError as exc:
                    self.errors.append(str(exc))

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def served_seq(server):
    """delta_seq of an answer (-1 for an error: a killed stub stays dead, Triton does not restart it)."""
    with RankerClient(server.grpc_url, "grpc") as client:
        try:
            return client.rank(USER, ITEMS, request_id=b"poll")[1]
        except InferError:
            return -1


@pytest.fixture
def two_instances(tmp_path):
    repo = repository_with_instances(tmp_path / "repo", 2)
    with TritonServer(tmp_path / "data", model_repository=repo) as server:
        yield server
    assert not shm_directory(tmp_path / "data").exists()


def test_two_instances_answer_alike_apply_once_and_grow_while_serving(two_instances, tmp_path):
    server, rng = two_instances, np.random.default_rng(3)
    traffic = Traffic(server.grpc_url)
    streamed, written = 0, []
    with FileDeltaWriter(server.data_dir / "deltas") as deltas:
        for seq in range(1, 11):  # 30,000 new rows: the table (1,024 slots at first) doubles 5 times or more
            fids = rng.integers(1, 2**60, 3000, dtype=np.uint64)
            deltas.append(DeltaRecord.sparse(seq, time.time(), fids, rows_of(seq, fids)))
            streamed += len(fids)
            written.append(fids)
        final = 11
        deltas.append(DeltaRecord.sparse(final, time.time(), FIDS, rows_of(final, FIDS)))
        streamed += len(FIDS)
        written.append(FIDS)
    wait_until(lambda: served_seq(server) == final, f"delta_seq {final}")
    wait_until(lambda: len(by_instance(server, "monolith_requests_scored_total")) == 2
               and min(by_instance(server, "monolith_requests_scored_total").values()) > 0, "both instances serving")
    answers_before = len(traffic.answers)
    wait_until(lambda: len(traffic.answers) > answers_before + 200, "traffic at the final seq")
    traffic.stop()
    assert traffic.errors == []
    expected = reference_scores(tmp_path, final)
    at_final = [scores for scores, seq in traffic.answers if seq == final]
    assert len(at_final) > 200
    for scores in at_final:  # whichever instance answered
        np.testing.assert_array_equal(scores, at_final[0])
    np.testing.assert_allclose(at_final[0], expected, rtol=1e-5)
    wait_until(lambda: set(by_instance(server, "monolith_delta_seq").values()) == {final}, "metrics at the final seq")
    assert sum(by_instance(server, "monolith_delta_rows_applied_total").values()) == streamed
    assert set(by_instance(server, "monolith_table_rows").values()) == {len(np.unique(np.concatenate(written)))}


def test_kill_9_of_the_writer_stub_under_traffic_another_takes_over(two_instances, tmp_path):
    server = two_instances
    control = shm_directory(server.data_dir) / "control"
    writer_pid = lambda: int(np.fromfile(control, dtype=np.uint64)[WRITER_PID])  # noqa: E731
    stubs = lambda: {pid for pid, state, ppid, _ in processes() if ppid == server.process.pid and state != "Z"}  # noqa: E731
    traffic = Traffic(server.grpc_url)
    probes = Traffic(server.grpc_url, threads=1, user=PROBE_USER, items=PROBE_ITEMS)
    rng = np.random.default_rng(5)
    final = 120
    probe_fid = PROBE_ITEMS[PROBE_ITEMS != PAD_FID]
    with FileDeltaWriter(server.data_dir / "deltas") as deltas:
        for seq in range(1, final + 1):
            fids = np.concatenate([FIDS, probe_fid, rng.integers(1, 2**60, 2000, dtype=np.uint64)])
            deltas.append(DeltaRecord.sparse(seq, time.time(), fids, rows_of(seq, fids)))
            if seq == 40:
                wait_until(lambda: served_seq(server) >= 20, "deltas applied before the kill")
                victim = writer_pid()
                assert victim in stubs()
                os.kill(victim, signal.SIGKILL)
    wait_until(lambda: writer_pid() != victim and writer_pid() in stubs(), "another stub holding the writer lease")
    wait_until(lambda: served_seq(server) == final, f"serving caught up to delta_seq {final}")
    traffic.stop()
    probes.stop()
    whole = {seq: reference_scores(tmp_path, seq, PROBE_USER, PROBE_ITEMS)[0] for seq in range(1, 8)}
    absent = RankerRuntime(SCHEMA, tmp_path / "absent", "ref")
    whole[0] = absent.score([RankRequest(b"r", 1.0, PROBE_USER, PROBE_ITEMS)])[0][0][0]  # before record 1
    absent.close(snapshot=False)
    assert probes.answers and all("not healthy" in error for error in probes.errors)
    for scores, seq in probes.answers:  # every probe was scored from a whole row (rows_of repeats every 7 seqs)
        assert any(np.isclose(scores[0], value, rtol=1e-5) for value in whole.values()), (seq, scores)
    expected = reference_scores(tmp_path, final)
    answered = 0
    with RankerClient(server.grpc_url, "grpc") as client:
        for _ in range(40):  # the surviving instance answers with the producer's final state
            try:
                scores, seq = client.rank(USER, ITEMS, request_id=b"after")
            except InferError as exc:
                assert "not healthy" in str(exc)  # the killed stub's share of requests
                continue
            answered += 1
            assert seq == final
            np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert answered >= 10
    assert all("not healthy" in error for error in traffic.errors)
    assert traffic.answers and all(np.isfinite(scores).all() for scores, _ in traffic.answers)
