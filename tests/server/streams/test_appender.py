"""BackgroundAppender (server.streams.appender): every record exactly once, waiters after their sync,
group commit, shedding, writer errors, close; with linger_s, records that arrive together share one
append run and one sync. ``synced_writer`` records the index each sync covered."""

import errno
import logging
import threading
import time

import pytest

from server.streams import BackgroundAppender, SegmentLogReader, SegmentLogWriter
from tests.waiting import wait_until


def read_all(directory) -> list[tuple[int, bytes]]:
    with SegmentLogReader(directory) as reader:
        return reader.read()


def synced_writer(tmp_path, monkeypatch):
    writer = SegmentLogWriter(tmp_path, fsync="batch")
    syncs = []
    real_sync = writer.sync
    monkeypatch.setattr(writer, "sync", lambda: (real_sync(), syncs.append(writer.next_index)))
    return writer, syncs


def test_records_queued_during_the_linger_share_one_sync(tmp_path, monkeypatch):
    writer, syncs = synced_writer(tmp_path, monkeypatch)
    appender = BackgroundAppender(writer, linger_s=600.0)  # only flush ends the wait here
    for i in range(50):
        assert appender.submit(b"r%d" % i)
    assert appender.flush()
    assert syncs == [50] and appender.written == 50
    assert appender.submit(b"durable", wait=True)  # a waiter does not sit out the linger either
    appender.close()
    with SegmentLogReader(tmp_path) as reader:
        assert reader.read()[-1] == (50, b"durable") and appender.written == 51


def test_close_writes_what_is_lingering(tmp_path):
    appender = BackgroundAppender(SegmentLogWriter(tmp_path, fsync="batch"), linger_s=600.0)
    for i in range(5):
        appender.submit(b"r%d" % i)
    appender.close()
    assert appender.written == 5


def test_negative_linger_is_refused(tmp_path):
    with pytest.raises(ValueError, match="linger_s requires >= 0, got -1"):
        BackgroundAppender(SegmentLogWriter(tmp_path), linger_s=-1)


