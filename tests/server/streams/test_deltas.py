"""Delta records (server.streams.deltas) and their file log (server.streams.delta_log): round trips,
any flipped byte or cut detected, order enforced, a corrupt record never returned."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.streams import SegmentLogWriter
from server.streams.delta_log import FileDeltaReader, FileDeltaWriter
from server.streams.deltas import SPARSE, DeltaError, DeltaRecord
from updater.tools import inspect, verify


@st.composite
def records(draw):
    seq = draw(st.integers(1, 2**40))
    created = draw(st.floats(0, 2e9))
    if draw(st.booleans()):
        n, dim, m = draw(st.integers(0, 20)), draw(st.integers(1, 8)), draw(st.integers(0, 10))
        rng = np.random.default_rng(draw(st.integers(0, 1000)))
        return DeltaRecord.sparse(seq, created, rng.integers(0, 2**63, n, dtype=np.uint64),
                                  rng.standard_normal((n, dim), dtype=np.float32),
                                  rng.integers(0, 2**63, m, dtype=np.uint64), table_id=draw(st.integers(0, 3)))
    shapes = draw(st.lists(st.lists(st.integers(0, 4), max_size=3), max_size=4))
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    return DeltaRecord.dense(seq, created, {f"t{i}": rng.standard_normal(tuple(s), dtype=np.float32)
                                            for i, s in enumerate(shapes)})


def assert_same(a: DeltaRecord, b: DeltaRecord):
    assert (a.seq, a.created_s, a.kind, a.table_id) == (b.seq, b.created_s, b.kind, b.table_id)
    if a.kind == SPARSE:
        np.testing.assert_array_equal(a.fids, b.fids)
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_array_equal(a.evicted, b.evicted)
    else:
        assert list(a.dense_state) == list(b.dense_state)
        for k in a.dense_state:
            x, y = a.dense_state[k], b.dense_state[k]
            assert (x.dtype, x.shape, x.tobytes()) == (y.dtype, y.shape, y.tobytes())


@given(record=records())
def test_round_trip(record):
    assert_same(DeltaRecord.decode(record.encode()), record)


# A dense record as the trainer wrote it while serving still held torch tensors (commit 13b33b2:
# DeltaRecord.dense(7, 1700000000.5, {"mlp.0.weight": torch.arange(6.).reshape(2, 3) / 4,
# "mlp.0.bias": torch.tensor([-1.5, 2.0]), "bias": torch.tensor([0.25])}).encode()).
TORCH_ERA_DENSE_RECORD = bytes.fromhex(
    "4d52544401000200070000000000000000002040fc54d9410000000000000000000000004d525454454e53319b000000"
    "5b7b226e616d65223a226d6c702e302e776569676874222c226474797065223a22666c6f61743332222c227368617065"
    "223a5b322c335d7d2c7b226e616d65223a226d6c702e302e62696173222c226474797065223a22666c6f61743332222c"
    "227368617065223a5b325d7d2c7b226e616d65223a2262696173222c226474797065223a22666c6f61743332222c2273"
    "68617065223a5b315d7d5d000000000000803e0000003f0000403f0000803f0000a03f0000c0bf000000400000803e70"
    "0ca1100baba69d"
)


def test_a_dense_record_of_the_torch_era_decodes_to_the_same_numpy_bytes():
    record = DeltaRecord.decode(TORCH_ERA_DENSE_RECORD)
    expected = {"mlp.0.weight": np.arange(6, dtype=np.float32).reshape(2, 3) / 4,
                "mlp.0.bias": np.array([-1.5, 2.0], np.float32), "bias": np.array([0.25], np.float32)}
    assert (record.seq, record.created_s) == (7, 1700000000.5)
    assert_same(record, DeltaRecord.dense(7, 1700000000.5, expected))
    assert record.encode() == TORCH_ERA_DENSE_RECORD


@given(record=records(), data=st.data())
def test_any_flipped_byte_is_detected(record, data):
    blob = bytearray(record.encode())
    offset = data.draw(st.integers(0, len(blob) - 1))
    blob[offset] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(DeltaError):
        DeltaRecord.decode(bytes(blob))


def test_truncation_is_detected():
    blob = DeltaRecord.sparse(1, 1.0, [1, 2], np.ones((2, 3), np.float32)).encode()
    for size in range(len(blob)):
        with pytest.raises(DeltaError):
            DeltaRecord.decode(blob[:size])


def test_stream_enforces_sequence_and_resumes(tmp_path):
    with FileDeltaWriter(tmp_path) as writer:
        assert writer.next_seq == 1
        with pytest.raises(ValueError, match="requires 1"):
            writer.append(DeltaRecord.sparse(2, 1.0, [1], np.ones((1, 2), np.float32)))
        for seq in range(1, 6):
            writer.append(DeltaRecord.sparse(seq, float(seq), [seq], np.full((1, 2), seq, np.float32)))
    reader = FileDeltaReader(tmp_path, after_seq=3)
    assert [r.seq for r in reader.read()] == [4, 5]
    assert reader.read() == []
    with FileDeltaWriter(tmp_path) as writer:
        assert writer.next_seq == 6
        writer.append(DeltaRecord.sparse(6, 6.0, [6], np.ones((1, 2), np.float32)))
    assert [r.seq for r in reader.read()] == [6]
    ok, message = verify(tmp_path)
    assert ok and "6 records, seq 1..6" in message
    assert inspect(tmp_path)[0]["kinds"] == {"sparse": 6}


def test_corrupt_delta_is_sticky_and_never_returned(tmp_path):
    good = DeltaRecord.sparse(1, 1.0, [1], np.ones((1, 2), np.float32)).encode()
    bad = bytearray(DeltaRecord.sparse(2, 1.0, [2], np.ones((1, 2), np.float32)).encode())
    bad[-6] ^= 0xFF
    with SegmentLogWriter(tmp_path) as log:  # bypasses FileDeltaWriter's own check, as a bug or disk might
        log.append(good)
        log.append(bytes(bad))
    reader = FileDeltaReader(tmp_path)
    assert [r.seq for r in reader.read()] == [1]
    for _ in range(2):
        with pytest.raises(DeltaError, match="checksum"):
            reader.read()
    ok, message = verify(tmp_path)
    assert not ok and "checksum" in message
