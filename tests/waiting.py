"""Polling until something holds, for tests that watch other threads or processes."""

import time


def wait_until(predicate, what: str = "the condition", timeout_s: float = 20.0, poll_s: float = 0.01) -> None:
    """Polls ``predicate`` every ``poll_s`` until it is true; fails the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(poll_s)
