"""Ranker runtime without Triton: pooling and scoring against a plain reference."""

import numpy as np
import pytest
import torch

from server.features import PAD_FID, shipped_schema
from server.ranker import MAX_CANDIDATES, RankerRuntime, RankRequest, RequestError, parse_rank_request
from server.scoring_bench import reference_pool

SCHEMA = shipped_schema()


def test_score_matches_reference_and_batches_like_singles(tmp_path, rng):
    runtime = RankerRuntime(SCHEMA, tmp_path, "t", apply_deltas=False)
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
            with torch.inference_mode():
                expected = torch.sigmoid(runtime.dense(torch.from_numpy(fields.astype(np.float32)))).numpy()
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
