"""The serving forward pass: table rows -> pooled fields -> DeepFM -> probabilities.

The same math as ``server.dense.deepfm_logits`` followed by a sigmoid, on
weights laid out once per dense version, with two changes of order that
serving allows and training does not need:

- The first linear layer is split by columns into a user part and an item
  part. The user part (7 of the shipped schema's 10 fields) and the user's
  FM terms are computed once per request, not once per candidate:

      fields [N, F, K] = [ user fields (repeated) | item fields ]
      h1 = relu(flat(fields) @ W1 + b1) = relu((flat(user) @ W1u + b1) + flat(item) @ W1i)
                                              \\_____ once per request ____/

- Pooling, the FM term and the user part run in one numba pass; the item
  part of the first layer and each later layer are one small BLAS product
  over all candidates, with bias and ReLU in numba. `monolith-rt bench
  scoring` times it against numpy pooling + the numpy forward of
  server.dense in the same run.

Shapes: R requests, T candidates of all requests, Wu / Wi request-layout
widths, Fu / Fi fields per side, K embedding dim, H_l hidden widths.

The kernel reads rows and FIDs that the caller has validated (dtypes,
shapes, layout); ``DeepFMScorer.__call__`` checks what it cannot assume.
"""

from __future__ import annotations

from typing import Sequence

from typing import Mapping

import numba
import numpy as np

from server.dense import dense_linears
from server.features import PAD_FID, FeatureSchema, Slot

PAD_U64 = np.uint64(PAD_FID)


def _pool_layout(slots: Sequence[Slot]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, widths, mean) of each slot's columns in the request layout."""
    widths = np.array([s.max_values for s in slots], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)
    return starts, widths, np.array([s.pooling == "mean" for s in slots], dtype=np.bool_)


@numba.njit(cache=True, nogil=True, fastmath=True)
def _pool(rows, fids, starts, widths, mean, out, summed):
    """out[f*K:(f+1)*K] = sum (mean if ``mean[f]`` and more than one) of the rows
    of slot f's columns whose FID is not PAD_FID; zeros if none. Also the FM
    inputs: summed[k] = sum over fields of out[f*K + k]; returns sum of out**2."""
    dim = rows.shape[1]
    squares = np.float32(0.0)
    for k in range(dim):
        summed[k] = 0.0
    for f in range(starts.shape[0]):
        base = f * dim
        for k in range(dim):
            out[base + k] = 0.0
        present = 0
        for c in range(starts[f], starts[f] + widths[f]):
            if fids[c] != PAD_U64:
                present += 1
                for k in range(dim):
                    out[base + k] += rows[c, k]
        scale = np.float32(1.0) / np.float32(present) if mean[f] and present > 1 else np.float32(1.0)
        for k in range(dim):
            x = out[base + k] * scale
            out[base + k] = x
            summed[k] += x
            squares += x * x
    return squares


@numba.njit(cache=True, nogil=True, fastmath=True)
def _affine_add(x, weight_t, out):
    """out += x @ weight_t (weight_t is [in, out]); zero inputs skipped."""
    for c in range(x.shape[0]):
        v = x[c]
        if v != 0.0:
            for j in range(out.shape[0]):
                out[j] += v * weight_t[c, j]


@numba.njit(cache=True, nogil=True, fastmath=True)
def _first_layer_inputs(user_rows, user_fids, item_rows, item_fids, counts, u_starts, u_widths, u_mean,
                        i_starts, i_widths, i_mean, w1u_t, b1, item_flat, fm, user_h1):
    """Pooling and everything per request: item_flat[t] = the pooled item fields
    of candidate t [Fi*K], fm[t] = its FM term (user and item fields together),
    user_h1[r] = b1 + the pooled user fields of request r @ W1u.

    user_rows [R*Wu, K], user_fids [R, Wu], item_rows [T*Wi, K], item_fids [T, Wi],
    counts [R] candidates per request, w1u_t [Fu*K, H1]."""
    dim = user_rows.shape[1]
    wu, wi = user_fids.shape[1], item_fids.shape[1]
    user_pooled = np.empty(u_starts.shape[0] * dim, dtype=np.float32)
    user_sum = np.empty(dim, dtype=np.float32)
    item_sum = np.empty(dim, dtype=np.float32)
    t = 0
    for r in range(counts.shape[0]):
        user_squares = _pool(user_rows[r * wu : (r + 1) * wu], user_fids[r], u_starts, u_widths, u_mean,
                             user_pooled, user_sum)
        user_h1[r] = b1
        _affine_add(user_pooled, w1u_t, user_h1[r])
        for _ in range(counts[r]):
            item_squares = _pool(item_rows[t * wi : (t + 1) * wi], item_fids[t], i_starts, i_widths, i_mean,
                                 item_flat[t], item_sum)
            total = np.float32(0.0)
            for k in range(dim):
                s = user_sum[k] + item_sum[k]
                total += s * s
            fm[t] = np.float32(0.5) * (total - user_squares - item_squares)
            t += 1


