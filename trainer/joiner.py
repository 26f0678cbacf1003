"""The online joiner: feature log JOIN feedback log on the impression id, within a window.

Every log directory under <data_dir>/feature_log and <data_dir>/feedback_log
(one per ranker/feedback instance) is tailed. A scored request (an
*impression*) waits in the buffer for ``window_s`` seconds of processing time
after the joiner first reads it:

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

Join keys (the id contract, README "Ids"). The ranker gives every impression
an id the client cannot choose (server.runtime.requests.new_impression_ids), logs it
with the features and returns it; feedback echoes it. The key of an
impression is that id; a feature record without one (written before issue
20) is keyed by its log and position in it, which are unique too. The
client's request_id is a correlation field: never a key, so a client that
sends one request_id on every request still gets one impression per request,
each with its own window and negatives. Feedback that names no impression is
joined by request_id only when exactly one impression the joiner holds
(pending or recently closed) has that request_id; when several do it is
counted in ``ambiguous`` and not trained on.

    an (impression, candidate) that already has a label -> later actions on it
                            are counted in ``duplicates``, not trained on
                            (a retried feedback request trains once)
    a label outside [label_min, label_max] (the schema's "labels")
                         -> counted in ``refused_labels``, not trained on
    a second feature record with a key already held -> ``duplicate_impressions``

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

Memory. The window bounds the buffer in time; ``max_buffer_bytes`` bounds it
in bytes, whatever the traffic: the buffered records' bytes plus a fixed
allowance per entry (``buffer_bytes``, exported by the trainer as
``monolith_joiner_buffer_bytes``). Past the limit the joiner sheds, oldest
first: the keys of closed impressions (feedback for them then counts as an
orphan instead of late), then early actions (``shed_actions``, most likely
forged or lost ids), then pending impressions (``shed_impressions``, and
their unlabelled candidates in ``shed_candidates``: no negatives are drawn
from them). Nothing leaves the buffer uncounted.

``state()`` / ``restore()`` carry everything that decides what the joiner
does next: the read position of every log, the buffer, the early actions,
the recently closed impressions and the state of the random generator that
samples negatives. So a restarted trainer neither loses nor repeats a joined
example, and replaying the same logs samples the same negatives. A state
written before issue 20 (no version) still restores.
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
    __slots__ = ("record", "seen_s", "labelled", "cost")

    def __init__(self, record: FeatureRecord, seen_s: float, cost: int, labelled: np.ndarray | None = None):
        self.record = record
        self.seen_s = seen_s
        self.cost = cost
        self.labelled = np.zeros(record.item_fids.shape[0], np.bool_) if labelled is None else labelled


MAX_RECORDS_PER_POLL = 10_000
MAX_BUFFER_BYTES = 512 * 2**20
# What one buffered entry costs beyond its record's bytes (Python objects, array headers, dict slots,
# the request_id index), measured with tracemalloc (tests/trainer/test_joiner.py checks the estimate).
PENDING_OVERHEAD_BYTES = 1536
EARLY_OVERHEAD_BYTES = 1024
CLOSED_OVERHEAD_BYTES = 256
COUNTERS = ("joined", "negatives", "dropped_negatives", "late", "orphans", "unmatched", "duplicates",
            "ambiguous", "refused_labels", "duplicate_impressions", "shed_impressions", "shed_candidates",
            "shed_actions")
_FEATURE, _FEEDBACK = FEATURES, FEEDBACK
_STATE_MAGIC = b"JNR2"  # as an old state's first field (a count of logs) it would be 844 million: unambiguous


def impression_key(record: FeatureRecord, log_key: str, index: int) -> bytes:
    """The join key of an impression: b"i" + the ranker's impression id, or for a record without one
    (version 1) b"p" + its log and position there."""
    if record.impression_id:
        return b"i" + record.impression_id
    return b"p" + f"{log_key}#{index}".encode()


def _action_key(action: FeedbackRecord) -> bytes:
    """Where an action waits before its impression is read: its impression's key, or b"r" + request_id."""
    return b"i" + action.impression_id if action.impression_id else b"r" + action.request_id


