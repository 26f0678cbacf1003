"""The dense network in torch, for training: server.dense's DeepFM as an ``nn.Module``.

Serving holds the dense weights as numpy arrays (server.dense); the trainer
alone holds them in torch, and this module is where the two meet: a fresh
module starts from ``server.dense.initial_dense_state`` (the weights every
server starts from too), ``load_state_dict`` takes numpy arrays as they come
from records, snapshots and rollback plans, and ``numpy_state`` gives
the weights back as numpy for records and snapshots. Names and shapes are
server.dense's, so the two hold the same bytes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from server.dense import initial_dense_state


class DeepFM(nn.Module):
    """Shapes as server.dense: fields [B, F, K] -> logits [B]."""

    def __init__(self, num_fields: int, dim: int, hidden: Sequence[int] = (64, 32)):
        super().__init__()
        layers: list[nn.Module] = []
        width = num_fields * dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        summed = fields.sum(dim=1)
        fm = 0.5 * (summed.pow(2) - fields.pow(2).sum(dim=1)).sum(dim=1)
        return self.bias + fm + self.mlp(fields.flatten(1)).squeeze(1)

    def load_state_dict(self, state_dict: Mapping, strict: bool = True, assign: bool = False):
        """torch's, also taking numpy arrays (copied into torch tensors): the dense states of records,
        snapshots and rollback plans load as they are."""
        state = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in state_dict.items()}
        return super().load_state_dict(state, strict=strict, assign=assign)


def build_dense(num_fields: int, dim: int, config: Mapping) -> DeepFM:
    """The network named by the schema's "dense" config, holding its initial weights
    (server.dense.initial_dense_state: the ones every server starts from)."""
    initial = initial_dense_state(num_fields, dim, config)
    generator_state = torch.random.get_rng_state()  # nn.Linear's own init draws from it: leave it as it was
    try:
        model = DeepFM(num_fields, dim, tuple(config.get("hidden", (64, 32))))
    finally:
        torch.random.set_rng_state(generator_state)
    model.load_state_dict(initial)
    return model.eval()


def numpy_state(module: nn.Module) -> dict[str, np.ndarray]:
    """The module's weights as a dense state (server.dense): numpy arrays of their own, bytes as in torch."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}
