"""The online joiner: feature log JOIN feedback log on request_id, within a window.

Every log directory under <data_dir>/feature_log and <data_dir>/feedback_log
(one per ranker/feedback instance) is tailed. A scored request waits in the
buffer for ``window_s`` seconds of processing time after the joiner first
reads it:

    an action joins      -> at once, one labelled example for that candidate
                            (positives reach training without waiting)
    the window closes    -> every candidate that got no action becomes a
                            negative with probability ``negative_rate``,
                            carrying that rate as its sample rate (the trainer
                            weights it by 1 / rate)
    action before request-> held (the two logs are read independently) until
                            the request arrives or the window passes
    action after close   -> counted in ``late`` (and ``orphans`` if its
                            request was never seen), not trained on

Candidates are matched by the item FID of the action against the first
column of each candidate row (the item-id slot); an action naming an item
that was not a candidate is counted in ``unmatched``.

Memory is bounded by the window: the buffer holds the requests of the last
``window_s`` seconds. ``state()`` / ``restore()`` carry the buffer and the
read position of every log, so a restarted trainer neither loses nor
repeats a joined example.
"""

from __future__ import annotations

import random
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server.records import FeatureRecord, FeedbackRecord
from server.segment_log import SegmentLogReader


@dataclass
class JoinedExamples:
    user_fids: list = field(default_factory=list)
    item_fids: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    times: list = field(default_factory=list)
    sample_rates: list = field(default_factory=list)

    def add(self, record: FeatureRecord, candidate: int, label: float, rate: float) -> None:
        self.user_fids.append(record.user_fids)
        self.item_fids.append(record.item_fids[candidate])
        self.labels.append(label)
        self.times.append(record.request_time_s)
        self.sample_rates.append(rate)

    def __len__(self) -> int:
        return len(self.labels)

    def arrays(self):
        return (np.stack(self.user_fids), np.stack(self.item_fids), np.asarray(self.labels, np.float32),
                np.asarray(self.times, np.float64), np.asarray(self.sample_rates, np.float32))


class _Pending:
    __slots__ = ("record", "seen_s", "labelled")

    def __init__(self, record: FeatureRecord, seen_s: float, labelled: np.ndarray | None = None):
        self.record = record
        self.seen_s = seen_s
        self.labelled = np.zeros(record.item_fids.shape[0], np.bool_) if labelled is None else labelled


