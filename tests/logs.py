"""Feature and feedback log records in tests: written by hand for whatever reads them, and read back
from a server's data directory."""

import time

import numpy as np

from server.features import fid, shipped_schema
from server.streams import SegmentLogReader
from server.streams.records import FeatureRecord, FeedbackRecord

SCHEMA = shipped_schema()


def write_feature(log, rid, items, t=1.0):
    user, item_fids = SCHEMA.encode_request({"user_id": 1}, [{"item_id": i} for i in items])
    log.append(FeatureRecord(rid, t, 0, user, item_fids, np.zeros(len(items), np.float32)).encode())
    return item_fids


def write_action(log, rid, item, label=1.0):
    log.append(FeedbackRecord(rid, 1.0, 1.0, np.array([fid(10, item)], np.uint64), np.array([label], np.float32))
               .encode())


def read_log(directory, decode) -> list:
    """Every record of a log directory (all its instances), decoded."""
    records = []
    for instance in sorted(p for p in directory.iterdir() if p.is_dir()) if directory.exists() else []:
        with SegmentLogReader(instance) as reader:
            records += [decode(payload) for _, payload in reader.read()]
    return records


def logged(directory, decode, request_id, timeout_s: float = 10.0) -> list:
    """The records of ``request_id`` in a log directory, once at least one is there (logs are written
    off the request thread) or ``timeout_s`` has passed: then [], for the caller to assert on."""
    deadline = time.monotonic() + timeout_s
    while not (mine := [r for r in read_log(directory, decode) if r.request_id == request_id]):
        if time.monotonic() >= deadline:
            return []
        time.sleep(0.05)
    return mine
