"""Polling until something holds, for tests that watch other threads or processes."""

import time


def wait_until(predicate, what: str = "the condition", timeout_s: float = 20.0, poll_s: float = 0.01):
    """Polls ``predicate`` every ``poll_s`` until it returns something true, and returns that;
    fails the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(poll_s)
    return value


def wait_for_seq(client, user, items, seq: int, timeout_s: float = 60.0):
    """(scores, delta_seq) of the first ranking of ``user``/``items`` served at ``seq`` or later."""
    def ranked():
        scores, served = client.rank(user, items, request_id=b"poll")
        return (scores, served) if served >= seq else None
    return wait_until(ranked, f"the server to reach delta seq {seq}", timeout_s, poll_s=0.02)
