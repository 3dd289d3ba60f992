"""Memory-bank subsampling: coreset samplers behind one `select(features, n, seed)` signature."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError

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
    matrix = torch.from_numpy((rng.standard_normal((d, dim)) / math.sqrt(dim)).astype(np.float32))
    out = np.empty((len(features), dim), dtype=np.float32)
    for start in range(0, len(features), CHUNK):
        chunk = torch.from_numpy(np.asarray(features[start : start + CHUNK], np.float32))
        out[start : start + CHUNK] = (chunk @ matrix).numpy()
    return out


def _sq_dist_to(points: np.ndarray, sq_norms: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.maximum(sq_norms + float(x @ x) - 2.0 * (points @ x), 0.0)


def greedy_k_center(
    x: np.ndarray | torch.Tensor,
    n: int,
    min_sq: np.ndarray | torch.Tensor | None = None,
    seed: int = 0,
    progress: bool = True,
    candidates: int = 512,
    chunk: int = 65536,
) -> np.ndarray:
    """Greedy farthest-point selection of `n` rows of x (N x d), in batches of exact picks.

    Plain greedy picks the point farthest from everything chosen so far, then lowers every
    point's distance-to-chosen: one full pass over the data per pick, memory-bound. Here each
    round takes the `candidates` farthest points, replays the greedy loop among them (a small
    K x K problem) for as long as the next pick provably is the global one (its value still
    exceeds every value outside the candidate set, which can only shrink), then updates all
    points against the whole round's picks with one matrix product. The picks are those of the
    plain loop (up to float ties) at a fraction of the passes over the data; coreset selection
    dominates PatchCore's fit time, which is why this is hand-written. Runs on x's device.
    `min_sq` gives initial squared distances (default: a seeded random first pick).
    """
    X = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)) if isinstance(
        x, np.ndarray) else x.float()
    total = len(X)
    if n >= total:
        return np.arange(total, dtype=np.int64)
    if min_sq is None:
        cur = torch.full((total,), torch.finfo(torch.float32).max, device=X.device)
        first = int(np.random.default_rng(seed).integers(total))
        cur[first] = float("inf")  # forces the first pick
    else:
        cur = torch.as_tensor(min_sq, dtype=torch.float32, device=X.device).clone()
    sq = (X * X).sum(1)
    chosen: list[int] = []
    k = min(candidates, total)
    bar = tqdm(total=n, desc="coreset", unit="pt", disable=not progress, leave=False,
               mininterval=1)
    while len(chosen) < n:
        vals, cand = torch.topk(cur, k)
        outside = vals[-1] if k < total else torch.tensor(float("-inf"), device=X.device)
        c = X[cand]
        sq_c = sq[cand]
        pair = (sq_c[:, None] + sq_c[None, :] - 2.0 * (c @ c.T)).clamp_min_(0)
        values = vals.clone()
        picked: list[int] = []
        while len(chosen) + len(picked) < n:
            j = int(torch.argmax(values))
            if picked and not bool(values[j] > outside):
                break  # a point outside the candidates might be the true next pick
            picked.append(j)
            values = torch.minimum(values, pair[j])
            values[j] = float("-inf")
        a, sq_a = c[picked], sq_c[picked]
        for s in range(0, total, chunk):
            # min_j |x - a_j|^2 = |x|^2 + min_j (|a_j|^2 - 2 x.a_j): one fused pass over x @ a.T.
            part = torch.addmm(sq_a[None, :], X[s : s + chunk], a.T, alpha=-2.0).amin(dim=1)
            part += sq[s : s + chunk]
            torch.minimum(cur[s : s + chunk], part.clamp_min_(0), out=cur[s : s + chunk])
        rows = cand[picked]
        cur[rows] = 0.0
        chosen.extend(rows.tolist())
        bar.update(len(picked))
    bar.close()
    return np.sort(np.asarray(chosen, dtype=np.int64))


class GreedyCoresetSampler:
    """Exact greedy coreset (Gonzalez k-center) on the full-dimensional features."""

    def __init__(self, device: str | torch.device = "cpu", progress: bool = True) -> None:
        self.device = torch.device(device)
        self.progress = progress

    def select(self, features: np.ndarray, n: int, seed: int) -> np.ndarray:
        if getattr(features, "on_disk", False):
            log.warning("greedy_coreset works on all %d x %d features in memory, past "
                        "--max-memory; approx_greedy_coreset streams them", *features.shape)
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(self.device)
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
        t = torch.from_numpy(x).to(self.device)
        init_t = torch.from_numpy(init).to(self.device)
        return greedy_k_center(t, n, init_t, seed, progress=self.progress)


# The registry: name -> factory(projection_dim, num_starting_points, device, progress).
SAMPLERS: dict[str, Callable[[int, int, str | torch.device, bool], Sampler]] = {
    "approx_greedy_coreset": ApproximateGreedyCoresetSampler,
    "greedy_coreset": lambda _p, _s, device, progress: GreedyCoresetSampler(device, progress),
    "random": lambda *_: RandomSampler(),
    "identity": lambda *_: IdentitySampler(),
}


def get_sampler(
    name: str,
    projection_dim: int = 128,
    num_starting_points: int = 10,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Sampler:
    """The sampler registered under `name`."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](projection_dim, num_starting_points, device, progress)


def coverage_radius(features: np.ndarray, selected: np.ndarray) -> float:
    """Max over all points of the distance to the nearest selected point (lower is better)."""
    import faiss

    x = np.ascontiguousarray(features, dtype=np.float32)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x[selected])
    d, _ = index.search(x, 1)
    return float(np.sqrt(max(d.max(), 0.0)))
