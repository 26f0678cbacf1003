"""The dense network: DeepFM over pooled slot embeddings, shared by ranker and trainer.

Shapes: B candidates, F fields (slots), K embedding dim.

    fields  float32[B, F, K]   one pooled embedding per slot (zeros if absent)
    logit   float32[B]         bias + FM(fields) + MLP(flatten(fields))

FM is the factorisation machine's pairwise term, 0.5 * sum_k((sum_f v)^2 - sum_f v^2);
first-order effects are left to the MLP, which sees every field's embedding.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn


class DeepFM(nn.Module):
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


def build_dense(num_fields: int, dim: int, config: Mapping) -> nn.Module:
    """The network named by the schema's "dense" config, freshly initialised
    from its seed (the same weights in every process)."""
    kind = config.get("kind", "deepfm")
    if kind != "deepfm":
        raise ValueError(f"dense.kind requires 'deepfm', got {kind!r}")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(int(config.get("seed", 0)))
    try:
        model = DeepFM(num_fields, dim, tuple(config.get("hidden", (64, 32))))
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()
