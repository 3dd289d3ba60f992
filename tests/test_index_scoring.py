"""Nearest-neighbour search against brute force; image scores, Eq. 7 and the blur."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from patchcore.engine.index import NearestNeighbourIndex
from patchcore.engine.scoring import anomaly_maps, image_scores, patch_scores


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
def test_blur_is_per_map_and_matches_scipy(shape):
    # Square maps at their own size: no upsampling, so anomaly_maps is the blur alone; each map
    # is blurred on its own (never across the batch axis).
    x = np.random.default_rng(4).random((shape[0], shape[1], shape[1])).astype(np.float32)
    ours = anomaly_maps(x, shape[1], 4.0)
    ref = np.stack([ndi.gaussian_filter(m, 4.0) for m in x])
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_anomaly_map_peaks_where_the_patch_score_peaks():
    scores = np.zeros((1, 8, 8), dtype=np.float32)
    scores[0, 2, 6] = 5.0
    amap = anomaly_maps(scores, 64, 4.0)[0]
    r, c = np.unravel_index(amap.argmax(), amap.shape)
    assert 16 <= r < 24 and 48 <= c < 56


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_patch_score_is_the_mean_of_the_k_nearest(distance):
    rng = np.random.default_rng(5)
    bank = rng.normal(size=(150, 6)).astype(np.float32)
    feats = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
    index = NearestNeighbourIndex(distance).add(bank)
    ps, nearest = patch_scores(index, feats, k=3)
    q = feats.reshape(-1, 6).astype(np.float64)
    b = bank.astype(np.float64)
    if distance == "euclidean":
        full = np.sqrt(((q[:, None, :] - b[None]) ** 2).sum(axis=2))
    else:
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        full = 1.0 - qn @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    three = np.sort(full, axis=1)[:, :3]
    assert not np.allclose(three.mean(axis=1), three[:, -1])  # k-th != mean: the test can tell
    np.testing.assert_allclose(ps.reshape(-1), three.mean(axis=1), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(nearest.reshape(-1), full.argmin(axis=1))
    assert ps.shape == nearest.shape == (2, 3, 4)


def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """n_out x n_in weights of bilinear resampling with half-pixel centres, edges clamped."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
        lo = int(np.floor(src))
        hi = min(lo + 1, n_in - 1)
        m[i, lo] += 1.0 - (src - lo)
        m[i, hi] += src - lo
    return m


@pytest.mark.parametrize("sigma", [0.0, 4.0])
@pytest.mark.parametrize("grid", [(7, 7), (5, 8)])
def test_anomaly_maps_equal_an_independent_bilinear_upsampling(sigma, grid):
    h, w = grid
    scores = np.random.default_rng(6).random((2, h, w)).astype(np.float32)
    size = 56
    rows, cols = _bilinear_matrix(size, h), _bilinear_matrix(size, w)
    expected = np.stack([rows @ s.astype(np.float64) @ cols.T for s in scores])
    if sigma:
        expected = np.stack([ndi.gaussian_filter(m, sigma) for m in expected])
    np.testing.assert_allclose(anomaly_maps(scores, size, sigma), expected, atol=1e-5)
    # Cross-check of the reference itself: scipy's zoom with pixel-area (grid mode) geometry.
    zoomed = ndi.zoom(scores[0].astype(np.float64), (size / h, size / w), order=1,
                      grid_mode=True, mode="nearest")
    np.testing.assert_allclose(rows @ scores[0] @ cols.T, zoomed, atol=1e-6)


def test_search_threads_cover_the_blas_inside_faiss():
    import faiss
    from threadpoolctl import threadpool_info

    from patchcore.engine.index import set_search_threads

    def faiss_blas_threads():
        return {i["num_threads"] for i in threadpool_info()
                if i["user_api"] == "blas" and "faiss" in i["filepath"]}

    before = faiss.omp_get_max_threads()
    try:
        set_search_threads(1)
        assert faiss.omp_get_max_threads() == 1
        assert faiss_blas_threads() in ({1}, set())  # set(): a faiss build without its own BLAS
        set_search_threads(2)
        assert faiss.omp_get_max_threads() == 2 and faiss_blas_threads() in ({2}, set())
    finally:
        set_search_threads(before)


@pytest.mark.parametrize("seed", range(12))
def test_exact_search_equals_faiss_flat_and_float64(seed):
    import faiss

    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(8, 3000)), int(rng.integers(1, 200))
    bank = np.abs(rng.standard_normal((n, d))).astype(np.float32) * 10
    if seed % 3 == 0:  # exact ties: the second half repeats the first
        bank[n - n // 2 :] = bank[: n // 2]
    queries = np.concatenate([np.abs(rng.standard_normal((50, d))) * 10, bank[:5]]
                             ).astype(np.float32)
    k = int(rng.integers(1, 5))
    exclude = (int(rng.integers(0, n // 3)), int(rng.integers(n // 3, n // 2))) if seed % 2 \
        else None
    dist, idx = NearestNeighbourIndex("euclidean").add(bank).search(queries, k, exclude)
    flat = faiss.IndexFlatL2(d)
    flat.add(bank)
    params = None if exclude is None else faiss.SearchParameters(
        sel=faiss.IDSelectorNot(faiss.IDSelectorRange(*exclude)))
    ref_sq, _ = flat.search(queries, k, params=params)
    np.testing.assert_allclose(dist, np.sqrt(np.maximum(ref_sq, 0)), rtol=1e-4, atol=1e-2)
    # Float64 brute force: the same distances, and the very same rows wherever neighbouring
    # distances are not (near-)ties; among tied rows any may come back, at the tied distance.
    exact = ((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2
             ).sum(-1)
    if exclude is not None:
        exact[:, exclude[0] : exclude[1]] = np.inf
    order = np.lexsort((np.broadcast_to(np.arange(n), exact.shape), exact), axis=1)
    ref = np.take_along_axis(exact, order[:, : k + 1], 1)
    np.testing.assert_allclose(dist ** 2, ref[:, :k], rtol=1e-5, atol=1e-4)
    assert (dist[-5:, 0] == 0).all() or exclude is not None  # bank rows find themselves
    np.testing.assert_allclose(np.take_along_axis(exact, idx, 1), ref[:, :k], rtol=1e-5,
                               atol=1e-4)
    gaps = np.diff(ref, axis=1)
    clear = gaps > 1e-3 * np.maximum(ref[:, 1:], 1)
    for i in range(len(queries)):
        for j in range(k):
            if clear[i, j] and (j == 0 or clear[i, j - 1]):
                assert idx[i, j] == order[i, j], (i, j)


def test_exact_search_chunks_give_the_same_result(monkeypatch):
    from patchcore.engine.index import ExactSearch

    rng = np.random.default_rng(0)
    bank = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((300, 16)).astype(np.float32)
    whole = NearestNeighbourIndex().add(bank).search(queries, 3)
    monkeypatch.setattr(ExactSearch, "CHUNK_FLOATS", 500 * 7)  # 7 queries per chunk
    chunked = NearestNeighbourIndex().add(bank).search(queries, 3)
    np.testing.assert_array_equal(whole[1], chunked[1])
    np.testing.assert_allclose(whole[0], chunked[0], rtol=1e-6)
