"""Payloads of the feature log and the feedback log (framed by server.streams.log's segments, or by
server.streams.jetstream.logs on the bus).

Feature record: one scored request, what the trainer's joiner needs. Version 2
(written since issue 20) adds the impression id the ranker assigned::

    "<HBBHdqHII" 0xFFFF, 2, impression_id_len, request_id_len, request_time_s, delta_seq, Wu, N, Wi
    request_id bytes | impression_id bytes | user_fids uint64[Wu] | item_fids uint64[N, Wi] | scores float32[N]

Feedback record: the actions of one feedback request, version 2 adds the
impression id the client echoed (empty when it sent none)::

    "<HBBHddI" 0xFFFF, 2, impression_id_len, request_id_len, event_time_s, accepted_time_s, M
    request_id bytes | impression_id bytes | item_fids uint64[M] | labels float32[M]

Version 1 records (before issue 20) lack the marker, the version and the
impression id; they start with request_id_len::

    feature  "<HdqHII" request_id_len, request_time_s, delta_seq, Wu, N, Wi  | request_id | ...
    feedback "<HddI"   request_id_len, event_time_s, accepted_time_s, M      | request_id | ...

and still decode (with an empty impression id). The server never wrote a
request id of more than 256 bytes, so a version 1 record never starts with
0xFFFF: the marker tells the versions apart. Records are always written as
version 2; a decoder meeting a version it does not know raises.

All little-endian. Decoding checks that the sizes add up exactly and raises
ValueError otherwise (the log's CRC has already vouched for the bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

VERSION_MARKER = 0xFFFF
VERSION = 2
MAX_IMPRESSION_ID_BYTES = 255
_VERSIONED = struct.Struct("<HB")
_FEATURE_HEAD_V1 = struct.Struct("<HdqHII")
_FEATURE_HEAD = struct.Struct("<HBBHdqHII")
_FEEDBACK_HEAD_V1 = struct.Struct("<HddI")
_FEEDBACK_HEAD = struct.Struct("<HBBHddI")


def _version(payload: bytes, kind: str) -> int:
    if len(payload) < _VERSIONED.size:
        raise ValueError(f"{kind} record: {len(payload)} bytes, shorter than any header")
    marker, version = _VERSIONED.unpack_from(payload)
    if marker != VERSION_MARKER:
        return 1
    if version != VERSION:
        raise ValueError(f"{kind} record: version {version}, this code reads versions 1 and {VERSION}")
    return VERSION


def _check_ids(kind: str, request_id: bytes, impression_id: bytes) -> None:
    if len(request_id) > 0xFFFF or len(impression_id) > MAX_IMPRESSION_ID_BYTES:
        raise ValueError(f"{kind} record: request_id requires at most 65535 bytes and impression_id at most "
                         f"{MAX_IMPRESSION_ID_BYTES}, got {len(request_id)} and {len(impression_id)}")


def _take_header(payload: bytes, kind: str, head_v1: struct.Struct, head_v2: struct.Struct):
    """(request_id_len, impression_id_len, the remaining header fields, offset after the header)."""
    if _version(payload, kind) == 1:
        if len(payload) < head_v1.size:
            raise ValueError(f"{kind} record: {len(payload)} bytes, shorter than its header")
        rid_len, *rest = head_v1.unpack_from(payload)
        return rid_len, 0, rest, head_v1.size
    if len(payload) < head_v2.size:
        raise ValueError(f"{kind} record: {len(payload)} bytes, shorter than its header")
    _, _, iid_len, rid_len, *rest = head_v2.unpack_from(payload)
    return rid_len, iid_len, rest, head_v2.size


@dataclass
class FeatureRecord:
    request_id: bytes  # the client's, a correlation field only
    request_time_s: float
    delta_seq: int
    user_fids: np.ndarray  # uint64[Wu]
    item_fids: np.ndarray  # uint64[N, Wi]
    scores: np.ndarray  # float32[N]
    impression_id: bytes = b""  # the ranker's (server.runtime.requests.new_impression_ids); empty in version 1 records

    def encode(self) -> bytes:
        _check_ids("feature", self.request_id, self.impression_id)
        n, wi = self.item_fids.shape
        return b"".join(
            (
                _FEATURE_HEAD.pack(VERSION_MARKER, VERSION, len(self.impression_id), len(self.request_id),
                                   self.request_time_s, self.delta_seq, self.user_fids.shape[0], n, wi),
                self.request_id,
                self.impression_id,
                np.ascontiguousarray(self.user_fids, dtype="<u8").tobytes(),
                np.ascontiguousarray(self.item_fids, dtype="<u8").tobytes(),
                np.ascontiguousarray(self.scores, dtype="<f4").tobytes(),
            )
        )

    @classmethod
    def decode(cls, payload: bytes) -> "FeatureRecord":
        rid_len, iid_len, (t, seq, wu, n, wi), at = _take_header(payload, "feature", _FEATURE_HEAD_V1, _FEATURE_HEAD)
        expected = at + rid_len + iid_len + 8 * wu + 8 * n * wi + 4 * n
        if len(payload) != expected:
            raise ValueError(f"feature record: {len(payload)} bytes, header implies {expected}")
        rid = bytes(payload[at : at + rid_len])
        at += rid_len
        iid = bytes(payload[at : at + iid_len])
        at += iid_len
        user = np.frombuffer(payload, "<u8", wu, at)
        at += 8 * wu
        items = np.frombuffer(payload, "<u8", n * wi, at).reshape(n, wi)
        at += 8 * n * wi
        scores = np.frombuffer(payload, "<f4", n, at)
        return cls(rid, t, seq, user, items, scores, iid)


@dataclass
class FeedbackRecord:
    request_id: bytes
    event_time_s: float
    accepted_time_s: float
    item_fids: np.ndarray  # uint64[M]
    labels: np.ndarray  # float32[M]
    impression_id: bytes = b""  # echoed from the ranker's response; empty if the client sent none

    def encode(self) -> bytes:
        _check_ids("feedback", self.request_id, self.impression_id)
        return b"".join(
            (
                _FEEDBACK_HEAD.pack(VERSION_MARKER, VERSION, len(self.impression_id), len(self.request_id),
                                    self.event_time_s, self.accepted_time_s, self.item_fids.shape[0]),
                self.request_id,
                self.impression_id,
                np.ascontiguousarray(self.item_fids, dtype="<u8").tobytes(),
                np.ascontiguousarray(self.labels, dtype="<f4").tobytes(),
            )
        )

    @classmethod
    def decode(cls, payload: bytes) -> "FeedbackRecord":
        rid_len, iid_len, (event_t, accepted_t, m), at = _take_header(payload, "feedback", _FEEDBACK_HEAD_V1,
                                                                      _FEEDBACK_HEAD)
        expected = at + rid_len + iid_len + 12 * m
        if len(payload) != expected:
            raise ValueError(f"feedback record: {len(payload)} bytes, header implies {expected}")
        rid = bytes(payload[at : at + rid_len])
        at += rid_len
        iid = bytes(payload[at : at + iid_len])
        at += iid_len
        items = np.frombuffer(payload, "<u8", m, at)
        labels = np.frombuffer(payload, "<f4", m, at + 8 * m)
        return cls(rid, event_t, accepted_t, items, labels, iid)
