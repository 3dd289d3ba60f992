"""Nearest-neighbour search against brute force; image scores, Eq. 7 and the blur."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from patchcore.engine.index import NearestNeighbourIndex
from patchcore.engine.scoring import anomaly_maps, gaussian_blur, image_scores, patch_scores


@pytest.mark.parametrize("k", [1, 3])
def test_euclidean_knn_matches_brute_force(k):
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(500, 20)), rng.normal(size=(50, 20))
    dist, idx = NearestNeighbourIndex("euclidean").add(bank).search(queries, k)
    full = np.linalg.norm(queries[:, None] - bank[None], axis=2)
    order = np.argsort(full, axis=1)[:, :k]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_allclose(dist, np.take_along_axis(full, order, 1), rtol=1e-4, atol=1e-4)


def test_cosine_knn_matches_brute_force():
    rng = np.random.default_rng(1)
    bank, queries = rng.normal(size=(300, 16)), rng.normal(size=(40, 16))
    dist, idx = NearestNeighbourIndex("cosine").add(bank).search(queries, 1)
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    cos = 1 - qn @ bn.T
    np.testing.assert_array_equal(idx[:, 0], cos.argmin(1))
    np.testing.assert_allclose(dist[:, 0], cos.min(1), atol=1e-5)


def test_approximate_index_finds_most_neighbours():
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(20000, 16)).astype(np.float32)
    queries = bank[:500] + 0.01
    for kind in ("ivf", "hnsw"):
        _, idx = NearestNeighbourIndex("euclidean", kind).add(bank).search(queries, 1)
        assert (idx[:, 0] == np.arange(500)).mean() > 0.9


def test_patch_and_image_scores():
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(200, 8)).astype(np.float32)
    index = NearestNeighbourIndex().add(bank)
    feats = rng.normal(size=(2, 4, 5, 8)).astype(np.float32)
    ps, nearest = patch_scores(index, feats, 1)
    brute = np.linalg.norm(feats[..., None, :] - bank, axis=-1)
    np.testing.assert_allclose(ps, brute.min(-1), rtol=1e-4)
    np.testing.assert_array_equal(nearest, brute.argmin(-1))
    np.testing.assert_allclose(image_scores(ps), ps.reshape(2, -1).max(1))
    # Eq. 7 by hand for image 0
    b = 3
    weighted = image_scores(ps, feats, nearest, bank, index, b)
    flat = ps[0].reshape(-1)
    p = flat.argmax()
    m_test = feats[0].reshape(-1, 8)[p]
    m_star = bank[nearest[0].reshape(-1)[p]]
    neigh = np.argsort(np.linalg.norm(bank - m_star, axis=1))[:b]
    d = np.linalg.norm(bank[neigh] - m_test, axis=1)
    expected = (1 - np.exp(flat[p]) / np.exp(d).sum()) * flat[p]
    assert weighted[0] == pytest.approx(expected, rel=1e-4)
    assert weighted[0] < flat[p]


@pytest.mark.parametrize("shape", [(2, 40, 50), (1, 10, 12)])
def test_blur_matches_scipy(shape):
    x = np.random.default_rng(4).random(shape).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(x), 4.0).numpy()
    ref = np.stack([ndi.gaussian_filter(m, 4.0) for m in x])
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_anomaly_map_peaks_where_the_patch_score_peaks():
    scores = np.zeros((1, 8, 8), dtype=np.float32)
    scores[0, 2, 6] = 5.0
    amap = anomaly_maps(scores, 64, 4.0)[0]
    r, c = np.unravel_index(amap.argmax(), amap.shape)
    assert 16 <= r < 24 and 48 <= c < 56
