"""Payloads of the feature log and the feedback log (framed by server.segment_log).

Feature record: one scored request, what the trainer's joiner needs::

    "<HdqHII" request_id_len, request_time_s, delta_seq, Wu, N, Wi
    request_id bytes | user_fids uint64[Wu] | item_fids uint64[N, Wi] | scores float32[N]

Feedback record: the actions of one feedback request::

    "<HddI"   request_id_len, event_time_s, accepted_time_s, M
    request_id bytes | item_fids uint64[M] | labels float32[M]

All little-endian. Decoding checks that the sizes add up exactly and raises
ValueError otherwise (the log's CRC has already vouched for the bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

_FEATURE_HEAD = struct.Struct("<HdqHII")
_FEEDBACK_HEAD = struct.Struct("<HddI")


@dataclass
class FeatureRecord:
    request_id: bytes
    request_time_s: float
    delta_seq: int
    user_fids: np.ndarray  # uint64[Wu]
    item_fids: np.ndarray  # uint64[N, Wi]
    scores: np.ndarray  # float32[N]

    def encode(self) -> bytes:
        n, wi = self.item_fids.shape
        return b"".join(
            (
                _FEATURE_HEAD.pack(len(self.request_id), self.request_time_s, self.delta_seq,
                                   self.user_fids.shape[0], n, wi),
                self.request_id,
                np.ascontiguousarray(self.user_fids, dtype="<u8").tobytes(),
                np.ascontiguousarray(self.item_fids, dtype="<u8").tobytes(),
                np.ascontiguousarray(self.scores, dtype="<f4").tobytes(),
            )
        )

    @classmethod
    def decode(cls, payload: bytes) -> "FeatureRecord":
        rid_len, t, seq, wu, n, wi = _FEATURE_HEAD.unpack_from(payload)
        at = _FEATURE_HEAD.size
        expected = at + rid_len + 8 * wu + 8 * n * wi + 4 * n
        if len(payload) != expected:
            raise ValueError(f"feature record: {len(payload)} bytes, header implies {expected}")
        rid = bytes(payload[at : at + rid_len])
        at += rid_len
        user = np.frombuffer(payload, "<u8", wu, at)
        at += 8 * wu
        items = np.frombuffer(payload, "<u8", n * wi, at).reshape(n, wi)
        at += 8 * n * wi
        scores = np.frombuffer(payload, "<f4", n, at)
        return cls(rid, t, seq, user, items, scores)


@dataclass
class FeedbackRecord:
    request_id: bytes
    event_time_s: float
    accepted_time_s: float
    item_fids: np.ndarray  # uint64[M]
    labels: np.ndarray  # float32[M]

    def encode(self) -> bytes:
        return b"".join(
            (
                _FEEDBACK_HEAD.pack(len(self.request_id), self.event_time_s, self.accepted_time_s,
                                    self.item_fids.shape[0]),
                self.request_id,
                np.ascontiguousarray(self.item_fids, dtype="<u8").tobytes(),
                np.ascontiguousarray(self.labels, dtype="<f4").tobytes(),
            )
        )

    @classmethod
    def decode(cls, payload: bytes) -> "FeedbackRecord":
        rid_len, event_t, accepted_t, m = _FEEDBACK_HEAD.unpack_from(payload)
        at = _FEEDBACK_HEAD.size
        expected = at + rid_len + 12 * m
        if len(payload) != expected:
            raise ValueError(f"feedback record: {len(payload)} bytes, header implies {expected}")
        rid = bytes(payload[at : at + rid_len])
        at += rid_len
        items = np.frombuffer(payload, "<u8", m, at)
        labels = np.frombuffer(payload, "<f4", m, at + 8 * m)
        return cls(rid, event_t, accepted_t, items, labels)