@numba.njit(cache=True, nogil=True, fastmath=True)
def _add_rows_relu(hidden, per_request, counts):
    """hidden[t] = relu(hidden[t] + per_request[request of t]), in place."""
    t = 0
    for r in range(counts.shape[0]):
        for _ in range(counts[r]):
            for j in range(hidden.shape[1]):
                hidden[t, j] = max(hidden[t, j] + per_request[r, j], np.float32(0.0))
            t += 1


@numba.njit(cache=True, nogil=True, fastmath=True)
def _bias_relu(hidden, bias):
    for t in range(hidden.shape[0]):
        for j in range(hidden.shape[1]):
            hidden[t, j] = max(hidden[t, j] + bias[j], np.float32(0.0))


@numba.njit(cache=True, nogil=True, fastmath=True)
def _output(hidden, last_w, offset, fm, out):
    """out[t] = sigmoid(hidden[t] . last_w + offset + fm[t]), without overflow
    (relative precision near 0 kept)."""
    for t in range(hidden.shape[0]):
        logit = offset + fm[t]
        for j in range(hidden.shape[1]):
            logit += hidden[t, j] * last_w[j]
        small = np.exp(-abs(logit))
        out[t] = 1.0 / (1.0 + small) if logit >= 0 else small / (1.0 + small)


def _f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


class DeepFMScorer:
    """Serving probabilities of a DeepFM for the schema's request layout.

    Args:
        state: the network's weights, a dense state (server.dense: mlp.0, mlp.2, ...
            weight and bias, the last layer to one output, then bias). They are
            copied; later changes to the arrays are not seen.
        schema: the feature schema whose user and item slots lay out the fields.
    Raises:
        ValueError: the state is not such a DeepFM, or its first layer does not
            take the schema's fields.
    """

    def __init__(self, state: Mapping[str, np.ndarray], schema: FeatureSchema):
        linears = dense_linears(state)
        fields = (len(schema.user_slots) + len(schema.item_slots)) * schema.dim
        if linears[0][0].shape[1] != fields:
            raise ValueError(f"DeepFMScorer requires a first layer of {fields} inputs (schema fields x dim), "
                             f"got {linears[0][0].shape[1]}")
        self.dim = schema.dim
        self._user_layout = _pool_layout(schema.user_slots)
        self._item_layout = _pool_layout(schema.item_slots)
        (w1, b1), *later, (last_w, last_b) = linears
        w1_t = _f32(w1).T
        user_columns = len(schema.user_slots) * schema.dim
        self._w1u_t = np.ascontiguousarray(w1_t[:user_columns])
        self._w1i_t = np.ascontiguousarray(w1_t[user_columns:])
        self._b1 = _f32(b1).copy()
        self._later = [(np.ascontiguousarray(_f32(w).T), _f32(b).copy()) for w, b in later]
        self._last_w = _f32(last_w)[0].copy()
        self._offset = np.float32(float(last_b[0]) + float(state["bias"][0]))

    def __call__(self, user_rows: np.ndarray, user_fids: np.ndarray, item_rows: np.ndarray, item_fids: np.ndarray,
                 counts: np.ndarray) -> np.ndarray:
        """Probabilities float32[T] of every candidate, requests in order.

        Args:
            user_rows: float32 [R*Wu, K], the table rows of ``user_fids`` in order.
            user_fids: uint64 [R, Wu].
            item_rows: float32 [T*Wi, K], the rows of ``item_fids`` in order.
            item_fids: uint64 [T, Wi].
            counts: int64 [R], candidates of each request (summing to T).
        """
        if int(counts.sum()) != item_fids.shape[0]:
            raise ValueError(f"counts requires a sum of {item_fids.shape[0]} candidates, got {int(counts.sum())}")
        n = item_fids.shape[0]
        item_flat = np.empty((n, self._w1i_t.shape[0]), dtype=np.float32)
        fm = np.empty(n, dtype=np.float32)
        user_h1 = np.empty((counts.shape[0], self._b1.shape[0]), dtype=np.float32)
        _first_layer_inputs(user_rows, user_fids, item_rows, item_fids, counts, *self._user_layout,
                            *self._item_layout, self._w1u_t, self._b1, item_flat, fm, user_h1)
        hidden = item_flat @ self._w1i_t
        _add_rows_relu(hidden, user_h1, counts)
        for weight_t, bias in self._later:
            hidden = hidden @ weight_t
            _bias_relu(hidden, bias)
        out = np.empty(n, dtype=np.float32)
        _output(hidden, self._last_w, self._offset, fm, out)
        return out