class Joiner:
    def __init__(self, data_dir: str | Path, window_s: float = 30.0, negative_rate: float = 0.1, seed: int = 0,
                 max_records: int = MAX_RECORDS_PER_POLL, streams: Streams | None = None,
                 label_range: tuple[float, float] = (0.0, 1.0), max_buffer_bytes: int = MAX_BUFFER_BYTES):
        if window_s <= 0 or not 0 <= negative_rate <= 1 or max_records < 1:
            raise ValueError(f"requires window_s > 0, 0 <= negative_rate <= 1 and max_records >= 1, got "
                             f"{window_s}, {negative_rate}, {max_records}")
        if not label_range[0] <= label_range[1] or max_buffer_bytes < 1:
            raise ValueError(f"requires label_range (min, max) with min <= max and max_buffer_bytes >= 1, got "
                             f"{label_range}, {max_buffer_bytes}")
        self.data_dir = Path(data_dir)
        self._own_streams = streams is None
        self._streams = open_streams(data_dir) if streams is None else streams  # the bus: files or JetStream
        self.window_s = window_s
        self.negative_rate = negative_rate
        self.max_records = max_records
        self.label_min, self.label_max = label_range
        self.max_buffer_bytes = max_buffer_bytes
        self._rng = random.Random(seed)
        self._readers: dict[str, SegmentLogReader] = {}
        self._positions: dict[str, int] = {}
        self._frontier: dict[str, float] = {}  # log key -> newest event time read from it
        self._at_end: dict[str, bool] = {}  # log key -> its last read came back short
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()  # impression key -> impression
        # action key (_action_key) -> (first seen, event time, the actions, their bytes)
        self._early: OrderedDict[bytes, tuple[float, float, list[FeedbackRecord], int]] = OrderedDict()
        self._closed: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()  # key -> (closed at, request_id)
        self._by_request: dict[bytes, dict[bytes, None]] = {}  # request_id -> keys of pending and closed
        self.buffer_bytes = 0
        for name in COUNTERS:
            setattr(self, name, 0)

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

    def _new_records(self, kind: str, decode, event_time) -> list[tuple[str, int, int, object]]:
        """(log key, index in that log, payload bytes, decoded record) of what is new, aligned."""
        limit = self.frontier(_FEEDBACK if kind == _FEATURE else _FEATURE) + self.window_s
        out = []
        for key in self._keys(kind):
            if self._frontier.get(key, -math.inf) > limit:
                continue  # a window ahead of the other kind: let it catch up first
            reader = self._reader(key)
            batch = reader.read(max_records=self.max_records)
            self._positions[key] = reader.next_record
            self._at_end[key] = len(batch) < self.max_records
            records = [(key, index, len(payload), decode(payload)) for index, payload in batch]
            if records:
                self._frontier[key] = max(self._frontier.get(key, -math.inf),
                                          max(event_time(r) for *_, r in records))
            out += records
        return out

    def poll(self, now_s: float | None = None) -> JoinedExamples:
        """Reads what is new in every log (aligned), joins it, closes expired windows."""
        now_s = time.monotonic() if now_s is None else now_s
        out = JoinedExamples()
        for log_key, index, size, record in self._new_records(_FEATURE, FeatureRecord.decode,
                                                              lambda r: r.request_time_s):
            self._add_impression(impression_key(record, log_key, index), record, now_s, size, out)
        for _, _, size, action in self._new_records(_FEEDBACK, FeedbackRecord.decode, lambda r: r.event_time_s):
            self._add_action(action, now_s, size, out)
        self._close_expired(now_s, out)
        return out

    def _add_impression(self, key: bytes, record: FeatureRecord, now_s: float, size: int,
                        out: JoinedExamples) -> None:
        if key in self._pending or key in self._closed:
            self.duplicate_impressions += 1
            return
        pending = _Pending(record, now_s, size + PENDING_OVERHEAD_BYTES)
        self._pending[key] = pending
        self._by_request.setdefault(record.request_id, {})[key] = None
        self.buffer_bytes += pending.cost
        for early_key in (key, b"r" + record.request_id):
            early = self._early.pop(early_key, None)
            if early is None:
                continue
            self.buffer_bytes -= early[3]
            if early_key[:1] == b"r" and len(self._by_request[record.request_id]) > 1:
                self.ambiguous += sum(len(a.labels) for a in early[2])
                continue
            for action in early[2]:
                self._join(pending, action, out)
        self._shed(now_s)

    def _add_action(self, action: FeedbackRecord, now_s: float, size: int, out: JoinedExamples) -> None:
        if action.impression_id:
            key = b"i" + action.impression_id
        else:
            keys = self._by_request.get(action.request_id, ())
            if len(keys) > 1:
                self.ambiguous += len(action.labels)
                return
            key = next(iter(keys), None)
        pending = self._pending.get(key) if key is not None else None
        if pending is not None:
            self._join(pending, action, out)
        elif key is not None and key in self._closed:
            self.late += len(action.labels)
        else:
            early_key = _action_key(action)
            seen_s, event_s, actions, cost = self._early.get(early_key) or (now_s, action.event_time_s, [], 0)
            actions.append(action)
            self._early[early_key] = (seen_s, event_s, actions, cost + size + EARLY_OVERHEAD_BYTES)
            self.buffer_bytes += size + EARLY_OVERHEAD_BYTES
            self._shed(now_s)

    def _join(self, pending: _Pending, action: FeedbackRecord, out: JoinedExamples) -> None:
        items = pending.record.item_fids[:, 0]
        for fid, label in zip(action.item_fids.tolist(), action.labels.tolist()):
            if not self.label_min <= label <= self.label_max:
                self.refused_labels += 1
                continue
            hits = np.flatnonzero(items == np.uint64(fid))
            if hits.shape[0] == 0:
                self.unmatched += 1
                continue
            for c in hits.tolist():
                if pending.labelled[c]:
                    self.duplicates += 1
                    continue
                out.add(pending.record, c, label, 1.0)
                pending.labelled[c] = True
                self.joined += 1

    def _close(self, key: bytes, now_s: float) -> _Pending:
        pending = self._pending.pop(key)
        self.buffer_bytes -= pending.cost
        self._closed[key] = (now_s, pending.record.request_id)
        self.buffer_bytes += len(key) + len(pending.record.request_id) + CLOSED_OVERHEAD_BYTES
        return pending

    def _forget_closed(self) -> None:
        key, (_, rid) = self._closed.popitem(last=False)
        self.buffer_bytes -= len(key) + len(rid) + CLOSED_OVERHEAD_BYTES
        keys = self._by_request[rid]
        del keys[key]
        if not keys:
            del self._by_request[rid]

    def _shed(self, now_s: float) -> None:
        """Oldest first until the buffer fits max_buffer_bytes: closed keys, early actions, impressions."""
        while self.buffer_bytes > self.max_buffer_bytes:
            if self._closed:
                self._forget_closed()
            elif self._early:
                _, (_, _, actions, cost) = self._early.popitem(last=False)
                self.buffer_bytes -= cost
                self.shed_actions += sum(len(a.labels) for a in actions)
            elif self._pending:
                pending = self._close(next(iter(self._pending)), now_s)
                self.shed_impressions += 1
                self.shed_candidates += int((~pending.labelled).sum())
            else:
                break

    def _close_expired(self, now_s: float, out: JoinedExamples) -> None:
        horizon = now_s - self.window_s
        feedback_read_to = self.frontier(_FEEDBACK) - self.window_s
        while self._pending:
            key, pending = next(iter(self._pending.items()))
            if pending.seen_s > horizon or pending.record.request_time_s > feedback_read_to:
                break
            self._close(key, now_s)
            for c in np.flatnonzero(~pending.labelled).tolist():
                if self._rng.random() < self.negative_rate:
                    out.add(pending.record, c, 0.0, self.negative_rate)
                    self.negatives += 1
                else:
                    self.dropped_negatives += 1
        while self._closed and next(iter(self._closed.values()))[0] <= horizon - self.window_s:
            self._forget_closed()
        features_read_to = self.frontier(_FEATURE) - self.window_s
        while self._early:
            seen_s, event_s, _, _ = next(iter(self._early.values()))
            if seen_s > horizon or event_s > features_read_to:
                break
            _, (_, _, actions, cost) = self._early.popitem(last=False)
            self.buffer_bytes -= cost
            count = sum(len(a.labels) for a in actions)
            self.late += count
            self.orphans += count

    @property
    def positions(self) -> dict[str, int]:
        """Log key ("feature_log/<instance>") -> index of the next record to read."""
        return dict(self._positions)

    @property
    def buffered(self) -> int:
        """Impressions waiting for their window to close."""
        return len(self._pending)

    def counters(self) -> dict[str, int]:
        """Running totals (COUNTERS), carried across restarts by the trainer's checkpoints."""
        return {name: getattr(self, name) for name in COUNTERS}

    # ---------------------------------------------------------- checkpointing

    def state(self) -> bytes:
        """Read positions, the buffer (impressions still in their window, which
        candidates already became examples, actions waiting), the recently
        closed impressions and the negative sampler's random state."""
        parts = [_STATE_MAGIC, struct.pack("<I", len(self._positions))]
        for key, position in self._positions.items():
            raw = key.encode()
            parts += [struct.pack("<HQ", len(raw), position), raw]
        parts.append(struct.pack("<I", len(self._pending)))
        for key, pending in self._pending.items():
            raw = pending.record.encode()
            parts += [struct.pack("<H", len(key)), key, struct.pack("<I", len(raw)), raw,
                      struct.pack("<I", pending.labelled.shape[0]), pending.labelled.tobytes()]
        early = [a for _, _, actions, _ in self._early.values() for a in actions]
        parts.append(struct.pack("<I", len(early)))
        for action in early:
            raw = action.encode()
            parts += [struct.pack("<I", len(raw)), raw]
        parts.append(struct.pack("<I", len(self._closed)))
        for key, (_, rid) in self._closed.items():
            parts += [struct.pack("<HH", len(key), len(rid)), key, rid]
        version, words, gauss = self._rng.getstate()
        parts.append(struct.pack(f"<I{len(words)}I", len(words), *words))
        return b"".join(parts)

    def restore(self, blob: bytes, now_s: float | None = None) -> None:
        """Inverse of ``state`` (also of a state written before issue 20); call before the
        first ``poll``. Restored requests get a fresh window from ``now_s``."""
        now_s = time.monotonic() if now_s is None else now_s
        view, at = memoryview(blob), 0
        versioned = bytes(view[:4]) == _STATE_MAGIC
        at = 4 if versioned else 0

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
            key = raw(take("<H")[0]) if versioned else None
            payload = raw(take("<I")[0])
            record = FeatureRecord.decode(payload)
            labelled = np.frombuffer(raw(take("<I")[0]), dtype=np.bool_).copy()
            key = key if versioned else b"r" + record.request_id  # unique: the old joiner keyed by it
            self._pending[key] = _Pending(record, now_s, len(payload) + PENDING_OVERHEAD_BYTES, labelled)
            self._by_request.setdefault(record.request_id, {})[key] = None
            self.buffer_bytes += self._pending[key].cost
        (n_early,) = take("<I")
        for _ in range(n_early):
            payload = raw(take("<I")[0])
            action = FeedbackRecord.decode(payload)
            key = _action_key(action)
            seen_s, event_s, actions, cost = self._early.get(key, (now_s, action.event_time_s, [], 0))
            actions.append(action)
            self._early[key] = (seen_s, event_s, actions, cost + len(payload) + EARLY_OVERHEAD_BYTES)
            self.buffer_bytes += len(payload) + EARLY_OVERHEAD_BYTES
        (n_closed,) = take("<I")
        for _ in range(n_closed):
            if versioned:
                key_len, rid_len = take("<HH")
                key, rid = raw(key_len), raw(rid_len)
            else:
                rid = raw(take("<H")[0])
                key = b"r" + rid
            self._closed[key] = (now_s, rid)
            self._by_request.setdefault(rid, {})[key] = None
            self.buffer_bytes += len(key) + len(rid) + CLOSED_OVERHEAD_BYTES
        (n_words,) = take("<I")
        self._rng.setstate((3, take(f"<{n_words}I"), None))
        if at != len(blob):
            raise ValueError(f"joiner state: {len(blob) - at} bytes left over")

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        if self._own_streams:
            self._streams.close()
