"""Feedback intake without Triton: the impression id it echoes and the labels it may carry."""

import numpy as np
import pytest

from server.runtime.feedback import parse_feedback_request
from server.runtime.requests import RequestError, new_impression_ids


def inputs(labels, **extra):
    return {"request_id": np.array([b"r"], dtype=object), "item_fids": np.arange(1, len(labels) + 1, dtype=np.uint64),
            "labels": np.asarray(labels, np.float32), **extra}


def test_feedback_carries_the_impression_id_it_echoes():
    (iid,) = new_impression_ids(1)
    record = parse_feedback_request(inputs([1.0], impression_id=np.array([iid], dtype=object)), 5.0)
    assert (record.request_id, record.impression_id) == (b"r", iid)
    assert parse_feedback_request(inputs([1.0]), 5.0).impression_id == b""  # callers that send none
    with pytest.raises(RequestError, match="impression_id"):
        parse_feedback_request(inputs([1.0], impression_id=np.array([b"mine"], dtype=object)), 5.0)


@pytest.mark.parametrize("label", [1.5, -0.5, 5.0])
def test_labels_outside_the_declared_range_are_refused(label):
    with pytest.raises(RequestError, match=r"'labels' requires values in \[0, 1\]"):
        parse_feedback_request(inputs([1.0, label]), 5.0)
    with pytest.raises(RequestError, match=r"in \[0, 0.5\]"):
        parse_feedback_request(inputs([0.75]), 5.0, label_range=(0.0, 0.5))
    assert parse_feedback_request(inputs([0.0, 0.5, 1.0]), 5.0).labels.tolist() == [0.0, 0.5, 1.0]
