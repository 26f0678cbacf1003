"""BackgroundAppender with linger_s: records that arrive together share one append run and one sync."""

import pytest

from server.streams import BackgroundAppender, SegmentLogReader, SegmentLogWriter


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
