"""What the ranker and feedback models both check in a request: tensors, ids, times.

The feedback stub imports this module and not ``server.runtime.ranker``, whose
kernels bring numba (its JIT and LLVM) into a process: about 60 MB that a
stub appending clicks has no use for (``tests/server/runtime/test_stub_imports.py``).
Nothing here imports numba.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np

from server.clock import FLAGS, TimeWindow

MAX_REQUEST_ID_BYTES = 256
IMPRESSION_ID_BYTES = 32  # 128 random bits as lowercase hex: new_impression_ids
DEFAULT_WINDOW = TimeWindow()


class RequestError(ValueError):
    """A request a model refuses; the message names the input and the fault."""


def expect_tensor(name: str, value: np.ndarray | None, dtype, ndim: int) -> np.ndarray:
    """``value`` if it is present with ``dtype`` and rank ``ndim``, else RequestError naming input ``name``."""
    if value is None:
        raise RequestError(f"input '{name}' is required but missing")
    if value.dtype != dtype:
        raise RequestError(f"input '{name}' requires dtype {np.dtype(dtype).name}, got {value.dtype}")
    if value.ndim != ndim:
        raise RequestError(f"input '{name}' requires rank {ndim}, got shape {list(value.shape)}")
    return value


def _one_string(name: str, value: np.ndarray | None):
    """The one element of a BYTES [1] input, str encoded to bytes (other kinds returned as they are)."""
    value = expect_tensor(name, value, np.object_, 1)
    if value.shape[0] != 1:
        raise RequestError(f"input '{name}' requires shape [1], got {list(value.shape)}")
    item = value[0]
    return item.encode() if isinstance(item, str) else item


def parse_request_id(value: np.ndarray | None) -> bytes:
    rid = _one_string("request_id", value)
    if not isinstance(rid, bytes) or not 1 <= len(rid) <= MAX_REQUEST_ID_BYTES:
        size = len(rid) if isinstance(rid, bytes) else type(rid).__name__
        raise RequestError(f"input 'request_id' requires 1 to {MAX_REQUEST_ID_BYTES} bytes, got {size}")
    return rid


def new_impression_ids(count: int) -> list[bytes]:
    """``count`` impression ids, each 128 random bits as 32 lowercase hex ASCII bytes.

    The ranker gives one to every request it scores: it is returned in the
    response, logged with the features, and feedback echoes it; the joiner
    keys on it, never on the client's request_id. Random rather than a counter,
    so instances, replicas and restarts need no coordination (two of 2**40
    impressions collide with odds of 2**-49) and one caller cannot guess
    another's ids."""
    raw = os.urandom(16 * count).hex().encode()
    return [raw[k : k + IMPRESSION_ID_BYTES] for k in range(0, len(raw), IMPRESSION_ID_BYTES)]


def parse_impression_id(value: np.ndarray | None) -> bytes:
    """The optional ``impression_id`` input of feedback: b"" when absent, else exactly what the ranker
    returned (IMPRESSION_ID_BYTES lowercase hex characters)."""
    if value is None:
        return b""
    iid = _one_string("impression_id", value)
    if (not isinstance(iid, bytes) or len(iid) != IMPRESSION_ID_BYTES
            or iid.strip(b"0123456789abcdef") != b""):
        shown = repr(iid[:40]) if isinstance(iid, bytes) else type(iid).__name__
        raise RequestError(f"input 'impression_id' requires the {IMPRESSION_ID_BYTES} lowercase hex characters "
                           f"the ranker returned, got {shown}")
    return iid


def parse_time(name: str, value: np.ndarray | None, now_s: float, window: TimeWindow = DEFAULT_WINDOW) -> float:
    """An optional FP64 [1] time in Unix seconds: ``now_s`` (the server's receive time) when absent,
    refused when outside ``window`` around ``now_s``."""
    if value is None:
        return now_s
    value = expect_tensor(name, value, np.float64, 1)
    if value.shape[0] != 1:
        raise RequestError(f"input '{name}' requires shape [1], got {list(value.shape)}")
    t = float(value[0])
    if not math.isfinite(t) or t <= 0:
        raise RequestError(f"input '{name}' requires a finite time > 0 (Unix seconds), got {t}")
    outside = window.refusal(t, now_s)
    if outside is not None:
        raise RequestError(f"input '{name}' requires a time within {window.describe()} the server's clock "
                           f"({now_s:.3f}), got {t:.3f} ({outside} it); omit it to use the server's receive "
                           f"time, or widen monolith-rt serve {FLAGS['ahead_s']} / {FLAGS['behind_s']}")
    return t


def now_s() -> float:
    return time.time()
