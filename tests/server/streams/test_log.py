"""Segment log: round trips, tailing, crash recovery at every byte, corruption, retention, background appender."""

import bisect
import errno
import functools
import logging
import os
import shutil
import struct
import tempfile
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.streams import (
    LogCorruptError,
    Position,
    SegmentLogReader,
    SegmentLogWriter,
)
from server.streams import log as stream_log
from server.streams import segments as segment_log
from tests import waiting

HEADER = 20


def encode(index: int, payload: bytes) -> bytes:
    """The on-disk record format, written out independently of the module."""
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<IQ", len(payload), index)))
    return struct.pack("<4sIIQ", b"MRT1", len(payload), crc, index) + payload


def make_payload(i: int) -> bytes:
    return b"%d:" % i * (1 + i % 9)


def write(directory, n: int, *, segment_bytes: int = 200, **kwargs) -> list[bytes]:
    payloads = [make_payload(i) for i in range(n)]
    with SegmentLogWriter(directory, segment_bytes=segment_bytes, fsync="never", **kwargs) as writer:
        for i, payload in enumerate(payloads):
            assert writer.append(payload) == i
    return payloads


def read_all(directory, **kwargs) -> list[tuple[int, bytes]]:
    with SegmentLogReader(directory, **kwargs) as reader:
        return reader.read()


def segments(directory) -> list:
    return sorted(directory.glob("*.seg"))


def expected_segment_starts(payloads: list[bytes], segment_bytes: int) -> list[int]:
    starts, size = [0], 0
    for i, payload in enumerate(payloads):
        if size > 0 and size + HEADER + len(payload) > segment_bytes:
            starts.append(i)
            size = 0
        size += HEADER + len(payload)
    return starts


def record_bounds(payloads: list[bytes]) -> list[int]:
    bounds = [0]
    for payload in payloads:
        bounds.append(bounds[-1] + HEADER + len(payload))
    return bounds


def flip(path, offset: int) -> bytes:
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[offset] ^= 0x41
    path.write_bytes(bytes(damaged))
    return original


wait_until = functools.partial(waiting.wait_until, timeout_s=5.0, poll_s=0.001)


# ----------------------------------------------------------------- round trips


def test_round_trip_across_segments_matches_on_disk_format(tmp_path):
    payloads = write(tmp_path, 60, segment_bytes=200)
    starts = expected_segment_starts(payloads, 200)
    assert len(starts) >= 5
    assert [int(p.stem) for p in segments(tmp_path)] == starts
    for first, end, path in zip(starts, starts[1:] + [len(payloads)], segments(tmp_path)):
        assert path.name == f"{first:020d}.seg"
        assert path.read_bytes() == b"".join(encode(i, payloads[i]) for i in range(first, end))
    assert read_all(tmp_path) == list(enumerate(payloads))


def test_reader_resumes_from_any_start_record(tmp_path):
    payloads = write(tmp_path, 45, segment_bytes=150)
    expected = list(enumerate(payloads))
    for start in range(len(payloads) + 3):
        with SegmentLogReader(tmp_path, start_record=start) as reader:
            assert reader.read() == expected[start:]
            assert reader.next_record == max(start, len(payloads))
    with pytest.raises(ValueError, match="start_record requires >= 0, got -1"):
        SegmentLogReader(tmp_path, start_record=-1)


def test_reader_resumes_exactly_from_a_position(tmp_path):
    payloads = write(tmp_path, 50, segment_bytes=180)
    expected = list(enumerate(payloads))
    positions = []
    with SegmentLogReader(tmp_path) as reader:
        while batch := reader.read(max_records=7):
            positions.append(reader.position)
            assert reader.position.record == reader.next_record == batch[-1][0] + 1
    assert positions == sorted(positions) and len(positions) == 8
    for position in positions:
        assert read_all(tmp_path, start_record=position) == expected[position.record :]
    with pytest.raises(ValueError, match="lies past the end of its segment"):
        SegmentLogReader(tmp_path, start_record=Position(0, 10_000, 3))
    with pytest.raises(ValueError, match="no longer exists"):
        SegmentLogReader(tmp_path, start_record=Position(1, 0, 1))


