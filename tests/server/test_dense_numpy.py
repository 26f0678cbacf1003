"""NumpyDeepFM: the serving forward in numpy agrees with the torch DeepFM it copies."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from server.dense import build_dense
from server.dense_numpy import NumpyDeepFM


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 64), fields=st.integers(1, 12), dim=st.sampled_from([4, 16]),
       scale=st.sampled_from([0.1, 1.0, 30.0]))
def test_numpy_forward_matches_torch(seed, batch, fields, dim, scale):
    module = build_dense(fields, dim, {"seed": seed % 1000, "hidden": [32, 8]})
    x = (np.random.default_rng(seed).standard_normal((batch, fields, dim)) * scale).astype(np.float32)
    with torch.inference_mode():
        expected = torch.sigmoid(module(torch.from_numpy(x))).numpy()
    got = NumpyDeepFM(module)(x)
    assert got.dtype == np.float32 and got.shape == (batch,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_module_that_is_not_a_deepfm_is_refused():
    with pytest.raises(TypeError, match="requires a DeepFM module, got Linear"):
        NumpyDeepFM(torch.nn.Linear(2, 1))
