"""Prequential quality of served scores: what serving said, judged by what users did.

Every joined example carries the score the ranker served for it and the
delta_seq that score was computed at (the feature log records both), so its
quality is measured before the trainer learns from it. The monitor keeps the
last ``window`` examples (N below) in ring arrays:

    score float64[N]   served probability          label float32[N]   observed label
    seq   int64[N]     delta_seq it was served at  source, item uint64[N]   user-id and item-id FIDs
    weight float64[N]  1 / sample rate

and every ``block`` examples closes a block: the figures of the window then
(``WindowReport``: AUC, its standard error, log loss, calibration ratio =
mean score / observed rate, the seq range that served it) and of the block
alone (the per delta-seq range figures, kept for the last ``history``
blocks). Memory: O(window + history).

The window holds the examples the joiner hands the trainer, negatives as
sampled (kept at the negative rate), each with weight 1 / sample rate: AUC
is unchanged by sampling one class, and the weights make log loss and
calibration those of the unsampled stream (a calibrated model reads a
ratio near 1, as in ``experiment calibration``).

Standard error of AUC (Hanley & McNeil 1982), A the AUC, P and Q the
positive and negative counts::

    se^2 = (A(1-A) + (P-1)(A/(2-A) - A^2) + (Q-1)(2A^2/(1+A) - A^2)) / (P Q)
"""

from __future__ import annotations

import base64
import math
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from trainer.model import auc

_EPS = 1e-6


@dataclass
class WindowReport:
    examples: int
    positives: int
    auc: float
    auc_se: float
    log_loss: float
    calibration: float  # mean served score / observed positive rate
    seq_lo: int
    seq_hi: int

    def as_dict(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def log_losses(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-example binary log loss of probabilities ``scores`` (clipped to [1e-6, 1 - 1e-6])."""
    p = np.clip(np.asarray(scores, np.float64), _EPS, 1 - _EPS)
    y = np.asarray(labels, np.float64)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def auc_standard_error(a: float, positives: int, negatives: int) -> float:
    if positives == 0 or negatives == 0 or math.isnan(a):
        return float("nan")
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a)) / (positives * negatives)
    return math.sqrt(max(var, 0.0))


def report(scores: np.ndarray, labels: np.ndarray, seqs: np.ndarray, weights: np.ndarray | None = None
           ) -> WindowReport:
    """Figures of served scores; ``weights`` (1 / sample rate per example) make log loss and calibration
    those of the unsampled stream (AUC does not change when one class is sampled)."""
    n = labels.shape[0]
    positives = int((labels > 0.5).sum())
    a = auc(labels, scores) if n else float("nan")
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    rate = float(w @ labels) / w.sum() if n else float("nan")
    return WindowReport(n, positives, a, auc_standard_error(a, positives, n - positives),
                        float(w @ log_losses(labels, scores) / w.sum()) if n else float("nan"),
                        float((w @ scores) / w.sum() / rate) if n and rate > 0 else float("nan"),
                        int(seqs.min()) if n else 0, int(seqs.max()) if n else 0)


class QualityMonitor:
    """The last ``window`` examples' served scores and labels; a report every ``block`` examples."""

    def __init__(self, window: int = 2000, block: int = 500, history: int = 64):
        if not 0 < block <= window:
            raise ValueError(f"requires 0 < block <= window, got block {block}, window {window}")
        self.window, self.block = window, block
        self._score = np.zeros(window)
        self._label = np.zeros(window, np.float32)
        self._seq = np.zeros(window, np.int64)
        self._source = np.zeros(window, np.uint64)
        self._item = np.zeros(window, np.uint64)
        self._weight = np.ones(window)
        self._filled = 0
        self._at = 0
        self._in_block = 0
        self.total = 0
        self.blocks: deque[WindowReport] = deque(maxlen=history)  # per delta-seq range

    def add(self, scores, labels, seqs, sources, items, weights=None) -> list[int]:
        """Adds examples (``weights``: 1 / sample rate, default 1); returns the offsets (into this call's
        arrays) after which a block closed."""
        closed = []
        n = len(labels)
        weights = np.ones(n) if weights is None else weights
        start = 0
        while start < n:
            take = min(n - start, self.block - self._in_block)
            self._put(slice(start, start + take), scores, labels, seqs, sources, items, weights)
            self._in_block += take
            start += take
            if self._in_block == self.block:
                self._in_block = 0
                self.blocks.append(self._report(self._recent(self.block)))
                closed.append(start)
        return closed

    def _put(self, part, scores, labels, seqs, sources, items, weights) -> None:
        for dst, src in ((self._score, scores), (self._label, labels), (self._seq, seqs), (self._source, sources),
                         (self._item, items), (self._weight, weights)):
            values = np.asarray(src)[part]
            idx = (self._at + np.arange(values.shape[0])) % self.window
            dst[idx] = values
        count = part.stop - part.start
        self._at = (self._at + count) % self.window
        self._filled = min(self.window, self._filled + count)
        self.total += count

    def _recent(self, n: int) -> tuple[np.ndarray, ...]:
        """(scores, labels, seqs, sources, items, weights) of the newest n examples, oldest first."""
        n = min(n, self._filled)
        idx = (self._at - n + np.arange(n)) % self.window
        return (self._score[idx], self._label[idx], self._seq[idx], self._source[idx], self._item[idx],
                self._weight[idx])

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The whole window, oldest first: scores, labels, seqs, sources, items, weights."""
        return self._recent(self._filled)

    @staticmethod
    def _report(arrays) -> WindowReport:
        scores, labels, seqs, _, _, weights = arrays
        return report(scores, labels, seqs, weights)

    def report(self) -> WindowReport:
        return self._report(self.arrays())

    _DTYPES = (("scores", np.float64), ("labels", np.float32), ("seqs", np.int64), ("sources", np.uint64),
               ("items", np.uint64), ("weights", np.float64))

    def to_state(self) -> dict:
        """The window, oldest first, as JSON-able base64 arrays (``restore`` takes it back)."""
        return {name: base64.b64encode(np.ascontiguousarray(a, dtype).tobytes()).decode("ascii")
                for (name, dtype), a in zip(self._DTYPES, self.arrays())}

    def restore(self, state: dict) -> None:
        """Refills the window from ``to_state``'s output; the next block starts empty."""
        arrays = [np.frombuffer(base64.b64decode(state[name]), dtype) for name, dtype in self._DTYPES]
        n = arrays[0].shape[0]
        if any(a.shape[0] != n for a in arrays) or n > self.window:
            raise ValueError(f"a saved quality window requires equal lengths up to {self.window}, got "
                             f"{[a.shape[0] for a in arrays]}")
        self.clear()
        self._put(slice(0, n), *arrays)

    def clear(self) -> None:
        """Forgets the window (after a rollback: its scores came from the state undone)."""
        self._filled = self._at = self._in_block = 0
