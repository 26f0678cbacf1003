"""DeepFMScorer: the fused serving forward agrees with pooling + the torch DeepFM it copies."""

import numpy as np
import orjson
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.cli import main
from server.dense import build_dense
from server.features import PAD_FID, shipped_schema
from server.runtime.scoring import DeepFMScorer
from server.runtime.scoring_bench import reference_probs

SCHEMA = shipped_schema()


def random_fids(rng, n, width, pad_share):
    fids = rng.integers(1, 2**40, (n, width), dtype=np.uint64)
    fids[rng.random(fids.shape) < pad_share] = PAD_FID
    return fids


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), counts=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       hidden=st.sampled_from([[64, 32], [8], [16, 8, 4]]), scale=st.sampled_from([0.01, 0.1, 1.0, 30.0]),
       pad_share=st.sampled_from([0.0, 0.4, 1.0]))
def test_scores_match_pooling_and_the_torch_module(seed, counts, hidden, scale, pad_share):
    rng = np.random.default_rng(seed)
    module = build_dense(SCHEMA.num_fields, SCHEMA.dim, {"seed": seed % 1000, "hidden": hidden})
    counts = np.array(counts, dtype=np.int64)
    user = random_fids(rng, len(counts), SCHEMA.user_width, pad_share)
    items = random_fids(rng, int(counts.sum()), SCHEMA.item_width, pad_share)
    user_rows = (rng.standard_normal((user.size, SCHEMA.dim)) * scale).astype(np.float32)
    item_rows = (rng.standard_normal((items.size, SCHEMA.dim)) * scale).astype(np.float32)
    got = DeepFMScorer(module, SCHEMA)(user_rows, user, item_rows, items, counts)
    exact = reference_probs(module, SCHEMA, user_rows, user, item_rows, items, counts, np.float64)
    torch_f32 = reference_probs(module, SCHEMA, user_rows, user, item_rows, items, counts)
    assert got.dtype == np.float32 and got.shape == (counts.sum(),)
    # Summation order differs from torch's (the user part is summed apart), so
    # the bound is torch's own float32 rounding error (large at scale 30, where
    # FM terms reach 1e5), not bitwise equality.
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-6 + 4 * np.abs(torch_f32 - exact).max())


def test_a_module_of_another_shape_is_refused():
    with pytest.raises(TypeError, match="requires a DeepFM module, got Linear"):
        DeepFMScorer(torch.nn.Linear(2, 1), SCHEMA)
    with pytest.raises(TypeError, match="requires a first layer of 160 inputs"):
        DeepFMScorer(build_dense(SCHEMA.num_fields + 1, SCHEMA.dim, {}), SCHEMA)


def test_counts_must_cover_the_candidates(rng):
    scorer = DeepFMScorer(build_dense(SCHEMA.num_fields, SCHEMA.dim, {}), SCHEMA)
    user = random_fids(rng, 1, SCHEMA.user_width, 0.0)
    items = random_fids(rng, 3, SCHEMA.item_width, 0.0)
    rows = np.zeros((user.size + items.size, SCHEMA.dim), dtype=np.float32)
    with pytest.raises(ValueError, match="counts requires a sum of 3 candidates, got 2"):
        scorer(rows[: user.size], user, rows[user.size :], items, np.array([2]))


def test_bench_scoring_prints_both_figures_and_agrees(capsys):
    assert main(["bench", "scoring", "--requests", "2", "--candidates", "10", "--calls", "2", "--json"]) == 0
    result = orjson.loads(capsys.readouterr().out)
    assert {"scorer_us", "scorer_2_blas_threads_us", "torch_us", "speedup", "busy_cores"} <= result.keys()
    assert result["scorer_us"] > 0 and result["torch_us"] > 0 and result["max_abs_difference"] < 1e-5
