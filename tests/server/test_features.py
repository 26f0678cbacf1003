"""FID rule, schema validation, request encoding, and the tensor/record formats."""

import hashlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.features import PAD_FID, FeatureSchema, Slot, fid, fids, load_schema, slot_of
from server.host.launcher import DEFAULT_MODEL_REPOSITORY
from server.streams.records import FeatureRecord, FeedbackRecord
from server.tensor_io import decode_tensors, encode_tensors

SCHEMA_PATH = DEFAULT_MODEL_REPOSITORY / "ranker" / "feature_schema.json"


def test_fid_rule_is_the_documented_one():
    digest = hashlib.blake2b(b"12345", digest_size=8).digest()
    expected = (7 << 48) | (int.from_bytes(digest, "little") & (2**48 - 1))
    assert fid(7, 12345) == fid(7, "12345") == expected
    assert fid(7, b"12345") == expected
    assert fids(7, [12345, "x"]).tolist() == [expected, fid(7, "x")]


@given(slot=st.integers(1, 2**15 - 1), value=st.text())
def test_fid_keeps_slot_and_never_sets_bit_63(slot, value):
    f = fid(slot, value)
    assert f < 2**63
    assert slot_of(np.array([f], np.uint64))[0] == slot
    assert f != PAD_FID


def test_fid_rejects_reserved_slots():
    with pytest.raises(ValueError, match="slot requires"):
        fid(0, "x")
    with pytest.raises(ValueError, match="slot requires"):
        fid(2**15, "x")


def test_shipped_schema_loads_and_encodes_a_request():
    schema = load_schema(SCHEMA_PATH)
    assert schema.dim == 16 and schema.num_fields == 10
    user, items = schema.encode_request(
        {"user_id": 1, "user_age": "25-34", "hour": 13},
        [{"item_id": 5, "item_genres": ["Action", "Comedy"]}, {"item_id": 6}],
    )
    assert user.shape == (schema.user_width,) and items.shape == (2, schema.item_width)
    assert user[0] == fid(1, 1) and user[5] == fid(6, 13) and user[2] == PAD_FID
    assert items[0, 0] == fid(10, 5) and items[0, 1] == fid(11, "Action") and items[0, 3] == PAD_FID
    with pytest.raises(ValueError, match="at most 6 values"):
        schema.encode({"item_genres": list(range(7))}, schema.item_slots)


@pytest.mark.parametrize(
    "slots, message",
    [
        ([Slot("a", 1, "user", 8)], "at least one item slot"),
        ([Slot("a", 1, "item", 8), Slot("a", 2, "user", 8)], "unique"),
        ([Slot("a", 1, "item", 8), Slot("b", 2, "user", 4)], "one embedding dim"),
    ],
)
def test_schema_validation(slots, message):
    with pytest.raises(ValueError, match=message):
        FeatureSchema(tuple(slots))


def test_slot_validation_names_the_slot():
    with pytest.raises(ValueError, match="slot 'x': side"):
        Slot("x", 1, "nowhere", 8)


def test_tensor_blob_round_trip_and_corruption():
    rng = np.random.default_rng(0)
    state = {"w": rng.standard_normal((3, 4), dtype=np.float32), "b": np.zeros(2), "n": np.array([7]),
             "s": np.array(1.5, np.float32)}
    blob = encode_tensors(state)
    back = decode_tensors(blob)
    assert list(back) == list(state)
    for name in state:
        assert (back[name].dtype, back[name].shape, back[name].tobytes()) == \
            (state[name].dtype, state[name].shape, state[name].tobytes())
        assert back[name].flags.writeable
    for offset in range(0, len(blob), 7):
        bad = bytearray(blob)
        bad[offset] ^= 0x10
        with pytest.raises(ValueError):
            decode_tensors(bytes(bad))
    for size in range(len(blob)):
        with pytest.raises(ValueError):
            decode_tensors(blob[:size])


@given(n=st.integers(0, 5), wu=st.integers(0, 4), wi=st.integers(1, 3), rid=st.binary(min_size=1, max_size=40))
def test_feature_record_round_trip(n, wu, wi, rid):
    rng = np.random.default_rng(n)
    record = FeatureRecord(rid, 1.5e9, 42, rng.integers(0, 2**63, wu, dtype=np.uint64),
                           rng.integers(0, 2**63, (n, wi), dtype=np.uint64), rng.random(n, dtype=np.float32))
    payload = record.encode()
    back = FeatureRecord.decode(payload)
    assert back.request_id == rid and back.delta_seq == 42 and back.request_time_s == 1.5e9
    np.testing.assert_array_equal(back.user_fids, record.user_fids)
    np.testing.assert_array_equal(back.item_fids, record.item_fids)
    np.testing.assert_array_equal(back.scores, record.scores)
    with pytest.raises(ValueError, match="header implies"):
        FeatureRecord.decode(payload + b"x")


def test_feedback_record_round_trip():
    record = FeedbackRecord(b"r1", 10.0, 11.0, np.array([5, 6], np.uint64), np.array([1.0, 0.5], np.float32))
    back = FeedbackRecord.decode(record.encode())
    assert (back.request_id, back.event_time_s, back.accepted_time_s) == (b"r1", 10.0, 11.0)
    assert back.item_fids.tolist() == [5, 6] and back.labels.tolist() == [1.0, 0.5]


def test_the_schema_declares_the_label_range(tmp_path):
    import json

    assert (SCHEMA_PATH.exists(), load_schema(SCHEMA_PATH).label_min, load_schema(SCHEMA_PATH).label_max) == \
        (True, 0.0, 1.0)
    raw = json.loads(SCHEMA_PATH.read_text())
    for labels, fault in (({"min": 0.5, "max": 0.2}, "0 <= min <= max <= 1"), ({"min": 0, "max": 5}, "<= 1"),
                          ({"low": 0}, "takes 'min' and 'max'")):
        path = tmp_path / "schema.json"
        path.write_text(json.dumps({**raw, "labels": labels}))
        with pytest.raises(ValueError, match=fault):
            load_schema(path)
    del raw["labels"]
    path.write_text(json.dumps(raw))
    assert (load_schema(path).label_min, load_schema(path).label_max) == (0.0, 1.0)  # the default
