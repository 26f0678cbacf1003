"""The trainer's model: sparse rows in its own cuckoo table, dense weights in torch (trainer.dense).

Shapes: B examples, W = Wu + Wi FID columns, U distinct FIDs in a batch, F
fields, K embedding dim.

Table rows hold ``[embedding (K) | Adagrad accumulator (K)]``, so one lookup
and one upsert per step move a row and its optimizer state together;
serving gets the first K columns. A training step:

    1. distinct FIDs of the batch; admission per slot (``min_count`` of the
       schema): a FID enters the table only once seen often enough, until
       then it contributes a zero embedding and gets no update
    2. rows looked up (new ones: a deterministic small init), pooled per slot
       exactly as the ranker pools them, DeepFM forward, BCE loss with each
       example weighted by 1 / sample_rate (importance weighting: a negative
       kept with probability r stands for 1/r impressions), so the weighted
       loss is in expectation the loss on the unsampled stream and the raw
       logit stays calibrated to it; serving needs no correction. (A logit
       shift of -log(r) on the sampled negatives alone, as this step once
       did, is not that: down-sampling negatives multiplies the odds of every
       example by 1/r, so a bias-only model at a true rate of 0.2 and r = 0.1
       settled near 0.62.)
    3. backward; dense weights by Adam; touched rows by sparse Adagrad
       (only the U rows of the batch are read or written)
    4. the touched FIDs are remembered, every one, until ``take_delta``
       turns them (with evictions since) into one sparse delta record

A step whose new rows or dense gradients hold NaN or Inf is skipped whole
(counted in ``skipped_steps``): nothing non-finite reaches the table, the
dense weights or a delta.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from server.features import PAD_FID, SLOT_IDS, FeatureSchema, slot_of
from server.table import EmbeddingTable
from server.streams.deltas import DeltaRecord
from trainer.dense import build_dense, numpy_state


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties averaged); nan if one class."""
    labels = np.asarray(labels) > 0.5
    n_pos = int(labels.sum())
    n_neg = labels.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(labels.shape[0])
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(average, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


class TrainerModel:
    def __init__(self, schema: FeatureSchema, lr_sparse: float = 0.5, lr_dense: float = 1e-2,
                 init_scale: float = 0.01, adagrad_init: float = 0.1):
        self.schema = schema
        self.dim = schema.dim
        self.lr_sparse = lr_sparse
        self.init_scale = init_scale
        self.adagrad_init = adagrad_init
        self.table = EmbeddingTable(2 * self.dim)
        self.dense = build_dense(schema.num_fields, schema.dim, schema.dense).train()
        self.optimizer = torch.optim.Adam(self.dense.parameters(), lr=lr_dense)
        slots = list(schema.user_slots) + list(schema.item_slots)  # the ranker's field order
        columns = np.concatenate([np.full(s.max_values, f) for f, s in enumerate(slots)])
        self._membership = torch.zeros(len(columns), len(slots))
        self._membership[torch.arange(len(columns)), torch.from_numpy(columns)] = 1.0
        self._mean = torch.tensor([s.pooling == "mean" for s in slots])
        self._min_count = np.ones(SLOT_IDS, dtype=np.int64)
        self.ttl_s_by_slot = {}
        for s in schema.slots:
            self._min_count[s.slot] = s.min_count
            self.ttl_s_by_slot[s.slot] = s.ttl_s
        self._touched: list[np.ndarray] = []
        self._evicted: list[np.ndarray] = []
        self.steps = 0
        self.skipped_steps = 0

    def set_learning_rates(self, sparse: float, dense: float) -> None:
        """Sparse Adagrad's and the dense optimizer's learning rates (e.g. online rates after batch training)."""
        self.lr_sparse = sparse
        for group in self.optimizer.param_groups:
            group["lr"] = dense

    # ------------------------------------------------------------------ pooling

    def _fields(self, fids: np.ndarray, rows: torch.Tensor, inverse: np.ndarray) -> torch.Tensor:
        """[B, W] FIDs + [U, K] distinct rows -> [B, F, K] pooled fields."""
        present = torch.from_numpy(fids != PAD_FID).float()  # [B, W]
        x = rows[torch.from_numpy(inverse)] * present[..., None]  # [B, W, K]
        counts = present @ self._membership  # [B, F]
        divisor = torch.where(self._mean, counts.clamp(min=1.0), torch.ones_like(counts))
        return torch.einsum("bwk,wf->bfk", x, self._membership) / divisor[..., None]

    def _distinct(self, user_fids: np.ndarray, item_fids: np.ndarray):
        fids = np.concatenate([user_fids, item_fids], axis=1)
        distinct, inverse = np.unique(fids.ravel(), return_inverse=True)
        return fids, distinct, inverse.reshape(fids.shape)

    # ---------------------------------------------------------------- training

    def train_step(self, user_fids: np.ndarray, item_fids: np.ndarray, labels: np.ndarray, now: float,
                   sample_rates: np.ndarray | None = None) -> float:
        """One step on a batch; returns the mean loss."""
        fids, distinct, inverse = self._distinct(user_fids, item_fids)
        real = distinct != PAD_FID
        admitted = np.zeros(distinct.shape[0], dtype=np.bool_)
        admitted[real] = self.table.admit(distinct[real], self._min_count[slot_of(distinct[real])])
        stored, found = self.table.lookup_found(distinct, init_scale=self.init_scale)
        emb = stored[:, : self.dim].copy()
        acc = stored[:, self.dim :].copy()
        acc[~found] = self.adagrad_init
        emb[~admitted] = 0.0
        rows = torch.from_numpy(emb).requires_grad_(True)
        logits = self.dense(self._fields(fids, rows, inverse))
        target = torch.from_numpy(np.asarray(labels, dtype=np.float32))
        if sample_rates is None:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        else:
            weights = 1.0 / torch.from_numpy(np.asarray(sample_rates, dtype=np.float32))
            per_example = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
            loss = (per_example * weights).sum() / weights.sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad = rows.grad.numpy()[admitted]
        acc_new = acc[admitted] + grad * grad
        emb_new = emb[admitted] - self.lr_sparse * grad / np.sqrt(acc_new)
        if not (np.isfinite(emb_new).all() and np.isfinite(acc_new).all() and all(
                p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.dense.parameters())):
            self.skipped_steps += 1  # NaN/Inf never reaches the table, the dense weights or a delta
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan")
        self.optimizer.step()
        keys = distinct[admitted]
        if keys.shape[0]:
            self.table.upsert(keys, np.concatenate([emb_new, acc_new], axis=1), now=now)
            self._touched.append(keys)
        self.steps += 1
        return float(loss.detach())

    @torch.inference_mode()
    def predict(self, user_fids: np.ndarray, item_fids: np.ndarray) -> np.ndarray:
        """Probabilities as serving computes them (missing FIDs are zeros)."""
        fids, distinct, inverse = self._distinct(user_fids, item_fids)
        emb = self.table.lookup(distinct)[:, : self.dim]
        self.dense.eval()
        try:
            return torch.sigmoid(self.dense(self._fields(fids, torch.from_numpy(emb), inverse))).numpy()
        finally:
            self.dense.train()

    # ---------------------------------------------------------- expiry, deltas

    def evict_expired(self, now: float | None = None) -> np.ndarray:
        """Per-slot TTL against the newest update (or ``now``); evictions go out
        as deletes with the next delta."""
        evicted = self.table.evict_expired_by_slot(self.ttl_s_by_slot, now)
        if evicted.shape[0]:
            self._evicted.append(evicted)
        return evicted

    def count_expired(self, now: float | None = None) -> int:
        """How many rows ``evict_expired(now)`` would remove (none is removed)."""
        return self.table.count_expired_by_slot(self.ttl_s_by_slot, now)

    def pending_rows(self) -> int:
        return sum(t.shape[0] for t in self._touched)

    def pending_fids(self) -> np.ndarray:
        """The FIDs the next ``take_delta`` would carry (touched or evicted since the last one), left pending."""
        parts = self._touched + self._evicted
        return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)

    def take_delta(self, seq: int, created_s: float | None = None) -> DeltaRecord | None:
        """The rows touched (and FIDs evicted) since the last call as one sparse
        record with absolute serving values, or None if nothing changed."""
        touched = np.unique(np.concatenate(self._touched)) if self._touched else np.empty(0, np.uint64)
        evicted = np.unique(np.concatenate(self._evicted)) if self._evicted else np.empty(0, np.uint64)
        self._touched, self._evicted = [], []
        if touched.shape[0] == 0 and evicted.shape[0] == 0:
            return None
        rows, found = self.table.lookup_found(touched)
        live = touched[found]
        evicted = np.setdiff1d(np.concatenate([evicted, touched[~found]]), live)
        return DeltaRecord.sparse(seq, time.time() if created_s is None else created_s, live,
                                  rows[found, : self.dim], evicted)

    def serving_table(self) -> EmbeddingTable:
        """A table of the serving rows (first K columns), for a serving snapshot."""
        out = EmbeddingTable(self.dim, capacity=max(1024, int(len(self.table) / 0.9)))
        for fids, rows, stamps in self.table.items():
            out.upsert(fids, rows[:, : self.dim], now=stamps)
        return out

    def dense_state(self) -> dict[str, np.ndarray]:
        """The dense weights as a dense state (numpy, server.dense), for records and snapshots."""
        return numpy_state(self.dense)
