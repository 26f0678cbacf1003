"""Writing feature and feedback log records by hand, for tests of whatever reads them."""

import numpy as np

from server.features import fid, shipped_schema
from server.streams.records import FeatureRecord, FeedbackRecord

SCHEMA = shipped_schema()


def write_feature(log, rid, items, t=1.0):
    user, item_fids = SCHEMA.encode_request({"user_id": 1}, [{"item_id": i} for i in items])
    log.append(FeatureRecord(rid, t, 0, user, item_fids, np.zeros(len(items), np.float32)).encode())
    return item_fids


def write_action(log, rid, item, label=1.0):
    log.append(FeedbackRecord(rid, 1.0, 1.0, np.array([fid(10, item)], np.uint64), np.array([label], np.float32))
               .encode())
