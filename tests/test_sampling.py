"""Coreset samplers: coverage, equality of the batched loop with the plain one, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchcore.engine.sampling import (
    ApproximateGreedyCoresetSampler,
    GreedyCoresetSampler,
    RandomSampler,
    coverage_radius,
    get_sampler,
    greedy_k_center,
    greedy_k_center_dense,
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