def test_appender_concurrent_submitters_each_record_exactly_once(tmp_path):
    threads, per_thread = 8, 300
    appender = BackgroundAppender(SegmentLogWriter(tmp_path, segment_bytes=4096, fsync="batch"), max_queue=64)

    def submit_all(t):
        for i in range(per_thread):
            assert appender.submit(b"t%d-%d" % (t, i), wait=i % 50 == 0)

    workers = [threading.Thread(target=submit_all, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert appender.flush(timeout_s=10)
    appender.close()
    records = read_all(tmp_path)
    assert [i for i, _ in records] == list(range(threads * per_thread))
    payloads = [p for _, p in records]
    for t in range(threads):
        mine = [p for p in payloads if p.startswith(b"t%d-" % t)]
        assert mine == [b"t%d-%d" % (t, i) for i in range(per_thread)]
    assert (appender.written, appender.shed, appender.failed) == (threads * per_thread, 0, 0)
    assert appender.bytes_written == sum(len(p) for p in payloads)


def test_appender_wait_returns_after_append_and_sync(tmp_path, monkeypatch):
    writer, synced_through = synced_writer(tmp_path, monkeypatch)
    appender = BackgroundAppender(writer)
    for i in range(20):
        assert appender.submit(b"durable-%d" % i, wait=True)
        assert synced_through and synced_through[-1] >= i + 1
        assert read_all(tmp_path)[-1] == (i, b"durable-%d" % i)
    assert appender.written == 20
    appender.close()


def test_appender_group_commit_syncs_once_per_batch(tmp_path, monkeypatch):
    writer = SegmentLogWriter(tmp_path, fsync="batch")
    gate, syncs = threading.Event(), []
    real_append, real_sync = writer.append, writer.sync
    monkeypatch.setattr(writer, "append", lambda p: (gate.wait(5), real_append(p))[1])
    monkeypatch.setattr(writer, "sync", lambda: (syncs.append(writer.next_index), real_sync()))
    appender = BackgroundAppender(writer)
    appender.submit(b"first")
    wait_until(lambda: appender.queued == 0)
    waiters = [threading.Thread(target=appender.submit, args=(b"w%d" % i,), kwargs={"wait": True}) for i in range(10)]
    for waiter in waiters:
        waiter.start()
    wait_until(lambda: appender.queued == 10)
    gate.set()
    for waiter in waiters:
        waiter.join()
    assert syncs == [1, 11]
    appender.close()


def test_appender_sheds_when_the_queue_stays_full(tmp_path, monkeypatch):
    writer = SegmentLogWriter(tmp_path, fsync="never")
    gate = threading.Event()
    real_append = writer.append
    monkeypatch.setattr(writer, "append", lambda p: (gate.wait(5), real_append(p))[1])
    appender = BackgroundAppender(writer, max_queue=2)
    assert appender.submit(b"a")
    wait_until(lambda: appender.queued == 0)
    assert appender.submit(b"b") and appender.submit(b"c")
    assert appender.queued == 2
    assert appender.submit(b"d", timeout_s=0) is False
    assert appender.shed == 1
    started = time.monotonic()
    assert appender.submit(b"e", timeout_s=0.05) is False
    assert time.monotonic() - started >= 0.05
    assert appender.shed == 2
    results = []
    blocked = threading.Thread(target=lambda: results.append(appender.submit(b"f", timeout_s=5)))
    blocked.start()
    time.sleep(0.02)
    gate.set()
    blocked.join()
    assert results == [True]
    appender.close()
    assert (appender.written, appender.shed, appender.failed) == (4, 2, 0)
    assert read_all(tmp_path) == [(0, b"a"), (1, b"b"), (2, b"c"), (3, b"f")]


def test_appender_surfaces_writer_errors_and_keeps_running(tmp_path, monkeypatch, caplog):
    writer = SegmentLogWriter(tmp_path, fsync="batch")
    real_append, real_sync = writer.append, writer.sync
    fail_sync = []

    def append(payload):
        if payload.startswith(b"bad"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_append(payload)

    def sync():
        if fail_sync:
            fail_sync.pop()
            raise OSError(errno.EIO, "Input/output error")
        real_sync()

    monkeypatch.setattr(writer, "append", append)
    monkeypatch.setattr(writer, "sync", sync)
    appender = BackgroundAppender(writer, name="feedback")
    with caplog.at_level(logging.ERROR, logger="server.streams.appender"):
        assert appender.submit(b"ok1", wait=True)
        with pytest.raises(OSError, match="No space left"):
            appender.submit(b"bad1", wait=True)
        assert appender.submit(b"bad2")
        assert appender.flush(timeout_s=5)
        assert appender.failed == 2
        fail_sync.append(True)
        with pytest.raises(OSError, match="Input/output error"):
            appender.submit(b"unsynced", wait=True)
        assert appender.failed == 3
        assert appender.submit(b"ok2", wait=True)
    assert "log 'feedback': 1 of 1 appends failed" in caplog.text
    assert "sync after 1 appends failed" in caplog.text
    assert (appender.written, appender.failed, appender.shed) == (2, 3, 0)
    appender.close()
    assert [p for _, p in read_all(tmp_path)] == [b"ok1", b"unsynced", b"ok2"]


def test_appender_close_is_idempotent_and_final(tmp_path):
    writer = SegmentLogWriter(tmp_path, fsync="never", max_payload_bytes=10)
    appender = BackgroundAppender(writer, name="deltas")
    with pytest.raises(ValueError, match="payload of 11 bytes exceeds max_payload_bytes=10"):
        appender.submit(b"x" * 11)
    for i in range(100):
        assert appender.submit(b"%d" % i)
    appender.close()
    appender.close()
    assert appender.written == 100
    assert appender.flush(timeout_s=0)
    with pytest.raises(RuntimeError, match="BackgroundAppender 'deltas' is closed"):
        appender.submit(b"late")
    with pytest.raises(RuntimeError, match="is closed"):
        writer.append(b"late")
    assert [p for _, p in read_all(tmp_path)] == [b"%d" % i for i in range(100)]
    import server.streams

    assert {"BackgroundAppender", "LogCorruptError", "Position", "SegmentLogReader", "SegmentLogWriter",
            "delete_sealed_segments", "segment_bytes_from_env"} <= set(server.streams.__all__)
