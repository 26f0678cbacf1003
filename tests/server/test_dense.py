"""The dense network's weights in numpy (server.dense): seeded initial state, the fit check, the reference forward."""

import numpy as np
import pytest

from server.dense import deepfm_logits, dense_shapes, fit_dense_state, initial_dense_state

F, K = 10, 16


def test_the_initial_state_is_seeded_shaped_and_bounded_as_torch_initialises():
    state = initial_dense_state(F, K, {"seed": 3, "hidden": [8, 4]})
    assert {k: v.shape for k, v in state.items()} == dense_shapes(F, K, {"hidden": [8, 4]}) == {
        "bias": (1,), "mlp.0.weight": (8, F * K), "mlp.0.bias": (8,), "mlp.2.weight": (4, 8), "mlp.2.bias": (4,),
        "mlp.4.weight": (1, 4), "mlp.4.bias": (1,)}
    assert all(v.dtype == np.float32 for v in state.values()) and state["bias"].tolist() == [0.0]
    for layer, fan_in in ((0, F * K), (2, 8), (4, 4)):
        for part in ("weight", "bias"):
            assert np.abs(state[f"mlp.{layer}.{part}"]).max() <= 1 / np.sqrt(fan_in)
    again = initial_dense_state(F, K, {"seed": 3, "hidden": [8, 4]})
    assert all(again[k].tobytes() == v.tobytes() for k, v in state.items())
    other = initial_dense_state(F, K, {"seed": 4, "hidden": [8, 4]})
    assert other["mlp.0.weight"].tobytes() != state["mlp.0.weight"].tobytes()
    with pytest.raises(ValueError, match="dense.kind requires 'deepfm', got 'wide'"):
        initial_dense_state(F, K, {"kind": "wide"})


def test_fit_keeps_float32_arrays_casts_others_and_refuses_what_a_strict_load_refused():
    state = initial_dense_state(F, K, {})
    fitted = fit_dense_state(state, F, K, {})
    assert list(fitted) == list(dense_shapes(F, K, {})) and all(fitted[k] is state[k] for k in state)
    widened = fit_dense_state({k: v.astype(np.float64) for k, v in state.items()}, F, K, {})
    assert all(widened[k].dtype == np.float32 and widened[k].tobytes() == state[k].tobytes() for k in state)
    with pytest.raises(ValueError, match=r"does not fit the network: missing \['bias'\], unexpected \['b'\]"):
        fit_dense_state({**{k: v for k, v in state.items() if k != "bias"}, "b": state["bias"]}, F, K, {})
    with pytest.raises(ValueError, match=r"shapes \(got, required\) mlp.0.weight \[64, 150\] vs \[64, 160\]"):
        fit_dense_state({**state, "mlp.0.weight": state["mlp.0.weight"][:, :150]}, F, K, {})
    with pytest.raises(ValueError, match=r"holds NaN or Inf \(in \['mlp.2.bias'\]\)"):
        fit_dense_state({**state, "mlp.2.bias": np.full_like(state["mlp.2.bias"], np.nan)}, F, K, {})


def test_the_reference_forward_is_bias_plus_fm_plus_mlp():
    state = initial_dense_state(F, K, {"hidden": [4]})
    fields = np.random.default_rng(0).standard_normal((5, F, K))
    summed = fields.sum(axis=1)
    fm = 0.5 * (summed ** 2 - (fields ** 2).sum(axis=1)).sum(axis=1)
    hidden = np.maximum(fields.reshape(5, -1) @ state["mlp.0.weight"].T.astype(np.float64) + state["mlp.0.bias"], 0)
    mlp = hidden @ state["mlp.2.weight"][0].astype(np.float64) + state["mlp.2.bias"][0]
    np.testing.assert_allclose(deepfm_logits(state, fields), state["bias"][0] + fm + mlp, rtol=1e-12)