class Joiner:
    def __init__(self, data_dir: str | Path, window_s: float = 30.0, negative_rate: float = 0.1, seed: int = 0):
        if window_s <= 0 or not 0 < negative_rate <= 1:
            raise ValueError(f"requires window_s > 0 and 0 < negative_rate <= 1, got {window_s}, {negative_rate}")
        self.data_dir = Path(data_dir)
        self.window_s = window_s
        self.negative_rate = negative_rate
        self._rng = random.Random(seed)
        self._readers: dict[str, SegmentLogReader] = {}
        self._positions: dict[str, int] = {}
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        self._early: OrderedDict[bytes, tuple[float, list[FeedbackRecord]]] = OrderedDict()
        self._closed: OrderedDict[bytes, float] = OrderedDict()  # recently closed request ids, for `late`
        self.joined = self.negatives = self.dropped_negatives = 0
        self.late = self.orphans = self.unmatched = 0

    # ------------------------------------------------------------------ reading

    def _reader(self, key: str) -> SegmentLogReader:
        reader = self._readers.get(key)
        if reader is None:
            reader = SegmentLogReader(self.data_dir / key, start_record=self._positions.get(key, 0))
            self._readers[key] = reader
        return reader

    def _new_records(self, kind: str) -> list[bytes]:
        root = self.data_dir / kind
        out = []
        if root.is_dir():
            for directory in sorted(p for p in root.iterdir() if p.is_dir()):
                key = f"{kind}/{directory.name}"
                reader = self._reader(key)
                out += [payload for _, payload in reader.read(max_records=10_000)]
                self._positions[key] = reader.next_record
        return out

    def poll(self, now_s: float | None = None) -> JoinedExamples:
        """Reads what is new in every log, joins it, closes expired windows."""
        now_s = time.monotonic() if now_s is None else now_s
        out = JoinedExamples()
        for payload in self._new_records("feature_log"):
            record = FeatureRecord.decode(payload)
            pending = _Pending(record, now_s)
            self._pending[record.request_id] = pending
            early = self._early.pop(record.request_id, None)
            for action in early[1] if early else ():
                self._join(pending, action, out)
        for payload in self._new_records("feedback_log"):
            action = FeedbackRecord.decode(payload)
            pending = self._pending.get(action.request_id)
            if pending is not None:
                self._join(pending, action, out)
            elif action.request_id in self._closed:
                self.late += len(action.labels)
            else:
                seen, actions = self._early.setdefault(action.request_id, (now_s, []))
                actions.append(action)
        self._close_expired(now_s, out)
        return out

    def _join(self, pending: _Pending, action: FeedbackRecord, out: JoinedExamples) -> None:
        items = pending.record.item_fids[:, 0]
        for fid, label in zip(action.item_fids.tolist(), action.labels.tolist()):
            hits = np.flatnonzero(items == np.uint64(fid))
            if hits.shape[0] == 0:
                self.unmatched += 1
                continue
            for c in hits.tolist():
                out.add(pending.record, c, min(max(label, 0.0), 1.0), 1.0)
                pending.labelled[c] = True
                self.joined += 1

    def _close_expired(self, now_s: float, out: JoinedExamples) -> None:
        horizon = now_s - self.window_s
        while self._pending:
            rid, pending = next(iter(self._pending.items()))
            if pending.seen_s > horizon:
                break
            del self._pending[rid]
            for c in np.flatnonzero(~pending.labelled).tolist():
                if self._rng.random() < self.negative_rate:
                    out.add(pending.record, c, 0.0, self.negative_rate)
                    self.negatives += 1
                else:
                    self.dropped_negatives += 1
            self._closed[rid] = now_s
        while self._closed and next(iter(self._closed.values())) <= horizon - self.window_s:
            self._closed.popitem(last=False)
        while self._early and next(iter(self._early.values()))[0] <= horizon:
            _, (_, actions) = self._early.popitem(last=False)
            count = sum(len(a.labels) for a in actions)
            self.late += count
            self.orphans += count

    @property
    def buffered(self) -> int:
        return len(self._pending)

    # ---------------------------------------------------------- checkpointing

    def state(self) -> bytes:
        """Read positions and the buffer (requests still in their window,
        which candidates already became examples, actions waiting)."""
        parts = [struct.pack("<I", len(self._positions))]
        for key, position in self._positions.items():
            raw = key.encode()
            parts += [struct.pack("<HQ", len(raw), position), raw]
        parts.append(struct.pack("<I", len(self._pending)))
        for pending in self._pending.values():
            raw = pending.record.encode()
            parts += [struct.pack("<I", len(raw)), raw, struct.pack("<I", pending.labelled.shape[0]),
                      pending.labelled.tobytes()]
        early = [a for _, actions in self._early.values() for a in actions]
        parts.append(struct.pack("<I", len(early)))
        for action in early:
            raw = action.encode()
            parts += [struct.pack("<I", len(raw)), raw]
        return b"".join(parts)

    def restore(self, blob: bytes, now_s: float | None = None) -> None:
        """Inverse of ``state``; call before the first ``poll``. Restored requests
        get a fresh window from ``now_s``."""
        now_s = time.monotonic() if now_s is None else now_s
        view, at = memoryview(blob), 0

        def take(fmt: str):
            nonlocal at
            values = struct.unpack_from(fmt, view, at)
            at += struct.calcsize(fmt)
            return values

        def raw(n: int) -> bytes:
            nonlocal at
            at += n
            return bytes(view[at - n : at])

        (n_positions,) = take("<I")
        for _ in range(n_positions):
            size, position = take("<HQ")
            self._positions[raw(size).decode()] = position
        (n_pending,) = take("<I")
        for _ in range(n_pending):
            record = FeatureRecord.decode(raw(take("<I")[0]))
            labelled = np.frombuffer(raw(take("<I")[0]), dtype=np.bool_).copy()
            self._pending[record.request_id] = _Pending(record, now_s, labelled)
        (n_early,) = take("<I")
        for _ in range(n_early):
            action = FeedbackRecord.decode(raw(take("<I")[0]))
            self._early.setdefault(action.request_id, (now_s, []))[1].append(action)
        if at != len(blob):
            raise ValueError(f"joiner state: {len(blob) - at} bytes left over")

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