def test_tailing_follows_appends_and_segment_rolls(tmp_path):
    with SegmentLogWriter(tmp_path, segment_bytes=200, fsync="batch") as writer:
        reader = SegmentLogReader(tmp_path)
        assert reader.read() == []
        first = [make_payload(i) for i in range(3)]
        for payload in first:
            writer.append(payload)
        assert reader.read() == list(enumerate(first))
        assert reader.read() == []
        # The next batch fills the segment the reader stopped in, then rolls twice.
        more = [make_payload(i) for i in range(3, 25)]
        for payload in more:
            writer.append(payload)
        assert len(segments(tmp_path)) >= 3
        assert reader.read(max_records=4) == [(i, make_payload(i)) for i in range(3, 7)]
        assert reader.read() == [(i, make_payload(i)) for i in range(7, 25)]
        assert reader.read() == []
        writer.append(b"last")
        assert reader.read() == [(25, b"last")]
        assert reader.next_record == 26
        reader.close()


def test_segment_boundaries_are_exact(tmp_path):
    with SegmentLogWriter(tmp_path, segment_bytes=100, fsync="never") as writer:
        for i in range(5):
            writer.append(bytes([i]) * 30)  # two 50-byte records fill a segment exactly
        writer.append(b"b" * 250)  # bigger than a segment: alone in one
        writer.append(b"c")
    sizes = [(int(p.stem), p.stat().st_size) for p in segments(tmp_path)]
    assert sizes == [(0, 100), (2, 100), (4, 50), (5, 270), (6, 21)]
    assert [i for i, _ in read_all(tmp_path)] == list(range(7))


def test_reader_rereads_a_segment_that_grew_and_rolled_while_it_looked(tmp_path, monkeypatch):
    writer = SegmentLogWriter(tmp_path, segment_bytes=200, fsync="never")
    writer.append(b"zero")
    reader = SegmentLogReader(tmp_path)
    assert reader.read() == [(0, b"zero")]
    real_list = segment_log.list_segments

    def list_after_the_writer_moved_on(directory):
        if writer.next_index == 1:  # between the reader's end-of-file and its listing
            for i in range(1, 12):
                writer.append(make_payload(i))
        return real_list(directory)

    monkeypatch.setattr(stream_log, "list_segments", list_after_the_writer_moved_on)
    assert len(segments(tmp_path)) == 1
    assert reader.read() == [(i, make_payload(i)) for i in range(1, 12)]
    assert len(segments(tmp_path)) >= 2
    reader.close()
    writer.close()


def test_reader_rereads_bytes_that_a_recovery_replaced(tmp_path, monkeypatch):
    first, third = tmp_path / f"{0:020d}.seg", tmp_path / f"{2:020d}.seg"
    first.write_bytes(encode(0, b"a") + bytes(64))  # a crash left zeros after record 0
    reader = SegmentLogReader(tmp_path)
    assert reader.read() == [(0, b"a")]
    real_list = segment_log.list_segments

    def list_after_a_recovery(directory):
        if not third.exists():  # truncate the zeros, append, roll: all while the reader looked
            first.write_bytes(encode(0, b"a") + encode(1, b"b"))
            third.write_bytes(encode(2, b"c"))
        return real_list(directory)

    monkeypatch.setattr(stream_log, "list_segments", list_after_a_recovery)
    assert reader.read() == [(1, b"b"), (2, b"c")]
    reader.close()


def test_partial_record_at_tail_is_not_yet_written(tmp_path):
    write(tmp_path, 3, segment_bytes=1000)
    path = segments(tmp_path)[0]
    record = encode(3, b"x" * 50)
    reader = SegmentLogReader(tmp_path)
    assert [i for i, _ in reader.read()] == [0, 1, 2]
    with open(path, "ab") as f:
        for piece in (record[:7], record[7:HEADER], record[HEADER:40], record[40:]):
            assert reader.read() == []
            f.write(piece)
            f.flush()
    assert reader.read() == [(3, b"x" * 50)]
    reader.close()


