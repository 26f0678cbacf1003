"""server.clock: a client's time is accepted only within a window around the server's receive time, for the
ranker's ``timestamp`` and the feedback's ``event_time`` alike."""

import math

import numpy as np
import pytest

from server.clock import ENV, TimeWindow
from server.features import shipped_schema
from server.runtime.feedback import parse_feedback_request
from server.runtime.ranker import parse_rank_request
from server.runtime.requests import RequestError

SCHEMA = shipped_schema()
NOW = 1_764_000_000.0
DAY_S = 86400.0


def rank_inputs(t=None):
    user, items = SCHEMA.encode_request({"user_id": 1}, [{"item_id": 1}])
    inputs = {"user_fids": user, "item_fids": items, "request_id": np.array([b"id"], dtype=object)}
    if t is not None:
        inputs["timestamp"] = np.array([t], np.float64)
    return inputs


def feedback_inputs(t=None):
    inputs = {"request_id": np.array([b"id"], dtype=object), "item_fids": np.array([5], np.uint64),
              "labels": np.array([1.0], np.float32)}
    if t is not None:
        inputs["event_time"] = np.array([t], np.float64)
    return inputs


def test_window_edges():
    window = TimeWindow()
    assert (window.ahead_s, window.behind_s) == (300.0, DAY_S)
    assert window.refusal(NOW + 300, NOW) is None and window.refusal(NOW - DAY_S, NOW) is None
    assert window.refusal(NOW + 301, NOW) == "301 s ahead of"
    assert window.refusal(NOW - 30 * DAY_S, NOW) == "30.0 days behind"
    assert TimeWindow(behind_s=math.inf).refusal(1.0, NOW) is None


@pytest.mark.parametrize("parse,inputs,name", [
    (lambda i, w: parse_rank_request(i, SCHEMA, NOW, window=w).request_time_s, rank_inputs, "timestamp"),
    (lambda i, w: parse_feedback_request(i, NOW, window=w).event_time_s, feedback_inputs, "event_time"),
])
def test_a_client_time_outside_the_window_is_refused_inside_kept_absent_the_servers(parse, inputs, name):
    window = TimeWindow()
    assert parse(inputs(), window) == NOW
    assert parse(inputs(NOW - 3600.0), window) == NOW - 3600.0
    assert parse(inputs(NOW + 60.0), window) == NOW + 60.0
    with pytest.raises(RequestError, match=f"input '{name}' requires a time within 300 s ahead of and 86400 s "
                                           f"behind the server's clock .*40.0 days ahead of it.*--max-time-ahead-s"):
        parse(inputs(NOW + 40 * DAY_S), window)
    with pytest.raises(RequestError, match="365.0 days behind it"):
        parse(inputs(NOW - 365 * DAY_S), window)
    assert parse(inputs(NOW - 365 * DAY_S), TimeWindow(behind_s=math.inf)) == NOW - 365 * DAY_S


def test_the_window_is_checked_by_default():
    with pytest.raises(RequestError, match="ahead of it"):
        parse_rank_request(rank_inputs(NOW + 40 * DAY_S), SCHEMA, NOW)


def test_settings_come_from_the_environment_then_the_model_parameters():
    window = TimeWindow(60.0, math.inf)
    assert TimeWindow.from_settings({}, window.to_env()) == window
    assert TimeWindow.from_settings({"max_time_ahead_s": "5"}, {}) == TimeWindow(ahead_s=5.0)
    assert TimeWindow.from_settings({"max_time_ahead_s": "5"}, {ENV["ahead_s"]: "7"}).ahead_s == 7.0
    assert TimeWindow.from_settings(None, {}) == TimeWindow()
    with pytest.raises(ValueError, match="MONOLITH_MAX_TIME_BEHIND_S .* requires seconds >= 0, got 'soon'"):
        TimeWindow.from_settings({}, {ENV["behind_s"]: "soon"})
    with pytest.raises(ValueError, match="--max-time-ahead-s requires seconds >= 0"):
        TimeWindow(ahead_s=-1.0)
    with pytest.raises(ValueError, match="--max-time-behind-s requires seconds >= 0"):
        TimeWindow(behind_s=math.nan)
