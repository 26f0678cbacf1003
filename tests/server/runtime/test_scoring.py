"""DeepFMScorer: the fused serving forward agrees with pooling + the straightforward numpy DeepFM."""

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.cli import main
from server.dense import initial_dense_state
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
def test_scores_match_pooling_and_the_reference_forward(seed, counts, hidden, scale, pad_share):
    rng = np.random.default_rng(seed)
    state = initial_dense_state(SCHEMA.num_fields, SCHEMA.dim, {"seed": seed % 1000, "hidden": hidden})
    counts = np.array(counts, dtype=np.int64)
    user = random_fids(rng, len(counts), SCHEMA.user_width, pad_share)
    items = random_fids(rng, int(counts.sum()), SCHEMA.item_width, pad_share)
    user_rows = (rng.standard_normal((user.size, SCHEMA.dim)) * scale).astype(np.float32)
    item_rows = (rng.standard_normal((items.size, SCHEMA.dim)) * scale).astype(np.float32)
    got = DeepFMScorer(state, SCHEMA)(user_rows, user, item_rows, items, counts)
    exact = reference_probs(state, SCHEMA, user_rows, user, item_rows, items, counts, np.float64)
    reference_f32 = reference_probs(state, SCHEMA, user_rows, user, item_rows, items, counts)
    assert got.dtype == np.float32 and got.shape == (counts.sum(),)
    # Summation order differs from the reference's (the user part is summed apart),
    # so the bound is the float32 reference's own rounding error (large at scale
    # 30, where FM terms reach 1e5), not bitwise equality.
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-6 + 4 * np.abs(reference_f32 - exact).max())


def test_weights_of_another_shape_are_refused():
    with pytest.raises(ValueError, match="requires mlp.0, mlp.2, ... .* and bias"):
        DeepFMScorer({"mlp.0.weight": np.zeros((1, 2), np.float32), "mlp.0.bias": np.zeros(1, np.float32)}, SCHEMA)
    with pytest.raises(ValueError, match="requires mlp.2.weight to take 64 inputs, got 8"):
        DeepFMScorer({**initial_dense_state(SCHEMA.num_fields, SCHEMA.dim, {}),
                      "mlp.2.weight": np.zeros((32, 8), np.float32)}, SCHEMA)
    with pytest.raises(ValueError, match="requires a first layer of 160 inputs"):
        DeepFMScorer(initial_dense_state(SCHEMA.num_fields + 1, SCHEMA.dim, {}), SCHEMA)


def test_counts_must_cover_the_candidates(rng):
    scorer = DeepFMScorer(initial_dense_state(SCHEMA.num_fields, SCHEMA.dim, {}), SCHEMA)
    user = random_fids(rng, 1, SCHEMA.user_width, 0.0)
    items = random_fids(rng, 3, SCHEMA.item_width, 0.0)
    rows = np.zeros((user.size + items.size, SCHEMA.dim), dtype=np.float32)
    with pytest.raises(ValueError, match="counts requires a sum of 3 candidates, got 2"):
        scorer(rows[: user.size], user, rows[user.size :], items, np.array([2]))


def test_bench_scoring_prints_both_figures_and_agrees(capsys):
    assert main(["bench", "scoring", "--requests", "2", "--candidates", "10", "--calls", "2", "--json"]) == 0
    result = orjson.loads(capsys.readouterr().out)
    assert {"scorer_us", "scorer_2_blas_threads_us", "reference_us", "speedup", "busy_cores"} <= result.keys()
    assert result["scorer_us"] > 0 and result["reference_us"] > 0 and result["max_abs_difference"] < 1e-5