@given(
    ops=st.lists(st.one_of(st.integers(0, 300), st.sampled_from(["read", "read3"])), max_size=50),
    segment_bytes=st.integers(1, 700),
    start=st.integers(0, 60),
)
def test_everything_appended_is_read_back_in_order(ops, segment_bytes, start):
    with tempfile.TemporaryDirectory() as directory:
        appended, seen = [], []
        with SegmentLogWriter(directory, segment_bytes=segment_bytes, fsync="never") as writer:
            reader = SegmentLogReader(directory)
            for op in ops:
                if op == "read":
                    seen += reader.read()
                elif op == "read3":
                    seen += reader.read(max_records=3)
                else:
                    payload = bytes([len(appended) % 251]) * op
                    assert writer.append(payload) == len(appended)
                    appended.append(payload)
            seen += reader.read()
            reader.close()
        assert seen == list(enumerate(appended))
        assert read_all(directory, start_record=min(start, len(appended))) == list(enumerate(appended))[start:]
        with SegmentLogWriter(directory, segment_bytes=segment_bytes) as reopened:
            assert reopened.next_index == len(appended)
            assert reopened.recovered_bytes == 0


# ------------------------------------------------------------- crash recovery


def test_recovers_a_clean_prefix_after_a_cut_at_every_offset(tmp_path, caplog):
    source = tmp_path / "source"
    payloads = write(source, 16, segment_bytes=320)
    last = segments(source)[-1]
    first = int(last.stem)
    assert first > 0
    data = last.read_bytes()
    bounds = record_bounds(payloads[first:])
    assert bounds[-1] == len(data) and len(bounds) >= 5
    cuts = list(range(bounds[-2], bounds[-1] + 1)) + [1, HEADER - 1, HEADER + 1, bounds[1] + 3, bounds[2] - 1]
    for cut in cuts:
        work = tmp_path / f"cut{cut}"
        shutil.copytree(source, work)
        (work / last.name).write_bytes(data[:cut])
        kept = bisect.bisect_right(bounds, cut) - 1
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="server.streams.log"):
            writer = SegmentLogWriter(work, segment_bytes=320, fsync="batch")
        assert writer.next_index == first + kept
        assert writer.recovered_bytes == cut - bounds[kept]
        assert (work / last.name).stat().st_size == bounds[kept]
        if cut != bounds[kept]:
            assert f"segment {work / last.name} offset {bounds[kept]}: truncated" in caplog.text
        else:
            assert caplog.text == ""
        assert writer.append(b"after the crash") == first + kept
        writer.close()
        assert read_all(work) == list(enumerate(payloads[: first + kept] + [b"after the crash"]))


def test_zero_filled_tail_is_torn(tmp_path):
    payloads = write(tmp_path, 5, segment_bytes=1000)
    path = segments(tmp_path)[0]
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(bytes(300))
    assert read_all(tmp_path) == list(enumerate(payloads))
    with SegmentLogWriter(tmp_path) as writer:
        assert writer.recovered_bytes == 300
        assert writer.next_index == 5
    assert path.stat().st_size == size


def test_flipped_byte_in_a_sealed_segment_is_reported_by_the_reader(tmp_path):
    payloads = write(tmp_path, 30, segment_bytes=200)
    sealed = segments(tmp_path)[1]
    first = int(sealed.stem)
    end = int(segments(tmp_path)[2].stem)
    bounds = record_bounds(payloads[first:end])
    assert bounds[-1] == sealed.stat().st_size and len(bounds) >= 3
    for offset in range(bounds[-1]):
        original = flip(sealed, offset)
        damaged = bisect.bisect_right(bounds, offset) - 1
        with SegmentLogReader(tmp_path) as reader:
            assert reader.read() == list(enumerate(payloads))[: first + damaged]
            for _ in range(2):
                with pytest.raises(LogCorruptError) as info:
                    reader.read()
                assert (info.value.segment, info.value.offset) == (sealed, bounds[damaged])
                assert str(info.value).startswith(f"segment {sealed} offset {bounds[damaged]}: ")
            assert reader.next_record == first + damaged
        sealed.write_bytes(original)
    assert read_all(tmp_path) == list(enumerate(payloads))


