"""The trainer's torch DeepFM (trainer.dense) holds server.dense's weights, in its order and bytes."""

import numpy as np
import torch

from server.dense import deepfm_logits, initial_dense_state
from server.features import shipped_schema
from server.tensor_io import encode_tensors
from trainer.dense import build_dense, numpy_state

SCHEMA = shipped_schema()


def test_a_fresh_module_holds_the_initial_state_every_server_starts_from_byte_for_byte():
    generator = torch.random.get_rng_state()
    module = build_dense(SCHEMA.num_fields, SCHEMA.dim, SCHEMA.dense)
    assert torch.equal(torch.random.get_rng_state(), generator)  # torch's global stream left as it was
    assert encode_tensors(numpy_state(module)) == encode_tensors(
        initial_dense_state(SCHEMA.num_fields, SCHEMA.dim, SCHEMA.dense))


def test_numpy_states_load_and_come_back_unchanged_and_the_forward_matches_the_reference():
    rng = np.random.default_rng(1)
    state = {k: rng.standard_normal(v.shape, dtype=np.float32) * 0.3
             for k, v in initial_dense_state(SCHEMA.num_fields, SCHEMA.dim, SCHEMA.dense).items()}
    module = build_dense(SCHEMA.num_fields, SCHEMA.dim, SCHEMA.dense)
    module.load_state_dict(state)
    assert encode_tensors(numpy_state(module)) == encode_tensors(state)
    fields = rng.standard_normal((7, SCHEMA.num_fields, SCHEMA.dim), dtype=np.float32)
    with torch.inference_mode():
        got = module(torch.from_numpy(fields)).numpy()
    np.testing.assert_allclose(got, deepfm_logits(state, fields.astype(np.float64)), rtol=1e-4, atol=1e-4)
