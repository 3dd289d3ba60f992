"""Memory-bank subsampling: coreset samplers behind one `select(features, n, seed)` signature."""

from __future__ import annotations

import logging
import math
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ConfigError

log = logging.getLogger(__name__)

CHUNK = 65536  # rows per chunk when streaming features (they may be a disk-backed memmap)


class Sampler(Protocol):
    """Chooses `n` rows of an N x D feature array; returns their indices (int64, ascending)."""

    def select(self, features: np.ndarray, n: int, seed: int) -> np.ndarray: ...


class IdentitySampler:
    """Keeps every patch."""

    def select(self, features: np.ndarray, n: int, seed: int) -> np.ndarray:
        return np.arange(len(features), dtype=np.int64)


class RandomSampler:
    """Uniform random subset."""

    def select(self, features: np.ndarray, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(len(features), size=n, replace=False)).astype(np.int64)


def random_projection(features: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Project N x D features to N x dim with a seeded Gaussian matrix, streaming in chunks."""
    d = features.shape[1]
    if dim >= d:
        return np.ascontiguousarray(features, dtype=np.float32)
    rng = np.random.default_rng(seed)
    matrix = (rng.standard_normal((d, dim)) / math.sqrt(dim)).astype(np.float32)
    out = np.empty((len(features), dim), dtype=np.float32)
    for start in range(0, len(features), CHUNK):
        chunk = np.asarray(features[start : start + CHUNK], np.float32)
        out[start : start + CHUNK] = chunk @ matrix
    return out


def _sq_dist_to(points: np.ndarray, sq_norms: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.maximum(sq_norms + float(x @ x) - 2.0 * (points @ x), 0.0)


class _Blocks:
    """Points grouped into compact blocks with a centre and radius each (for pruning)."""

    def __init__(self, x: np.ndarray, seed: int, block_size: int = 64) -> None:
        import faiss

        n, d = x.shape
        k = max(1, min(n // block_size, 4096))
        if k > 1:
            km = faiss.Kmeans(d, k, niter=8, seed=seed % (2**31), max_points_per_centroid=64)
            km.train(x)
            _, assign = km.index.search(x, 1)
            assign = assign[:, 0]
        else:
            assign = np.zeros(n, dtype=np.int64)
        order = np.argsort(assign, kind="stable")
        sizes = np.bincount(assign, minlength=k)
        keep = sizes > 0
        self.order = order
        self.sizes = sizes[keep]
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.x = np.ascontiguousarray(x[order])
        self.sq = np.einsum("ij,ij->i", self.x, self.x)
        self.centres = np.add.reduceat(self.x, self.starts, axis=0) / self.sizes[:, None]
        dist = np.sqrt(np.maximum(
            self.sq - 2 * np.einsum("ij,ij->i", self.x, np.repeat(self.centres, self.sizes, 0))
            + np.repeat(np.einsum("ij,ij->i", self.centres, self.centres), self.sizes), 0.0))
        # Slack keeps the triangle-inequality test conservative under float rounding.
        self.radius = np.maximum.reduceat(dist, self.starts) * (1 + 1e-4) + 1e-6


def greedy_k_center(
    x: np.ndarray,
    n: int,
    min_sq: np.ndarray | None = None,
    seed: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Greedy farthest-point selection of `n` rows of x (N x d, float32).

    Each step picks the point farthest from everything chosen so far (ties: lowest index) and
    lowers every point's distance-to-chosen. `min_sq` gives initial squared distances (default:
    +inf, so the first pick is row 0 of a seeded random order). On CPU the update skips blocks of
    points that the triangle inequality proves cannot get closer, which yields exactly the same
    picks as the plain loop at a fraction of the work; PatchCore's fit time is dominated by this
    loop, which is why it is hand-written.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    total = len(x)
    if n >= total:
        return np.arange(total, dtype=np.int64)
    if min_sq is None:
        min_sq = np.full(total, np.inf, dtype=np.float32)
        first = int(np.random.default_rng(seed).integers(total))
        min_sq[first] = np.float32(np.finfo(np.float32).max)  # forces the first pick
    blocks = _Blocks(x, seed)
    cur = np.asarray(min_sq, dtype=np.float32)[blocks.order].copy()
    block_max = np.maximum.reduceat(cur, blocks.starts)
    chosen = np.empty(n, dtype=np.int64)
    bar = tqdm(total=n, desc="coreset", unit="pt", disable=not progress, leave=False, mininterval=1)
    for step in range(n):
        b = int(np.argmax(block_max))
        s, e = blocks.starts[b], blocks.starts[b] + blocks.sizes[b]
        p = s + int(np.argmax(cur[s:e]))
        chosen[step] = p
        xp = blocks.x[p]
        dc = np.sqrt(np.maximum(((blocks.centres - xp) ** 2).sum(1), 0.0))
        lower = dc - blocks.radius
        active = (lower <= 0) | (lower * lower < block_max)
        pts_mask = np.repeat(active, blocks.sizes)
        pts = np.flatnonzero(pts_mask)
        d2 = _sq_dist_to(blocks.x[pts], blocks.sq[pts], xp).astype(np.float32)
        cur[pts] = np.minimum(cur[pts], d2)
        cur[p] = 0.0
        seg = np.concatenate([[0], np.cumsum(blocks.sizes[active])[:-1]])
        block_max[active] = np.maximum.reduceat(cur[pts], seg)
        if step % 256 == 0:
            bar.update(min(256, n - step))
    bar.close()
    return np.sort(blocks.order[chosen])


def greedy_k_center_dense(
    x: torch.Tensor, n: int, min_sq: torch.Tensor | None = None, seed: int = 0
) -> np.ndarray:
    """The plain greedy loop on a torch device (used on GPU, and as the reference in tests)."""
    total = len(x)
    if n >= total:
        return np.arange(total, dtype=np.int64)
    sq = (x * x).sum(1)
    if min_sq is None:
        min_sq = torch.full((total,), float("inf"), device=x.device)
        first = int(np.random.default_rng(seed).integers(total))
        min_sq[first] = torch.finfo(torch.float32).max
    cur = min_sq.clone().float()
    chosen = torch.empty(n, dtype=torch.long, device=x.device)
    for step in range(n):
        p = torch.argmax(cur)
        chosen[step] = p
        d2 = (sq + sq[p] - 2.0 * (x @ x[p])).clamp_min(0)
        cur = torch.minimum(cur, d2)
        cur[p] = 0.0
    return np.sort(chosen.cpu().numpy())


class GreedyCoresetSampler:
    """Exact greedy coreset (Gonzalez k-center) on the full-dimensional features."""

    def __init__(self, device: str | torch.device = "cpu", progress: bool = True) -> None:
        self.device = torch.device(device)
        self.progress = progress

    def select(self, features: np.ndarray, n: int, seed: int) -> np.ndarray:
        x = np.ascontiguousarray(features, dtype=np.float32)
        if self.device.type == "cuda":
            return greedy_k_center_dense(torch.from_numpy(x).to(self.device), n, seed=seed)
        return greedy_k_center(x, n, seed=seed, progress=self.progress)


class ApproximateGreedyCoresetSampler:
    """PatchCore's default: greedy coreset on randomly projected features.

    Features are projected to `projection_dim`; every point starts at its mean distance to
    `num_starting_points` random points (as in the reference implementation), then the greedy
    loop picks `n` points.
    """

    def __init__(
        self,
        projection_dim: int = 128,
        num_starting_points: int = 10,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> None:
        self.projection_dim = projection_dim
        self.num_starting_points = num_starting_points
        self.device = torch.device(device)
        self.progress = progress

    def initial_distances(self, x: np.ndarray, seed: int) -> np.ndarray:
        """Squared mean distance of every point to the random starting points."""
        rng = np.random.default_rng(seed)
        k = min(self.num_starting_points, len(x))
        starts = x[rng.choice(len(x), size=k, replace=False)]
        sq = np.einsum("ij,ij->i", x, x)
        mean = np.zeros(len(x), dtype=np.float64)
        for s in starts:
            mean += np.sqrt(_sq_dist_to(x, sq, s))
        return ((mean / k) ** 2).astype(np.float32)

    def project(self, features: np.ndarray, seed: int) -> np.ndarray:
        """The random projection used for selection."""
        return random_projection(features, self.projection_dim, seed)

    def select(self, features: np.ndarray, n: int, seed: int) -> np.ndarray:
        x = self.project(features, seed)
        init = self.initial_distances(x, seed)
        if self.device.type == "cuda":
            t = torch.from_numpy(x).to(self.device)
            return greedy_k_center_dense(t, n, torch.from_numpy(init).to(self.device), seed)
        return greedy_k_center(x, n, init, seed, progress=self.progress)


def get_sampler(
    name: str,
    projection_dim: int = 128,
    num_starting_points: int = 10,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Sampler:
    """The sampler registered under `name`."""
    if name == "approx_greedy_coreset":
        return ApproximateGreedyCoresetSampler(
            projection_dim, num_starting_points, device, progress
        )
    if name == "greedy_coreset":
        return GreedyCoresetSampler(device, progress)
    if name == "random":
        return RandomSampler()
    if name == "identity":
        return IdentitySampler()
    raise ConfigError(f"unknown sampler {name!r}")


def coverage_radius(features: np.ndarray, selected: np.ndarray) -> float:
    """Max over all points of the distance to the nearest selected point (lower is better)."""
    import faiss

    x = np.ascontiguousarray(features, dtype=np.float32)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x[selected])
    d, _ = index.search(x, 1)
    return float(np.sqrt(max(d.max(), 0.0)))