def test_flipped_byte_mid_newest_segment_fails_recovery_without_truncating(tmp_path):
    payloads = write(tmp_path, 16, segment_bytes=300)
    newest = segments(tmp_path)[-1]
    first = int(newest.stem)
    bounds = record_bounds(payloads[first:])
    assert len(bounds) >= 4
    for offset in range(bounds[1], bounds[-2]):
        original = flip(newest, offset)
        damaged = bisect.bisect_right(bounds, offset) - 1
        for _ in range(2):  # the failed open released the directory lock
            with pytest.raises(LogCorruptError) as info:
                SegmentLogWriter(tmp_path)
            assert (info.value.segment, info.value.offset) == (newest, bounds[damaged])
        with pytest.raises(LogCorruptError):
            read_all(tmp_path, start_record=first + damaged)
        assert newest.read_bytes() != original and len(newest.read_bytes()) == len(original)
        newest.write_bytes(original)


def test_two_damaged_records_at_the_end_are_corruption_not_a_tail(tmp_path):
    payloads = write(tmp_path, 12, segment_bytes=300)
    newest = segments(tmp_path)[-1]
    bounds = record_bounds(payloads[int(newest.stem) :])
    flip(newest, bounds[-3] + HEADER)
    flip(newest, bounds[-2] + HEADER)
    reason = f"offset {bounds[-3]}: checksum mismatch \\(record {len(payloads) - 2}\\)"
    with pytest.raises(LogCorruptError, match=reason):
        SegmentLogWriter(tmp_path)


def test_flipped_byte_in_the_final_record_is_a_torn_tail(tmp_path):
    payloads = write(tmp_path, 12, segment_bytes=300)
    newest = segments(tmp_path)[-1]
    bounds = record_bounds(payloads[int(newest.stem) :])
    final = bounds[-2]
    for offset in [final + 8, final + 11, final + 12, final + 19] + list(range(final + HEADER, bounds[-1])):
        original = flip(newest, offset)
        assert read_all(tmp_path) == list(enumerate(payloads[:-1]))
        with SegmentLogWriter(tmp_path) as writer:
            assert writer.recovered_bytes == bounds[-1] - final
            assert writer.next_index == len(payloads) - 1
        assert newest.read_bytes() == original[:final]
        newest.write_bytes(original)


def test_index_out_of_sequence_and_missing_segment_are_corruption(tmp_path):
    (tmp_path / f"{0:020d}.seg").write_bytes(encode(0, b"a") + encode(1, b"b") + encode(3, b"d") + encode(4, b"e"))
    with SegmentLogReader(tmp_path) as reader:
        assert reader.read() == [(0, b"a"), (1, b"b")]
        with pytest.raises(LogCorruptError, match="offset 42: record index 3, expected 2"):
            reader.read()
    with pytest.raises(LogCorruptError, match="record index 3, expected 2"):
        SegmentLogWriter(tmp_path)

    other = tmp_path / "gap"
    write(other, 40, segment_bytes=150)
    names = segments(other)
    names[2].unlink()
    with SegmentLogReader(other) as reader:
        assert [i for i, _ in reader.read()] == list(range(int(names[2].stem)))
        with pytest.raises(LogCorruptError, match=f"segment starts at record {int(names[3].stem)}, expected"):
            reader.read()


# ------------------------------------------------------------ writer behaviour


def test_oversize_payload_is_rejected(tmp_path):
    with SegmentLogWriter(tmp_path, max_payload_bytes=100, segment_bytes=50) as writer:
        with pytest.raises(ValueError, match="payload of 101 bytes exceeds max_payload_bytes=100"):
            writer.append(b"x" * 101)
        assert writer.next_index == 0
        assert writer.append(b"y" * 100) == 0
        assert writer.append(b"z") == 1
    assert [p.stat().st_size for p in segments(tmp_path)] == [HEADER + 100, HEADER + 1]
    with pytest.raises(LogCorruptError, match="declared length 100 exceeds max_payload_bytes=60"):
        read_all(tmp_path, max_payload_bytes=60)


