"""Ranker runtime without Triton: pooling and scoring against a plain reference."""

import numpy as np
import pytest

from server.features import PAD_FID, shipped_schema
from server.runtime.ranker import MAX_CANDIDATES, RankerRuntime, RankRequest, parse_rank_request
from server.runtime.requests import RequestError
from server.runtime.scoring_bench import reference_pool
from server.dense import deepfm_logits

SCHEMA = shipped_schema()


def test_score_matches_reference_and_batches_like_singles(tmp_path, rng):
    runtime = RankerRuntime(SCHEMA, tmp_path, "t")
    try:
        requests = []
        for n, user_id in ((3, 1), (5, 2)):
            user, items = SCHEMA.encode_request({"user_id": user_id, "hour": 4},
                                                [{"item_id": i, "item_genres": ["x", "y"]} for i in range(n)])
            requests.append(RankRequest(b"r", 1.0, user, items))
        all_fids = np.unique(np.concatenate([np.concatenate([r.user_fids, r.item_fids.ravel()]) for r in requests]))
        all_fids = all_fids[all_fids != PAD_FID]
        runtime.table.upsert(all_fids, rng.standard_normal((len(all_fids), SCHEMA.dim), dtype=np.float32), now=1.0)
        batched, seq = runtime.score(requests)
        assert seq == 0 and [b.shape for b in batched] == [(3,), (5,)]
        for request, scores in zip(requests, batched):
            np.testing.assert_allclose(runtime.score([request])[0][0], scores, rtol=1e-6)
            user = runtime.table.lookup(request.user_fids).reshape(1, -1, SCHEMA.dim)
            items = runtime.table.lookup(request.item_fids.ravel()).reshape(*request.item_fids.shape, SCHEMA.dim)
            fields = np.concatenate([
                np.repeat(reference_pool(user, request.user_fids[None], SCHEMA.user_slots), len(scores), axis=0),
                reference_pool(items, request.item_fids, SCHEMA.item_slots),
            ], axis=1)
            expected = 1.0 / (1.0 + np.exp(-deepfm_logits(runtime.dense, fields.astype(np.float64))))
            np.testing.assert_allclose(scores, expected, rtol=1e-5)
    finally:
        runtime.close()


def test_parse_rejects_before_scoring():
    user, items = SCHEMA.encode_request({"user_id": 1}, [{"item_id": 1}])
    base = {"user_fids": user, "item_fids": items, "request_id": np.array([b"id"], dtype=object)}
    assert parse_rank_request(base, SCHEMA, 5.0).request_time_s == 5.0
    with pytest.raises(RequestError, match=f"1 to {MAX_CANDIDATES} candidates"):
        parse_rank_request({**base, "item_fids": np.empty((0, SCHEMA.item_width), np.uint64)}, SCHEMA, 1.0)
    with pytest.raises(RequestError, match="requires shape \\[1\\]"):
        parse_rank_request({**base, "request_id": np.array([b"a", b"b"], dtype=object)}, SCHEMA, 1.0)
    with pytest.raises(RequestError, match="'timestamp' requires dtype float64"):
        parse_rank_request({**base, "timestamp": np.array([1], np.int64)}, SCHEMA, 1.0)


def test_impression_ids_are_unique_hex_and_logged_with_the_features(tmp_path):
    from server.runtime.requests import IMPRESSION_ID_BYTES, new_impression_ids, parse_impression_id
    from server.streams import SegmentLogReader
    from server.streams.records import FeatureRecord

    ids = new_impression_ids(10_000)
    assert len(set(ids)) == 10_000 and all(len(i) == IMPRESSION_ID_BYTES for i in ids)
    assert all(parse_impression_id(np.array([i], dtype=object)) == i for i in ids[:100])
    assert parse_impression_id(None) == b""
    for bad in (b"", b"A" * 32, b"g" * 32, ids[0][:-1], ids[0] + b"0", "é" * 32):
        with pytest.raises(RequestError, match="impression_id"):
            parse_impression_id(np.array([bad], dtype=object))
    runtime = RankerRuntime(SCHEMA, tmp_path, "t")
    try:
        user, items = SCHEMA.encode_request({"user_id": 1}, [{"item_id": 1}, {"item_id": 2}])
        request = RankRequest(b"same", 1.0, user, items)
        (scores,), seq = runtime.score([request])
        for iid in ids[:2]:
            assert runtime.log_scored(request, scores, seq, iid)
    finally:
        runtime.close(snapshot=False)
    with SegmentLogReader(tmp_path / "feature_log" / "t") as reader:
        logged = [FeatureRecord.decode(p) for _, p in reader.read()]
    assert [(r.request_id, r.impression_id) for r in logged] == [(b"same", ids[0]), (b"same", ids[1])]
