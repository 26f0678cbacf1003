"""Feature and feedback record formats: version 2 round-trips, version 1 bytes still decode, and any
other byte string is refused with ValueError (never misread, never another exception)."""

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.streams.records import MAX_IMPRESSION_ID_BYTES, FeatureRecord, FeedbackRecord

ids = st.binary(min_size=0, max_size=300)
impression_ids = st.binary(min_size=0, max_size=MAX_IMPRESSION_ID_BYTES)
times = st.floats(allow_nan=False)


def feature_v1(r: FeatureRecord) -> bytes:
    """The feature record as written before issue 20 (the format's reference, kept here)."""
    n, wi = r.item_fids.shape
    return b"".join((struct.pack("<HdqHII", len(r.request_id), r.request_time_s, r.delta_seq, r.user_fids.shape[0],
                                 n, wi), r.request_id, r.user_fids.astype("<u8").tobytes(),
                     r.item_fids.astype("<u8").tobytes(), r.scores.astype("<f4").tobytes()))


def feedback_v1(r: FeedbackRecord) -> bytes:
    return b"".join((struct.pack("<HddI", len(r.request_id), r.event_time_s, r.accepted_time_s, r.item_fids.shape[0]),
                     r.request_id, r.item_fids.astype("<u8").tobytes(), r.labels.astype("<f4").tobytes()))


@st.composite
def feature_records(draw, impression=impression_ids):
    n, wu, wi = draw(st.integers(0, 5)), draw(st.integers(0, 4)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return FeatureRecord(draw(ids), draw(times), draw(st.integers(-2**63, 2**63 - 1)),
                         rng.integers(0, 2**64 - 1, wu, dtype=np.uint64, endpoint=True),
                         rng.integers(0, 2**64 - 1, (n, wi), dtype=np.uint64, endpoint=True),
                         rng.random(n, dtype=np.float32), draw(impression))


@st.composite
def feedback_records(draw, impression=impression_ids):
    m = draw(st.integers(0, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return FeedbackRecord(draw(ids), draw(times), draw(times),
                          rng.integers(0, 2**64 - 1, m, dtype=np.uint64, endpoint=True),
                          rng.random(m, dtype=np.float32), draw(impression))


def same_feature(a: FeatureRecord, b: FeatureRecord) -> bool:
    return ((a.request_id, a.impression_id, a.delta_seq, a.request_time_s)
            == (b.request_id, b.impression_id, b.delta_seq, b.request_time_s)
            and np.array_equal(a.user_fids, b.user_fids) and np.array_equal(a.item_fids, b.item_fids)
            and np.array_equal(a.scores, b.scores))


def same_feedback(a: FeedbackRecord, b: FeedbackRecord) -> bool:
    return ((a.request_id, a.impression_id, a.event_time_s, a.accepted_time_s)
            == (b.request_id, b.impression_id, b.event_time_s, b.accepted_time_s)
            and np.array_equal(a.item_fids, b.item_fids) and np.array_equal(a.labels, b.labels))


@given(feature_records())
def test_feature_record_round_trip(record):
    assert same_feature(FeatureRecord.decode(record.encode()), record)


@given(feedback_records())
def test_feedback_record_round_trip(record):
    assert same_feedback(FeedbackRecord.decode(record.encode()), record)


@given(feature_records(impression=st.just(b"")).filter(lambda r: len(r.request_id) <= 256))
def test_a_version_1_feature_record_still_decodes(record):
    assert same_feature(FeatureRecord.decode(feature_v1(record)), record)


@given(feedback_records(impression=st.just(b"")).filter(lambda r: len(r.request_id) <= 256))
def test_a_version_1_feedback_record_still_decodes(record):
    assert same_feedback(FeedbackRecord.decode(feedback_v1(record)), record)


@settings(max_examples=50)
@given(feature_records(), feedback_records(), st.data())
def test_a_cut_or_extended_record_is_refused(feature, feedback, data):
    for cls, payload in ((FeatureRecord, feature.encode()), (FeedbackRecord, feedback.encode())):
        cut = data.draw(st.integers(0, len(payload) - 1))
        with pytest.raises(ValueError):
            cls.decode(payload[:cut])
        with pytest.raises(ValueError):
            cls.decode(payload + data.draw(st.binary(min_size=1, max_size=9)))


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_value_error(payload):
    for cls in (FeatureRecord, FeedbackRecord):
        try:
            cls.decode(payload)
        except ValueError:
            pass


def test_an_unknown_version_is_refused_by_name():
    payload = bytearray(FeedbackRecord(b"r", 1.0, 1.0, np.ones(1, np.uint64), np.ones(1, np.float32)).encode())
    payload[2] = 3
    with pytest.raises(ValueError, match="version 3"):
        FeedbackRecord.decode(bytes(payload))


def test_an_impression_id_too_long_for_its_length_field_is_refused():
    with pytest.raises(ValueError, match="impression_id at most 255"):
        FeedbackRecord(b"r", 1.0, 1.0, np.ones(1, np.uint64), np.ones(1, np.float32), b"x" * 256).encode()
