"""Exact nearest-neighbour search and PatchCore scoring in numpy, within a memory budget.

The same scores as the torch path (`engine.scoring` with an exact faiss index): patch score =
mean distance to the k nearest bank rows, image score = the largest patch score (optionally
reweighted by Eq. 7), ensemble members z-normalised and averaged, maps upsampled bilinearly and
blurred. The query x bank distance matrix is computed in blocks of at most `budget_mb`, so
scoring against any bank needs the bank plus a fixed amount of memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..config import PatchCoreConfig
from ..data.resample import gaussian_blur, resize_bilinear
from ..engine.scoring import image_scores

DEFAULT_BUDGET_MB = 64.0


@dataclass
class Bank:
    """One member's bank rows (float32 or float16) with what search needs precomputed."""

    rows: np.ndarray  # M x D
    distance: str = "euclidean"
    norm: tuple[float, float] | None = None  # ensemble (mean, std)

    def __post_init__(self) -> None:
        self.sq_norms = np.zeros(len(self.rows), dtype=np.float32)
        self.scale = np.ones(len(self.rows), dtype=np.float32)  # 1 / ||row|| for cosine
        for a, b in _blocks(len(self.rows), 65536):
            block = self.rows[a:b].astype(np.float32)
            sq = np.einsum("ij,ij->i", block, block)
            self.sq_norms[a:b] = sq
            if self.distance == "cosine":
                self.scale[a:b] = 1.0 / np.maximum(np.sqrt(sq), 1e-12)


def _blocks(n: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, n)) for a in range(0, n, max(1, step))]


def _exact_distances(queries: np.ndarray, bank: Bank, idx: np.ndarray) -> np.ndarray:
    """Distances (Q x k) of queries to the bank rows idx (Q x k), recomputed from differences
    (no |q|^2 + |b|^2 - 2 q.b cancellation for near neighbours)."""
    q = queries.astype(np.float32)
    rows = bank.rows[idx].astype(np.float32)  # Q x k x D
    if bank.distance == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        rows = rows / np.maximum(np.linalg.norm(rows, axis=2, keepdims=True), 1e-12)
        return (1.0 - np.einsum("qkd,qd->qk", rows, q)).astype(np.float32)
    return np.sqrt(((rows - q[:, None, :]) ** 2).sum(axis=2)).astype(np.float32)


def knn(queries: np.ndarray, bank: Bank, k: int = 1, budget_mb: float = DEFAULT_BUDGET_MB
        ) -> tuple[np.ndarray, np.ndarray]:
    """Distances and indices (Q x k, nearest first) of each query's k nearest bank rows.

    Exact search over blocks: no distance block holds more than `budget_mb` of float32, so
    peak memory is the bank plus about 3 x budget_mb (block, partition, casted bank rows). The
    k best rows of each query are re-ranked by distances computed from differences.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    n, dim = len(bank.rows), max(q.shape[1], 1)
    k = min(k, n)
    budget = max(int(budget_mb * 2**20) // 4, 1024)  # float32 entries per distance block
    q_step = max(1, min(len(q), budget // 1024))
    b_step = max(k, min(budget // q_step, budget // dim))
    best_d = np.full((len(q), k), np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), k), dtype=np.int64)
    cosine = bank.distance == "cosine"
    # Blocks rank rows by a similarity, largest = nearest, in one pass over the block:
    # q.b - |b|^2 / 2 (euclidean: |q - b|^2 / -2 up to a per-query constant) or q.b / |b|.
    offset = np.float32(0.5) * bank.sq_norms
    for qa, qb in _blocks(len(q), q_step):
        qs = q[qa:qb]
        cand_s = np.full((qb - qa, k), -np.inf, dtype=np.float32)
        cand_i = best_i[qa:qb]
        for ba, bb in _blocks(n, b_step):
            sim = qs @ bank.rows[ba:bb].astype(np.float32, copy=False).T
            if cosine:
                sim *= bank.scale[ba:bb][None, :]
            else:
                sim -= offset[ba:bb][None, :]
            if k == 1:
                part = sim.argmax(axis=1)[:, None]
            elif sim.shape[1] > k:
                part = np.argpartition(sim, sim.shape[1] - k, axis=1)[:, -k:]
            else:
                part = np.broadcast_to(np.arange(sim.shape[1]), sim.shape)
            both_s = np.concatenate([cand_s, np.take_along_axis(sim, part, axis=1)], axis=1)
            both_i = np.concatenate([cand_i, part + ba], axis=1)
            keep = np.argsort(-both_s, axis=1, kind="stable")[:, :k]
            cand_s = np.take_along_axis(both_s, keep, axis=1)
            cand_i = np.take_along_axis(both_i, keep, axis=1)
        exact = np.concatenate([_exact_distances(q[qa + a : qa + b], bank, cand_i[a:b])
                                for a, b in _blocks(qb - qa, max(1, budget // (k * dim)))])
        order = np.argsort(exact, axis=1, kind="stable")
        best_d[qa:qb] = np.take_along_axis(exact, order, axis=1)
        best_i[qa:qb] = np.take_along_axis(cand_i, order, axis=1)
    return best_d, best_i


def member_scores(features: np.ndarray, bank: Bank, config: PatchCoreConfig,
                  budget_mb: float = DEFAULT_BUDGET_MB
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patch scores (V x h x w), nearest rows (V x h x w) and view scores (V) of one member's
    patch features (V x h x w x D)."""
    v, h, w, d = features.shape
    flat = features.reshape(-1, d)
    dist, idx = knn(flat, bank, config.anomaly_scorer_num_nn, budget_mb)
    scores = dist.mean(axis=1).reshape(v, h, w)
    nearest = idx[:, 0].reshape(v, h, w)
    reweight = config.reweight_neighbourhood if config.reweight else 0
    img = image_scores(scores, features, nearest, bank.rows, _Searcher(bank, budget_mb),
                       reweight)
    return scores, nearest, img


class _Searcher:
    """`knn` over one bank behind the `search(queries, k)` that `image_scores` calls."""

    def __init__(self, bank: Bank, budget_mb: float) -> None:
        self.bank = bank
        self.budget_mb = budget_mb

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return knn(queries, self.bank, k, self.budget_mb)


def score_views(features: Sequence[np.ndarray], banks: Sequence[Bank], config: PatchCoreConfig,
                budget_mb: float = DEFAULT_BUDGET_MB
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """View scores (V), maps (V x S x S), first member's patch scores and nearest rows, from
    every member's features of the same V views (ensembles: z-scores averaged)."""
    ensemble = len(banks) > 1
    total: np.ndarray | None = None
    first: tuple[np.ndarray, np.ndarray] | None = None
    view_total = np.zeros(len(features[0]), dtype=np.float32)
    for feats, bank in zip(features, banks, strict=True):
        ps, nearest, img = member_scores(feats, bank, config, budget_mb)
        if ensemble:
            assert bank.norm is not None
            mu, sd = bank.norm
            ps, img = (ps - mu) / sd, (img - mu) / sd
        if first is None:
            first = (ps, nearest)
            total = np.zeros_like(ps)
        assert total is not None
        if total.shape != ps.shape:
            ps = resize_bilinear(ps, total.shape[1:])
        total += ps / len(banks)
        view_total += img / len(banks)
    assert total is not None and first is not None
    maps = resize_bilinear(total, (config.imagesize, config.imagesize))
    if config.blur_sigma > 0:
        maps = gaussian_blur(maps, config.blur_sigma)
    return view_total, maps, first[0], first[1]
