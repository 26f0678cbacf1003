"""Which requests were with tritonserver when it died: the suspects the supervisor logs.

The fronts register every request they forward (``opened``) and close it when
Triton answers (``closed``). A request whose answer never came because the
connection to Triton broke is kept among the last LOST ones, since the fronts
usually notice a dead Triton before the supervisor does. ``suspects()`` lists
both, so the log names a killer request (model, size, a SHA-256 prefix of the
caller's body, the caller's address) within a second of the crash.

The hash is computed only for a lost request (never on the hot path); open
requests keep a reference to the body they already hold.

Concurrency: the fronts and the supervisor share one asyncio loop; nothing
here is called from another thread.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import deque
from dataclasses import dataclass

LOST = 32


@dataclass
class Forwarded:
    protocol: str  # "http" or "grpc"
    model: str
    caller: str
    body: bytes | None  # the caller's bytes while in flight; None once hashed
    body_bytes: int
    sent_at: float  # time.monotonic()
    body_sha256: str = ""

    def hashed(self) -> "Forwarded":
        if self.body is not None:
            self.body_sha256, self.body = hashlib.sha256(self.body).hexdigest()[:16], None
        return self

    def describe(self, now: float) -> str:
        return (f"{self.protocol} model={self.model} bytes={self.body_bytes} sha256={self.hashed().body_sha256} "
                f"caller={self.caller} sent {now - self.sent_at:.2f} s ago")


class InFlight:
    """Requests forwarded to tritonserver and not yet answered, and the last LOST that never were."""

    def __init__(self):
        self._open: dict[int, Forwarded] = {}
        self._lost: deque[Forwarded] = deque(maxlen=LOST)
        self._tokens = itertools.count()

    def opened(self, protocol: str, model: str, caller: str, body: bytes) -> int:
        token = next(self._tokens)
        self._open[token] = Forwarded(protocol, model, caller, body, len(body), time.monotonic())
        return token

    def closed(self, token: int, lost: bool = False) -> None:
        forwarded = self._open.pop(token, None)
        if forwarded is not None and lost:
            self._lost.append(forwarded.hashed())

    def suspects(self, within_s: float = 30.0) -> list[str]:
        """One line per request in flight, or lost within the last ``within_s``, oldest first."""
        now = time.monotonic()
        found = [f for f in self._lost if now - f.sent_at <= within_s] + list(self._open.values())
        return [f.describe(now) for f in sorted(found, key=lambda f: f.sent_at)]
