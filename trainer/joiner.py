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
                            weights it by 1 / rate); at rate 0 none does
                            (feedback that labels negatives explicitly)
    action before request-> held until the request arrives, or until the
                            window passes *and* the feature logs have been
                            read past the action's event time + window (or
                            to their end): then an orphan
    action after close   -> counted in ``late`` (and ``orphans`` if its
                            request was never seen), not trained on

Aligned readers. After an outage both logs hold a backlog and each poll
reads at most ``max_records`` of each log, so one log could run ahead of the
other by many windows: actions would expire before their impression is read
and the impression become a sampled negative (or the reverse). So each log
has a *frontier*, the newest event time read from it (request time for
features, event time for feedback), and is at its end when its last read
came back short. The frontier of a kind (feature or feedback) is the lowest
frontier among its logs not at their end (+inf when all are). Then:

    a log is read          only while its frontier is at most the other
                           kind's frontier + window_s: neither kind runs
                           more than a window ahead of the other
    a request closes       when its window passed (processing time) and the
                           feedback frontier passed its request time + window_s
    an early action expires when its window passed and the feature frontier
                           passed its event time + window_s

Live (both logs at their end) this is the processing-time window alone.
Event times come from the records, so the rule assumes the two kinds carry
comparable clocks (the server's, unless a client sends both); where they do
not, it degrades to the processing-time window and reading to the end.

Candidates are matched by the item FID of the action against the first
column of each candidate row (the item-id slot); an action naming an item
that was not a candidate is counted in ``unmatched``.

Memory is bounded by the window: the buffer holds the requests of the last
``window_s`` seconds. ``state()`` / ``restore()`` carry everything that
decides what the joiner does next: the read position of every log, the
buffer, the early actions, the recently closed request ids and the state of
the random generator that samples negatives. So a restarted trainer neither
loses nor repeats a joined example, and replaying the same logs samples the
same negatives.
"""

from __future__ import annotations

import math
import random
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server.streams.records import FeatureRecord, FeedbackRecord
from server.streams import FEATURES, FEEDBACK, SegmentLogReader, Streams, open_streams


@dataclass
class JoinedExamples:
    user_fids: list = field(default_factory=list)
    item_fids: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    times: list = field(default_factory=list)
    sample_rates: list = field(default_factory=list)
    served_scores: list = field(default_factory=list)  # what the ranker served, for the quality guard
    served_seqs: list = field(default_factory=list)

    def add(self, record: FeatureRecord, candidate: int, label: float, rate: float) -> None:
        self.user_fids.append(record.user_fids)
        self.item_fids.append(record.item_fids[candidate])
        self.labels.append(label)
        self.times.append(record.request_time_s)
        self.sample_rates.append(rate)
        self.served_scores.append(record.scores[candidate])
        self.served_seqs.append(record.delta_seq)

    def __len__(self) -> int:
        return len(self.labels)

    def arrays(self):
        return (np.stack(self.user_fids), np.stack(self.item_fids), np.asarray(self.labels, np.float32),
                np.asarray(self.times, np.float64), np.asarray(self.sample_rates, np.float32))

    def served(self):
        """(served scores float64[n], the delta_seq each was served at int64[n])."""
        return np.asarray(self.served_scores, np.float64), np.asarray(self.served_seqs, np.int64)


class _Pending:
    __slots__ = ("record", "seen_s", "labelled")

    def __init__(self, record: FeatureRecord, seen_s: float, labelled: np.ndarray | None = None):
        self.record = record
        self.seen_s = seen_s
        self.labelled = np.zeros(record.item_fids.shape[0], np.bool_) if labelled is None else labelled


MAX_RECORDS_PER_POLL = 10_000
_FEATURE, _FEEDBACK = FEATURES, FEEDBACK


class Joiner:
    def __init__(self, data_dir: str | Path, window_s: float = 30.0, negative_rate: float = 0.1, seed: int = 0,
                 max_records: int = MAX_RECORDS_PER_POLL, streams: Streams | None = None):
        if window_s <= 0 or not 0 <= negative_rate <= 1 or max_records < 1:
            raise ValueError(f"requires window_s > 0, 0 <= negative_rate <= 1 and max_records >= 1, got "
                             f"{window_s}, {negative_rate}, {max_records}")
        self.data_dir = Path(data_dir)
        self._own_streams = streams is None
        self._streams = open_streams(data_dir) if streams is None else streams  # the bus: files or JetStream
        self.window_s = window_s
        self.negative_rate = negative_rate
        self.max_records = max_records
        self._rng = random.Random(seed)
        self._readers: dict[str, SegmentLogReader] = {}
        self._positions: dict[str, int] = {}
        self._frontier: dict[str, float] = {}  # log key -> newest event time read from it
        self._at_end: dict[str, bool] = {}  # log key -> its last read came back short
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        self._early: OrderedDict[bytes, tuple[float, float, list[FeedbackRecord]]] = OrderedDict()
        self._closed: OrderedDict[bytes, float] = OrderedDict()  # recently closed request ids, for `late`
        self.joined = self.negatives = self.dropped_negatives = 0
        self.late = self.orphans = self.unmatched = 0

    # ------------------------------------------------------------------ reading

    def _reader(self, key: str) -> SegmentLogReader:
        reader = self._readers.get(key)
        if reader is None:
            stream, instance = key.split("/", 1)
            reader = self._streams.open_reader(stream, instance, start_record=self._positions.get(key, 0))
            self._readers[key] = reader
        return reader

    def _keys(self, kind: str) -> list[str]:
        return [f"{kind}/{instance}" for instance in self._streams.instances(kind)]

    def frontier(self, kind: str) -> float:
        """The lowest event time read among the logs of ``kind`` not at their end (+inf if none)."""
        behind = [self._frontier.get(k, -math.inf) for k in self._keys(kind) if not self._at_end.get(k, False)]
        return min(behind, default=math.inf)

    def _new_records(self, kind: str, decode, event_time) -> list:
        limit = self.frontier(_FEEDBACK if kind == _FEATURE else _FEATURE) + self.window_s
        out = []
        for key in self._keys(kind):
            if self._frontier.get(key, -math.inf) > limit:
                continue  # a window ahead of the other kind: let it catch up first
            reader = self._reader(key)
            batch = reader.read(max_records=self.max_records)
            self._positions[key] = reader.next_record
            self._at_end[key] = len(batch) < self.max_records
            records = [decode(payload) for _, payload in batch]
            if records:
                self._frontier[key] = max(self._frontier.get(key, -math.inf), max(map(event_time, records)))
            out += records
        return out

    def poll(self, now_s: float | None = None) -> JoinedExamples:
        """Reads what is new in every log (aligned), joins it, closes expired windows."""
        now_s = time.monotonic() if now_s is None else now_s
        out = JoinedExamples()
        for record in self._new_records(_FEATURE, FeatureRecord.decode, lambda r: r.request_time_s):
            pending = _Pending(record, now_s)
            self._pending[record.request_id] = pending
            early = self._early.pop(record.request_id, None)
            for action in early[2] if early else ():
                self._join(pending, action, out)
        for action in self._new_records(_FEEDBACK, FeedbackRecord.decode, lambda r: r.event_time_s):
            pending = self._pending.get(action.request_id)
            if pending is not None:
                self._join(pending, action, out)
            elif action.request_id in self._closed:
                self.late += len(action.labels)
            else:
                _, _, actions = self._early.setdefault(action.request_id, (now_s, action.event_time_s, []))
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
        feedback_read_to = self.frontier(_FEEDBACK) - self.window_s
        while self._pending:
            rid, pending = next(iter(self._pending.items()))
            if pending.seen_s > horizon or pending.record.request_time_s > feedback_read_to:
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
        features_read_to = self.frontier(_FEATURE) - self.window_s
        while self._early:
            seen_s, event_s, _ = next(iter(self._early.values()))
            if seen_s > horizon or event_s > features_read_to:
                break
            _, (_, _, actions) = self._early.popitem(last=False)
            count = sum(len(a.labels) for a in actions)
            self.late += count
            self.orphans += count

    @property
    def positions(self) -> dict[str, int]:
        """Log key ("feature_log/<instance>") -> index of the next record to read."""
        return dict(self._positions)

    @property
    def buffered(self) -> int:
        return len(self._pending)

    # ---------------------------------------------------------- checkpointing

    def state(self) -> bytes:
        """Read positions, the buffer (requests still in their window, which
        candidates already became examples, actions waiting), the recently
        closed request ids and the negative sampler's random state."""
        parts = [struct.pack("<I", len(self._positions))]
        for key, position in self._positions.items():
            raw = key.encode()
            parts += [struct.pack("<HQ", len(raw), position), raw]
        parts.append(struct.pack("<I", len(self._pending)))
        for pending in self._pending.values():
            raw = pending.record.encode()
            parts += [struct.pack("<I", len(raw)), raw, struct.pack("<I", pending.labelled.shape[0]),
                      pending.labelled.tobytes()]
        early = [a for _, _, actions in self._early.values() for a in actions]
        parts.append(struct.pack("<I", len(early)))
        for action in early:
            raw = action.encode()
            parts += [struct.pack("<I", len(raw)), raw]
        parts.append(struct.pack("<I", len(self._closed)))
        for rid in self._closed:
            parts += [struct.pack("<H", len(rid)), rid]
        version, words, gauss = self._rng.getstate()
        parts.append(struct.pack(f"<I{len(words)}I", len(words), *words))
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
            self._early.setdefault(action.request_id, (now_s, action.event_time_s, []))[2].append(action)
        (n_closed,) = take("<I")
        for _ in range(n_closed):
            self._closed[raw(take("<H")[0])] = now_s
        (n_words,) = take("<I")
        self._rng.setstate((3, take(f"<{n_words}I"), None))
        if at != len(blob):
            raise ValueError(f"joiner state: {len(blob) - at} bytes left over")

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        if self._own_streams:
            self._streams.close()
