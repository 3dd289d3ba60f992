"""The bfloat16 shortlist + exact re-rank returns the true nearest bank row, whatever the data."""

from __future__ import annotations

import numpy as np
import pytest

from patchcore.engine import shortlist
from patchcore.engine.index import ExactSearch, NearestNeighbourIndex


def _data(seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Bank and queries of one of four kinds, chosen to stress the error bound."""
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(40, 2500)), int(rng.integers(2, 300))
    kind = ["gaussian", "clusters", "large_norms", "duplicates"][seed % 4]
    if kind == "gaussian":
        bank = rng.standard_normal((n, d)) * rng.uniform(0.01, 100)
        queries = rng.standard_normal((97, d)) * bank.std()
    elif kind == "clusters":  # several rows at nearly the same distance from each query
        centres = rng.standard_normal((20, d))
        bank = centres[rng.integers(0, 20, n)] + rng.standard_normal((n, d)) * 0.3
        queries = centres[rng.integers(0, 20, 97)] + rng.standard_normal((97, d)) * 0.3
    elif kind == "large_norms":  # norms dwarf the distances: one bfloat16 product is too coarse
        scale = rng.uniform(1, 1000, (n, 1))
        bank = rng.standard_normal((n, d)) * scale
        queries = bank[rng.integers(0, n, 97)] + rng.standard_normal((97, d)) * 0.01
    else:  # exact ties: the second half repeats the first; queries include bank rows
        bank = np.abs(rng.standard_normal((n, d))) * 10
        bank[n - n // 2 :] = bank[: n // 2]
        queries = np.concatenate([np.abs(rng.standard_normal((90, d))) * 10,
                                  bank[n - 7 :]])
    return bank.astype(np.float32), queries.astype(np.float32), kind


def _truth(bank: np.ndarray, queries: np.ndarray, cosine: bool,
           exclude: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Float64 brute force: best value per query and the lowest row index attaining it."""
    score = (queries.astype(np.float64) @ bank.astype(np.float64).T if cosine
             else _all_scores(bank, queries))
    if exclude is not None:
        score[:, exclude[0] : exclude[1]] = -np.inf
    best = score.max(1)
    return best, np.argmax(score == best[:, None], axis=1)


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("seed", range(16))
def test_shortlist_returns_the_true_nearest_row(monkeypatch, seed, cosine):
    monkeypatch.setattr(ExactSearch, "SHORTLIST", "on")
    bank, queries, kind = _data(seed)
    if cosine:
        bank /= np.linalg.norm(bank, axis=1, keepdims=True)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exclude = (len(bank) // 5, len(bank) // 3) if seed % 3 == 1 else None
    search = ExactSearch(bank, cosine, "cpu")
    value, index = search.search(queries, 1, exclude)
    assert search.shortlist is not None  # answered by the shortlist, not the float32 fallback
    best, want = _truth(bank, queries, cosine, exclude)
    np.testing.assert_array_equal(index[:, 0], want)
    if cosine:
        np.testing.assert_allclose(value[:, 0], best, rtol=1e-6, atol=1e-7)
    else:  # centred rows: the same squared distances up to float32 rounding of the centring
        np.testing.assert_allclose(value[:, 0], -best, rtol=1e-5, atol=1e-5 * bank.std() ** 2)
    if kind == "duplicates" and exclude is None and not cosine:
        assert (value[-7:, 0] == 0).all()  # a bank row finds itself (its first copy) at 0


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_near_ties_below_every_rounding_error(monkeypatch, seed, cosine):
    """Each query has two bank rows at distances equal to ~1e-7 (relative): far below the
    bfloat16 product's error and near float32's, so only a complete window and an exact
    re-rank return the true nearest row every time."""
    monkeypatch.setattr(ExactSearch, "SHORTLIST", "on")
    rng = np.random.default_rng(seed)
    d, nq = 64, 300
    queries = rng.standard_normal((nq, d)) * 3 + 5
    pairs = []
    for gap in (1.0, 1.0 + 1e-7):
        step = rng.standard_normal((nq, d))
        step *= 2 * gap / np.linalg.norm(step, axis=1, keepdims=True)
        pairs.append(queries + step)
    bank = np.concatenate([*pairs, rng.standard_normal((1500, d)) * 3 + 5])
    bank = bank[rng.permutation(len(bank))].astype(np.float32)
    queries = queries.astype(np.float32)
    if cosine:
        bank /= np.linalg.norm(bank, axis=1, keepdims=True)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    search = ExactSearch(bank, cosine, "cpu")
    value, index = search.search(queries, 1, None)
    assert search.shortlist is not None
    best, want = _truth(bank, queries, cosine, None)
    np.testing.assert_array_equal(index[:, 0], want)


@pytest.mark.parametrize("seed", range(4))
def test_far_clusters_need_one_product(monkeypatch, seed):
    """Two clusters far from the mean (norms 100x the distances): the triangle-inequality
    window still shortlists from one bfloat16 product, exactly."""
    monkeypatch.setattr(ExactSearch, "SHORTLIST", "on")
    _searched_once(*_far_clusters(seed), cosine=False, misses={1: 0, 3: 0})


def _searched_once(bank: np.ndarray, queries: np.ndarray, cosine: bool,
                   misses: dict[int, int]) -> tuple[ExactSearch, np.ndarray]:
    """A shortlisted search of `queries`: its misses as given, its rows and values the brute
    force's; the search and the true rows."""
    search = ExactSearch(bank, cosine, "cpu")
    value, index = search.search(queries, 1, None)
    assert search.shortlist is not None and search.shortlist.misses == misses
    best, want = _truth(bank, queries, cosine, None)
    np.testing.assert_array_equal(index[:, 0], want)
    np.testing.assert_allclose(value[:, 0], best if cosine else -best, rtol=1e-5)
    return search, want


@pytest.mark.parametrize("seed", range(4))
def test_three_products_when_one_cannot_tell_the_rows_apart(monkeypatch, seed):
    """Nearly parallel unit rows (cosine): one bfloat16 product cannot tell a cluster's rows
    apart, so the shortlist refines itself to three products and stays exact."""
    monkeypatch.setattr(ExactSearch, "SHORTLIST", "on")
    bank, queries = _parallel_rows(seed)
    search, want = _searched_once(bank, queries, cosine=True, misses={1: 1, 3: 0})
    for _ in range(shortlist.STREAK - 1):  # one product keeps failing: begin with three
        search.search(queries, 1, None)
    assert search.shortlist.start == 3
    np.testing.assert_array_equal(search.search(queries, 1, None)[1][:, 0], want)


@pytest.mark.parametrize("seed", range(4))
def test_rounding_offsets_cannot_hide_the_nearest_row(monkeypatch, seed):
    """Rows on a line (values 100-200, bfloat16 spacing 0.5-1): each query has two rows 0.1
    away on either side, nearer than the rest, whose bfloat16 roundings can put either one
    first; only a window that adds the rounding offsets keeps the true nearest row."""
    monkeypatch.setattr(ExactSearch, "SHORTLIST", "on")
    rng = np.random.default_rng(seed)
    bank = np.zeros((800, 4))
    bank[:200, 0] = rng.uniform(100, 200, 200)
    queries = np.zeros((300, 4))
    queries[:, 0] = rng.uniform(100, 200, 300)
    bank[200::2, 0] = queries[:, 0] - 0.1
    bank[201::2, 0] = queries[:, 0] + 0.1
    _searched_once(bank.astype(np.float32), queries.astype(np.float32), cosine=False,
                   misses={1: 0, 3: 0})


def test_shortlist_matches_the_float32_search_on_patch_like_features(monkeypatch):
    """Where the float32 search has no near-ties, both paths return the same rows."""
    rng = np.random.default_rng(7)
    bank = np.maximum(rng.standard_normal((3000, 168)), 0).astype(np.float32)
    queries = np.maximum(rng.standard_normal((784, 168)), 0).astype(np.float32)
    monkeypatch.setattr(ExactSearch, "SHORTLIST", "off")
    plain = NearestNeighbourIndex().add(bank).search(queries, 1)
    monkeypatch.setattr(ExactSearch, "SHORTLIST", "on")
    index = NearestNeighbourIndex().add(bank)
    fast = index.search(queries, 1)
    assert index._index.shortlist is not None and list(index._index.shortlist.forms) == [1]
    np.testing.assert_array_equal(fast[1], plain[1])
    np.testing.assert_allclose(fast[0], plain[0], rtol=1e-6)


def test_too_long_a_shortlist_falls_back_to_float32(monkeypatch):
    monkeypatch.setattr(ExactSearch, "SHORTLIST", "on")
    monkeypatch.setattr(shortlist, "MAX_PER_QUERY", 0)  # every shortlist is too long
    bank, queries, _ = _data(1)
    search = ExactSearch(bank, False, "cpu")
    value, index = search.search(queries, 1, None)
    assert search.shortlist is not None and search.shortlist.misses == {1: 1, 3: 1}
    for _ in range(shortlist.STREAK - 1):
        value, index = search.search(queries, 1, None)
    assert search.shortlist is None  # given up after STREAK chunks in a row
    best, want = _truth(bank, queries, False, None)
    np.testing.assert_allclose(value[:, 0], -best, rtol=1e-4, atol=1e-3)
    gaps = np.sort(-_all_scores(bank, queries), axis=1)
    clear = gaps[:, 1] - gaps[:, 0] > 1e-3 * np.maximum(gaps[:, 1], 1)
    np.testing.assert_array_equal(index[clear, 0], want[clear])


def _all_scores(bank: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return -((queries[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1)


def test_k_above_one_keeps_the_float32_search(monkeypatch):
    monkeypatch.setattr(ExactSearch, "SHORTLIST", "on")
    bank, queries, _ = _data(0)
    dist, idx = NearestNeighbourIndex().add(bank).search(queries, 3)
    scores = _all_scores(bank, queries)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    np.testing.assert_allclose(dist ** 2, -np.take_along_axis(scores, order, 1), rtol=1e-4,
                               atol=1e-3 * bank.std() ** 2)


def test_the_bfloat16_check_is_a_yes_or_no_made_once():
    first = shortlist.bf16_is_fast()
    assert isinstance(first, bool) and shortlist.bf16_is_fast() is first
    assert shortlist._fast == {"cpu": first}


def _far_clusters(seed: int, offset: float = 1000.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    side = np.where(rng.random(3000) < 0.5, -offset, offset)
    bank = rng.standard_normal((3000, 64)) * 10
    bank[:, 0] += side
    queries = bank[rng.integers(0, 3000, 200)] + rng.standard_normal((200, 64)) * 3
    return bank.astype(np.float32), queries.astype(np.float32)


def _parallel_rows(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows in two narrow cones (cosine between neighbours within ~1e-4 of 1)."""
    bank, queries = _far_clusters(seed, offset=600.0)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return bank, queries


def test_threads_searching_while_the_shortlist_refines_itself(monkeypatch):
    """Searches in several threads (as the service runs them) while one of them switches the
    shortlist to three products: every result stays exact and none fails."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(ExactSearch, "SHORTLIST", "on")
    bank, queries = _parallel_rows(0)
    search = ExactSearch(bank, True, "cpu")
    best, want = _truth(bank, queries, True, None)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: search.search(queries, 1, None), range(8)))
    assert search.shortlist is not None and 3 in search.shortlist.forms
    for _, index in results:
        np.testing.assert_array_equal(index[:, 0], want)


@pytest.mark.parametrize("bad_values", [[np.nan], [np.inf], [np.inf, -np.inf]])
def test_a_non_finite_query_leaves_the_shortlist_in_place(monkeypatch, bad_values):
    monkeypatch.setattr(ExactSearch, "SHORTLIST", "on")
    bank, queries, _ = _data(0)
    search = ExactSearch(bank, False, "cpu")
    bad = queries.copy()
    bad[3, : len(bad_values)] = bad_values  # +inf and -inf in one row: its sum is nan
    calls = []
    nearest = search.shortlist.nearest
    monkeypatch.setattr(search.shortlist, "nearest", lambda *a: calls.append(1) or nearest(*a))
    _, got = search.search(bad, 1, None)  # answered by the float32 path
    assert not calls
    assert search.shortlist is not None and search.shortlist.misses == {1: 0, 3: 0}
    best, want = _truth(bank, queries, False, None)
    rest = np.arange(len(queries)) != 3
    np.testing.assert_array_equal(got[rest, 0], want[rest])
    np.testing.assert_array_equal(search.search(queries, 1, None)[1][:, 0], want)

