"""Coreset samplers: coverage, equality of the batched loop with the plain one, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_patchcore import greedy_k_center_dense

from patchcore.engine.sampling import (
    ApproximateGreedyCoresetSampler,
    GreedyCoresetSampler,
    RandomSampler,
    coverage_radius,
    get_sampler,
    greedy_k_center,
)


def _clustered(n=3000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, d)) * 4
    return (centres[rng.integers(0, 40, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_greedy_covers_better_than_random():
    x = _clustered()
    n = 150
    greedy = GreedyCoresetSampler(progress=False).select(x, n, seed=0)
    rand = RandomSampler().select(x, n, seed=0)
    assert len(greedy) == len(rand) == n
    assert coverage_radius(x, greedy) <= coverage_radius(x, rand)


@pytest.mark.parametrize("with_init", [True, False])
def test_batched_loop_picks_exactly_what_the_plain_loop_picks(with_init):
    x = _clustered(4000, 16, seed=3)
    init = ApproximateGreedyCoresetSampler(progress=False).initial_distances(x, 0)
    fast = greedy_k_center(x, 400, init if with_init else None, seed=2, progress=False,
                           candidates=64)
    plain = greedy_k_center_dense(torch.from_numpy(x), 400,
                                  torch.from_numpy(init) if with_init else None, seed=2)
    np.testing.assert_array_equal(fast, plain)


def test_approximate_and_exact_agree_on_small_data():
    x = _clustered(2000, 24, seed=5)
    exact = GreedyCoresetSampler(progress=False).select(x, 200, seed=0)
    approx = ApproximateGreedyCoresetSampler(projection_dim=16, progress=False).select(
        x, 200, seed=0)
    r_exact, r_approx = coverage_radius(x, exact), coverage_radius(x, approx)
    r_random = coverage_radius(x, RandomSampler().select(x, 200, seed=0))
    assert r_approx <= 1.35 * r_exact
    assert r_approx < r_random


def test_samplers_are_deterministic_and_sized():
    x = _clustered(1000, 8)
    for name in ("approx_greedy_coreset", "greedy_coreset", "random"):
        s = get_sampler(name, progress=False)
        a, b = s.select(x, 100, seed=7), s.select(x, 100, seed=7)
        np.testing.assert_array_equal(a, b)
        assert len(np.unique(a)) == 100 and a.min() >= 0 and a.max() < 1000
    assert len(get_sampler("identity").select(x, 5, 0)) == 1000


# -- independent references ------------------------------------------------------------------


def _numpy_greedy(x: np.ndarray, n: int, init_sq: np.ndarray) -> np.ndarray:
    """Textbook farthest-point loop in float64: pick the farthest point, lower every distance."""
    x = x.astype(np.float64)
    cur = init_sq.astype(np.float64).copy()
    picks = []
    for _ in range(n):
        p = int(np.argmax(cur))
        picks.append(p)
        cur = np.minimum(cur, ((x - x[p]) ** 2).sum(axis=1))
        cur[p] = 0.0
    return np.sort(np.asarray(picks, dtype=np.int64))


def _mean_distance_to_all(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2))
    return d.mean(axis=1)


def test_starting_distances_are_the_squared_mean_euclidean_distance():
    # With as many starting points as rows every row is a starting point, whatever the seeded
    # choice: the start distance is (mean over all rows of the euclidean distance) squared.
    x = np.random.default_rng(11).normal(size=(120, 6)).astype(np.float32) * 3
    sampler = ApproximateGreedyCoresetSampler(num_starting_points=120, progress=False)
    init = sampler.initial_distances(x, seed=4)
    np.testing.assert_allclose(init, _mean_distance_to_all(x) ** 2, rtol=2e-5)


def test_starting_distances_with_few_starting_points():
    # k < N: sqrt(init) of each row is its mean euclidean distance to k rows of x. A matrix of
    # euclidean distances between distinct points is invertible, so solving D w = k sqrt(init)
    # must give the indicator vector of the k starting rows.
    x = np.random.default_rng(12).normal(size=(40, 3)).astype(np.float32)
    k = 4
    sampler = ApproximateGreedyCoresetSampler(num_starting_points=k, progress=False)
    init = sampler.initial_distances(x, seed=1).astype(np.float64)
    d = np.sqrt(((x[:, None, :].astype(np.float64) - x[None]) ** 2).sum(axis=2))
    w = np.linalg.solve(d, k * np.sqrt(init))
    assert np.sort(w)[-k:] == pytest.approx(np.ones(k), abs=1e-3)
    assert np.sort(w)[:-k] == pytest.approx(np.zeros(len(x) - k), abs=1e-3)


def test_approximate_sampler_picks_what_a_plain_greedy_picks():
    # projection_dim >= D keeps the features as they are, so the whole selection can be
    # restated: independent start distances, then the textbook loop.
    rng = np.random.default_rng(13)
    x = (rng.normal(size=(600, 8)) * rng.uniform(0.5, 3, size=(600, 1))).astype(np.float32)
    sampler = ApproximateGreedyCoresetSampler(projection_dim=8, num_starting_points=600,
                                              progress=False)
    picks = sampler.select(x, 60, seed=3)
    np.testing.assert_array_equal(picks, _numpy_greedy(x, 60, _mean_distance_to_all(x) ** 2))


@pytest.mark.parametrize("chunk", [97, 1000])
@pytest.mark.parametrize("with_init", [True, False])
def test_chunked_update_matches_plain_loop_and_numpy(chunk, with_init):
    # The production chunk is 65,536 rows; a small chunk exercises the same slicing on small data.
    x = _clustered(2500, 12, seed=7)
    init = (np.random.default_rng(1).uniform(50, 60, len(x)).astype(np.float32)
            if with_init else None)
    fast = greedy_k_center(x, 150, init, seed=5, progress=False, candidates=32, chunk=chunk)
    plain = greedy_k_center_dense(torch.from_numpy(x), 150,
                                  torch.from_numpy(init) if with_init else None, seed=5)
    np.testing.assert_array_equal(fast, plain)
    if with_init:
        np.testing.assert_array_equal(fast, _numpy_greedy(x, 150, init))


def test_greedy_past_one_default_chunk():
    # More rows than one 65,536-row chunk, low dimension to stay fast; the spread grows with the
    # row number so that the farthest points, and the picks, lie beyond the first chunk.
    n_rows = 70_000
    rng = np.random.default_rng(17)
    scale = np.linspace(0.5, 4.0, n_rows, dtype=np.float32)[:, None]
    x = (rng.normal(size=(n_rows, 4)).astype(np.float32) * scale)
    init = np.full(n_rows, 1e6, dtype=np.float32)
    init[-1] = 1e7  # the first pick: the last row
    fast = greedy_k_center(x, 24, init, progress=False, candidates=8)
    assert (fast >= 65_536).sum() >= 3, "the test needs picks beyond the first chunk"
    np.testing.assert_array_equal(fast, _numpy_greedy(x, 24, init))