def test_retention_deletes_only_wholly_older_segments(tmp_path):
    payloads = write(tmp_path, 40, segment_bytes=150)
    starts = [int(p.stem) for p in segments(tmp_path)]
    assert len(starts) >= 6
    with SegmentLogWriter(tmp_path, segment_bytes=150) as writer:
        assert writer.delete_segments_before(starts[1] - 1) == []
        assert writer.delete_segments_before(starts[1]) == [tmp_path / f"{starts[0]:020d}.seg"]
        deleted = writer.delete_segments_before(starts[3] + 1)
        assert deleted == [tmp_path / f"{s:020d}.seg" for s in starts[1:3]]
        assert read_all(tmp_path, start_record=starts[3]) == list(enumerate(payloads))[starts[3] :]
        with pytest.raises(ValueError, match=f"start_record 0 precedes the oldest retained record {starts[3]}"):
            SegmentLogReader(tmp_path)
        deleted = writer.delete_segments_before(10**9)
        assert [int(p.stem) for p in deleted] == starts[3:-1]
        assert segments(tmp_path) == [tmp_path / f"{starts[-1]:020d}.seg"]
        assert writer.append(b"more") == 40
    assert read_all(tmp_path, start_record=starts[-1])[-1] == (40, b"more")


def test_fsync_policies(tmp_path, monkeypatch):
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    # "batch" and "always" also fsync the directory once: opening created the first segment.
    for policy, after_appends, after_sync in (("never", 0, 0), ("batch", 0, 2), ("always", 6, 7)):
        calls.clear()
        with SegmentLogWriter(tmp_path / policy, fsync=policy) as writer:
            calls.clear()
            for i in range(5):
                writer.append(b"r%d" % i)
            assert len(calls) == after_appends
            writer.sync()
            assert len(calls) == after_sync
    with pytest.raises(ValueError, match="fsync requires one of .* got 'sometimes'"):
        SegmentLogWriter(tmp_path / "bad", fsync="sometimes")


def test_one_writer_per_directory(tmp_path):
    writer = SegmentLogWriter(tmp_path)
    with pytest.raises(BlockingIOError, match="is open by another writer"):
        SegmentLogWriter(tmp_path)
    writer.close()
    writer.close()
    with pytest.raises(RuntimeError, match="is closed"):
        writer.append(b"x")
    with SegmentLogWriter(tmp_path) as again:
        assert again.append(b"x") == 0


def test_failed_write_leaves_no_partial_record(tmp_path, monkeypatch):
    real_writev = os.writev

    def half_then_enospc(fd, buffers):
        os.write(fd, bytes(buffers[0])[:9])
        raise OSError(errno.ENOSPC, "No space left on device")

    with SegmentLogWriter(tmp_path, fsync="never") as writer:
        writer.append(b"one")
        monkeypatch.setattr(os, "writev", half_then_enospc)
        with pytest.raises(OSError, match="No space left"):
            writer.append(b"two")
        monkeypatch.setattr(os, "writev", real_writev)
        assert writer.next_index == 1
        assert writer.append(b"three") == 1
    assert read_all(tmp_path) == [(0, b"one"), (1, b"three")]


def test_retention_deletes_only_sealed_old_enough_segments_before_a_record(tmp_path):
    with SegmentLogWriter(tmp_path, segment_bytes=64) as writer:
        for i in range(10):
            writer.append(b"x" * 40)  # one record per segment
    firsts = lambda: sorted(int(p.stem) for p in tmp_path.glob("*.seg"))  # noqa: E731
    assert segment_log.delete_sealed_segments(tmp_path, 100, min_age_s=3600) == []  # too young
    assert len(segment_log.delete_sealed_segments(tmp_path, 4)) == 4
    assert firsts() == list(range(4, 10))
    segment_log.delete_sealed_segments(tmp_path, 100)
    assert firsts() == [9]  # never the newest
    with SegmentLogReader(tmp_path, start_record=9) as reader:
        assert len(reader.read()) == 1
