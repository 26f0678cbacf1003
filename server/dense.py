"""The dense network: DeepFM over pooled slot embeddings, its weights as named numpy arrays.

Shapes: B candidates, F fields (slots), K embedding dim, H_1..H_L the
hidden widths (the schema's "dense": {"hidden": [64, 32]} by default).

    fields  float32[B, F, K]   one pooled embedding per slot (zeros if absent)
    logit   float32[B]         bias + FM(fields) + MLP(flatten(fields))

FM is the factorisation machine's pairwise term, 0.5 * sum_k((sum_f v)^2 - sum_f v^2);
first-order effects are left to the MLP, which sees every field's embedding.

The weights are a *dense state*, name -> float32 array, in this order (the
names and the order of the torch ``state_dict`` of the trainer's module,
trainer.dense, so states encode to the same bytes on both sides and records
and snapshots written before serving dropped torch read back as they are):

    bias [1]
    mlp.0.weight [H_1, F*K]   mlp.0.bias [H_1]      MLP layer 1 (odd indices are the ReLUs)
    mlp.2.weight [H_2, H_1]   mlp.2.bias [H_2]      ... one pair per hidden layer
    mlp.2L.weight [1, H_L]    mlp.2L.bias [1]       the output layer

Serving holds them in numpy (server.runtime.scoring computes the forward);
only the trainer holds them in torch, and converts at its own edge. Nothing
here imports torch: a ranker stub is some 200 MB and 2 s lighter for it.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from server.tensor_io import nonfinite

DenseState = dict[str, np.ndarray]


def dense_shapes(num_fields: int, dim: int, config: Mapping) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight of the network the schema's "dense" config names, in state order."""
    kind = config.get("kind", "deepfm")
    if kind != "deepfm":
        raise ValueError(f"dense.kind requires 'deepfm', got {kind!r}")
    widths = [num_fields * dim, *(int(h) for h in config.get("hidden", (64, 32))), 1]
    shapes = {"bias": (1,)}
    for layer, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        shapes[f"mlp.{2 * layer}.weight"] = (fan_out, fan_in)
        shapes[f"mlp.{2 * layer}.bias"] = (fan_out,)
    return shapes


def initial_dense_state(num_fields: int, dim: int, config: Mapping) -> DenseState:
    """The network's weights freshly initialised from the config's "seed": the same in every process.

    Each linear layer's weight and bias are uniform in +-1/sqrt(fan_in), the
    distribution torch gives an ``nn.Linear``, drawn with numpy (PCG64) so that
    serving needs no torch; the FM bias starts at 0."""
    rng = np.random.default_rng(int(config.get("seed", 0)))
    shapes = dense_shapes(num_fields, dim, config)
    state = {}
    for name, shape in shapes.items():
        if name == "bias":
            state[name] = np.zeros(shape, np.float32)
            continue
        bound = 1.0 / np.sqrt(shapes[name.rsplit(".", 1)[0] + ".weight"][1])
        state[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
    return state


def fit_dense_state(state: Mapping[str, np.ndarray], num_fields: int, dim: int, config: Mapping) -> DenseState:
    """``state`` as the weights of the network the config names: float32 and C-ordered (arrays that already
    are, as decoded ones, are kept, not copied), in the network's order.

    Raises:
        ValueError: its names or shapes are not the network's (what a strict torch ``load_state_dict``
            refused), or it holds NaN or Inf.
    """
    shapes = dense_shapes(num_fields, dim, config)
    if set(state) != set(shapes):
        missing, unexpected = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
        raise ValueError(f"dense state does not fit the network: missing {missing}, unexpected {unexpected}")
    wrong = {name: (list(np.shape(state[name])), list(shape)) for name, shape in shapes.items()
             if tuple(np.shape(state[name])) != shape}
    if wrong:
        raise ValueError("dense state does not fit the network: shapes (got, required) " +
                         ", ".join(f"{name} {got} vs {required}" for name, (got, required) in wrong.items()))
    out = {name: np.ascontiguousarray(state[name], dtype=np.float32) for name in shapes}
    bad = nonfinite(out)
    if bad:
        raise ValueError(f"dense state holds NaN or Inf (in {bad})")
    return out


def dense_linears(state: Mapping[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight [out, in], bias [out]) of each MLP layer in order, the last to one output.

    Raises:
        ValueError: the names do not run mlp.0, mlp.2, ... (weight and bias each), widths do not chain,
            or the last layer has more than one output.
    """
    linears, index = [], 0
    while f"mlp.{index}.weight" in state:
        weight, bias = state[f"mlp.{index}.weight"], state.get(f"mlp.{index}.bias")
        if weight.ndim != 2 or bias is None or bias.shape != weight.shape[:1]:
            raise ValueError(f"dense state requires mlp.{index}.bias of shape [{weight.shape[0]}] beside "
                             f"mlp.{index}.weight {list(weight.shape)}, got "
                             f"{None if bias is None else list(bias.shape)}")
        if linears and linears[-1][0].shape[0] != weight.shape[1]:
            raise ValueError(f"dense state requires mlp.{index}.weight to take {linears[-1][0].shape[0]} inputs, "
                             f"got {weight.shape[1]}")
        linears.append((weight, bias))
        index += 2
    extra = sorted(set(state) - {f"mlp.{i}.{p}" for i in range(0, index, 2) for p in ("weight", "bias")} - {"bias"})
    if len(linears) < 2 or linears[-1][0].shape[0] != 1 or extra or "bias" not in state:
        raise ValueError(f"dense state requires mlp.0, mlp.2, ... (two or more layers, the last to 1 output) and "
                         f"bias, got {[(k, list(v.shape)) for k, v in state.items()]}")
    return linears


def deepfm_logits(state: Mapping[str, np.ndarray], fields: np.ndarray) -> np.ndarray:
    """The logits [B] of ``fields`` [B, F, K], the straightforward way, in the fields' dtype: the reference
    that the serving forward (server.runtime.scoring) and the trainer's torch module are checked against."""
    dtype = fields.dtype
    summed = fields.sum(axis=1)
    fm = 0.5 * (summed ** 2 - (fields ** 2).sum(axis=1)).sum(axis=1)
    hidden = fields.reshape(fields.shape[0], -1)
    linears = dense_linears(state)
    for k, (weight, bias) in enumerate(linears):
        hidden = hidden @ weight.T.astype(dtype) + bias.astype(dtype)
        if k < len(linears) - 1:
            hidden = np.maximum(hidden, 0)
    return state["bias"].astype(dtype) + fm + hidden[:, 0]
