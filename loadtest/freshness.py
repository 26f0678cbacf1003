"""``monolith-rt loadtest freshness``: time from accepted feedback to a response that reflects it.

Each probe: a never-seen item (fresh FIDs) is scored for a probe user, one
positive action for it is sent through the ``feedback`` model, and the
clock starts when that call returns (the action is durable). The ranker is
then polled with the same request until a response carries a delta_seq past
the one seen at the feedback AND a changed score for the item; the clock
stops at that response. A probe that does not get there within
``timeout_s`` counts as failed.
"""

from __future__ import annotations

import sys
import tempfile
import time
from contextlib import ExitStack

import numpy as np

from server.client import RankerClient
from server.features import FeatureSchema

_POLL_S = 0.005


def probe_once(client: RankerClient, schema: FeatureSchema, k: int, timeout_s: float, tag: str = "fresh",
               timestamp_s: float | None = None) -> float | None:
    """Seconds from accepted feedback to a response reflecting it, or None. ``timestamp_s``: the time its
    ranking requests carry, for a replay on a clock of its own (default: the server's)."""
    # Only FIDs of its own (no shared hour or genre rows), so only its own
    # feedback can change its score (dense weights move once per dense interval).
    user, items = schema.encode_request({"user_id": f"{tag}-user-{k}-{int(time.time() * 1e6)}"},
                                        [{"item_id": f"{tag}-item-{k}-{int(time.time() * 1e6)}"}])
    before, _ = client.rank(user, items, request_id=f"{tag}-{k}-0".encode(), timestamp_s=timestamp_s)
    rid = f"{tag}-{k}".encode()
    _, seq_at_feedback = client.rank(user, items, request_id=rid, timestamp_s=timestamp_s)
    client.feedback(rid, items[:1, 0], [1.0])
    accepted = time.monotonic()
    while time.monotonic() - accepted < timeout_s:
        scores, seq = client.rank(user, items, request_id=f"{tag}-{k}-poll".encode(), timestamp_s=timestamp_s)
        if seq > seq_at_feedback and scores[0] != before[0]:
            return time.monotonic() - accepted
        time.sleep(_POLL_S)
    return None


def summarize(samples: list[float | None]) -> dict:
    done = np.array([s for s in samples if s is not None])
    pct = (lambda q: round(float(np.percentile(done, q)), 3)) if done.size else (lambda q: None)
    return {"probes": len(samples), "failed": int(sum(s is None for s in samples)), "p50_s": pct(50),
            "p99_s": pct(99), "max_s": round(float(done.max()), 3) if done.size else None}


def run_freshness(url: str | None, protocol: str, probes: int, timeout_s: float, sync_interval_ms: float,
                  schema: FeatureSchema, api_key: str | None = None) -> dict:
    from loadtest.stack import spawn_stack, wait_trainer_ready

    with ExitStack() as stack:
        if url is None:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="monolith-fresh-"))
            print("[freshness] starting tritonserver and the online trainer", file=sys.stderr, flush=True)
            server, trainer = stack.enter_context(spawn_stack(data_dir, sync_interval_ms=sync_interval_ms))
            wait_trainer_ready(server.data_dir, trainer)
            url = server.grpc_url if protocol == "grpc" else server.http_url
        client = stack.enter_context(RankerClient(url, protocol, api_key=api_key))
        samples = []
        for k in range(probes):
            samples.append(probe_once(client, schema, k, timeout_s))
            print(f"[freshness] probe {k + 1}/{probes}: "
                  f"{'failed' if samples[-1] is None else f'{samples[-1]:.3f} s'}", file=sys.stderr, flush=True)
    result = summarize(samples)
    result["sync_interval_ms"] = sync_interval_ms
    return result
