"""server.streams.watch: an append wakes a waiting reader at once, from the first record of a log that
did not exist when the watch began; no append, no wake-up."""

from server.streams import SegmentLogWriter
from server.streams.watch import DirectoryWatch, LogsWatch


def test_a_watch_wakes_on_an_append_and_not_without_one(tmp_path):
    log_dir = tmp_path / "log"
    with SegmentLogWriter(log_dir) as writer, DirectoryWatch([log_dir]) as watch:
        assert watch.active
        assert not watch.wait(0.0)
        writer.append(b"record")
        assert watch.wait(30.0)
        assert not watch.wait(0.0), "the events it woke on are consumed"


def test_a_logs_watch_wakes_on_an_instance_created_after_it(tmp_path):
    root = tmp_path / "feedback_log"
    root.mkdir()
    watch = LogsWatch([root, tmp_path / "feature_log"])
    try:
        assert watch.active and not watch.wait(0.0)
        with SegmentLogWriter(root / "feedback_0") as writer:
            assert watch.wait(30.0), "the new instance's directory"
            while watch.wait(0.0):  # its first segment file, whichever events came together
                pass
            writer.append(b"record")
            assert watch.wait(30.0), "an append to the new instance's log"
    finally:
        watch.close()
