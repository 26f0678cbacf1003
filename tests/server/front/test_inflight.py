"""server.front.inflight: what Triton has, and what it lost, named for the crash's log line."""

import hashlib

from server.front.inflight import LOST, InFlight


def test_open_requests_and_lost_ones_are_suspects_answered_ones_are_not():
    flight = InFlight()
    answered = flight.opened("http", "ranker", "127.0.0.1:1", b"fine")
    lost = flight.opened("grpc", "ranker", "127.0.0.1:2", b"killer")
    still_open = flight.opened("http", "feedback", "127.0.0.1:3", b"waiting")
    flight.closed(answered)
    flight.closed(lost, lost=True)
    lines = flight.suspects()
    assert len(lines) == 2
    assert f"grpc model=ranker bytes=6 sha256={hashlib.sha256(b'killer').hexdigest()[:16]} caller=127.0.0.1:2" \
        in lines[0]
    assert "http model=feedback bytes=7" in lines[1] and "caller=127.0.0.1:3" in lines[1]
    flight.closed(still_open)
    assert len(flight.suspects()) == 1  # the lost one stays a suspect ...
    assert flight.suspects(within_s=-1.0) == []  # ... for a while


def test_lost_requests_are_bounded_and_keep_no_body():
    flight = InFlight()
    for i in range(LOST + 10):
        flight.closed(flight.opened("http", "ranker", "c", b"x" * 1000), lost=True)
    assert len(flight.suspects()) == LOST
    assert all(f.body is None for f in flight._lost)  # hashed, the body released
