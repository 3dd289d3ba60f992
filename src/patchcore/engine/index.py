"""Nearest-neighbour search over the memory bank: `add(bank)`, `search(queries, k)`.

The exact (flat) search is a chunked GEMM in torch; the approximate ones (IVF, HNSW) are faiss.
"""

from __future__ import annotations

import logging
import warnings

import faiss
import numpy as np
import torch

from ..errors import ConfigError
from .shortlist import MAX_PER_QUERY, Shortlist, bf16_is_fast, pair_scores

log = logging.getLogger(__name__)


_search_threads: list[int] = []  # the last count set_search_threads applied


def set_search_threads(n: int) -> None:
    """Run faiss's searches on `n` threads: its OpenMP pool and its bundled BLAS's pool.

    The BLAS inside the faiss wheel otherwise keeps one thread per core, which oversubscribes a
    many-core machine where torch and faiss were limited to a few threads (measured on a
    16-core host with 2 threads: the search of efficientnet_lite0 features took 33 ms per image,
    3x its time on a 2-core machine).
    """
    if _search_threads == [n]:
        return
    faiss.omp_set_num_threads(n)
    from threadpoolctl import ThreadpoolController

    for lib in ThreadpoolController().lib_controllers:
        if lib.user_api == "blas" and "faiss" in str(lib.filepath):
            lib.set_num_threads(n)
    _search_threads[:] = [n]


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class ExactSearch:
    """Exact k-nearest-neighbour search over bank rows as chunked matrix products in torch.

    Hand-written rather than faiss's IndexFlat because the search dominates predict once the
    backbone is fast, and faiss's bundled BLAS made it slow on many-core hosts: on a 16-core
    Xeon with 2 threads, 784 queries x 4,704 rows x 152-d took 64 ms in faiss and 6 ms here
    (the same on 2 cores: 9.7 vs 9.4 ms for 7,840 x 168-d); on a GPU it runs on the GPU.
    Rows are chosen by |q|^2 + |b|^2 - 2 q.b in float32 on mean-centred data (centring keeps
    the cancellation error small), or by the inner product of L2-normalised rows for cosine;
    the chosen rows' distances are then computed directly, so a query equal to a bank row gets
    exactly 0. Of rows at exactly the same distance (duplicates) any one may be returned.

    On a CPU whose bfloat16 products are fast (AMX, AVX-512-BF16; checked once per process),
    the single nearest row (k = 1) comes from a bfloat16 shortlist with an exact re-rank
    instead (engine/shortlist.py): the true nearest row, ties by the lowest index.
    """

    # Floats of one chunk's query x bank distance block (64 MiB).
    CHUNK_FLOATS = 16 * 1024 * 1024
    # "auto": the bfloat16 shortlist where it is fast; "on": always (tests); "off": never.
    SHORTLIST = "auto"

    def __init__(self, bank: np.ndarray, cosine: bool, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cosine = cosine
        given = _tensor(bank, self.device)
        self.center = (torch.zeros_like(given[0]) if cosine or not len(given)
                       else given.double().mean(0).float())
        self.bank = given - self.center  # centred: for choosing rows by matrix products
        # distances come from the rows as given (on the CPU they share the caller's memory); on
        # a GPU that would be a second copy of the bank, so there they come from the centred ones
        self.rows = given if self.device.type == "cpu" else self.bank
        self.norms = (self.bank * self.bank).sum(1)
        self.shortlist: Shortlist | None = None
        if self.device.type == "cpu" and len(given) and (
                self.SHORTLIST == "on" or (self.SHORTLIST == "auto" and bf16_is_fast())):
            self.shortlist = Shortlist(self.bank, self.rows, cosine)

    def search(self, q: np.ndarray, k: int, exclude: tuple[int, int] | None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances (or inner products for cosine) and row indices, Q x k."""
        n = len(self.bank)
        raw = _tensor(q, self.device)
        queries = raw - self.center
        width = n
        if self.shortlist is not None and k == 1:
            # the shortlist's re-rank gathers up to MAX_PER_QUERY rows of D floats per query:
            # smaller chunks stay in cache (wide_resnet50_2, 1,536-d: 40 -> 33 ms per image at
            # batch 32; efficientnet_lite2, 168-d: 3.9 -> 3.6 ms)
            width += MAX_PER_QUERY * self.bank.shape[1]
        step = max(1, self.CHUNK_FLOATS // max(width, 1))
        values, indices = [], []
        with torch.inference_mode():
            for a in range(0, len(queries), step):
                block = queries[a : a + step]
                given = raw[a : a + step] if self.rows is not self.bank else block
                found = self._shortlisted(block, given, exclude) if k == 1 else None
                if found is not None:
                    values.append(found[0].float()[:, None])
                    indices.append(found[1][:, None])
                    continue
                if self.cosine:  # the largest inner product is the nearest: negate it
                    score = -(block @ self.bank.T)
                else:
                    score = torch.addmm(self.norms, block, self.bank.T, beta=1, alpha=-2)
                if exclude is not None:
                    score[:, exclude[0] : exclude[1]] = float("inf")
                # min(dim) returns the same first index as argmin, 2.6x faster on CPU here.
                idx = (score.min(1, keepdim=True).indices if k == 1
                       else _smallest(score, k)[1])
                # in float64 from the rows as given, as the shortlist re-ranks: both paths give
                # the same values (negated: smallest first, like score)
                val = -pair_scores(self.rows[idx].double(), given[:, None, :].double(),
                                   self.cosine).float()  # B x k
                if k > 1:
                    val, idx = _sort_pairs(val, idx)
                values.append(-val if self.cosine else val)
                indices.append(idx)
        return (torch.cat(values).cpu().numpy(), torch.cat(indices).cpu().numpy())

    def _shortlisted(self, block: torch.Tensor, given: torch.Tensor,
                     exclude: tuple[int, int] | None
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The nearest row's value (squared distance or inner product) and index per query by
        the bfloat16 shortlist; None to search this chunk in float32 (no shortlist here, a
        non-finite query, or too many rows even with three products)."""
        shortlist = self.shortlist
        # row sums are non-finite when an element is (or when they overflow: float32 is
        # right then too); 60x cheaper than testing every element (1 ms per 400 x 1,536)
        if shortlist is None or not bool(torch.isfinite(block.sum(1)).all()):
            return None
        found = shortlist.nearest(block, given, exclude)
        if found is None:
            if shortlist.exhausted:
                log.debug("bfloat16 shortlists keep being too long: float32 search from now on")
                self.shortlist = None
            return None
        best, index = found
        return (best if self.cosine else -best), index


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """`array` as a tensor on `device`. A read-only array (a bank in shared memory) is only
    read by the search, so torch's warning about non-writable arrays is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(array).to(device)


def _sort_pairs(val: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (value, index) pairs sorted by value, then index."""
    order = torch.argsort(idx, dim=1, stable=True)
    val, idx = val.gather(1, order), idx.gather(1, order)
    order = torch.argsort(val, dim=1, stable=True)
    return val.gather(1, order), idx.gather(1, order)


def _smallest(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest values per row and their column indices, ties by lowest index."""
    val, idx = torch.topk(score, k, dim=1, largest=False, sorted=True)
    return _sort_pairs(val, idx)


class NearestNeighbourIndex:
    """Exact (flat) or approximate (IVF / HNSW) index over bank rows.

    `search` returns euclidean distances, or cosine distances (1 - cosine similarity) when
    `distance="cosine"`, together with bank row indices. The exact search runs on `device`
    (a CUDA device puts the bank on the GPU); the approximate ones are faiss on the CPU, or on
    the GPU with a faiss GPU build.
    """

    def __init__(
        self, distance: str = "euclidean", kind: str = "flat",
        device: torch.device | str = "cpu", nprobe: int = 16, hnsw_m: int = 32,
    ) -> None:
        if distance not in ("euclidean", "cosine"):
            raise ConfigError(f"unknown distance {distance!r}")
        if kind not in ("flat", "ivf", "hnsw"):
            raise ConfigError(f"unknown index kind {kind!r}: flat, ivf or hnsw")
        self.distance = distance
        self.kind = kind
        self.device = torch.device(device)
        self.use_gpu = self.device.type == "cuda" and _gpu_available()
        self.nprobe = nprobe
        self.hnsw_m = hnsw_m
        self._index: ExactSearch | faiss.Index | None = None
        self.dim = 0

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.distance == "cosine":
            x = x.copy()
            faiss.normalize_L2(x)
        return x

    def add(self, bank: np.ndarray) -> NearestNeighbourIndex:
        """Index the bank rows (N x D)."""
        x = self._prepare(bank)
        n, d = x.shape
        self.dim = d
        if self.kind == "flat" or n < 4096:  # small banks: exact search is as fast
            self._index = ExactSearch(x, self.distance == "cosine", self.device)
            return self
        metric = faiss.METRIC_INNER_PRODUCT if self.distance == "cosine" else faiss.METRIC_L2
        if self.kind == "ivf":
            nlist = int(max(16, min(4 * np.sqrt(n), n // 39)))
            index = faiss.IndexIVFFlat(faiss.IndexFlat(d, metric), d, nlist, metric)
            index.train(x)
            index.nprobe = self.nprobe
        else:
            index = faiss.IndexHNSWFlat(d, self.hnsw_m, metric)
            index.hnsw.efSearch = 64
        if self.use_gpu and self.kind != "hnsw":
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(x)
        self._index = index
        return self

    @property
    def ntotal(self) -> int:
        """Number of indexed rows."""
        if isinstance(self._index, ExactSearch):
            return len(self._index.bank)
        return 0 if self._index is None else int(self._index.ntotal)

    def search(
        self, queries: np.ndarray, k: int = 1, exclude: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Distances and indices (both Q x k) of each query's k nearest bank rows.

        `exclude` = (start, stop) leaves bank rows start..stop-1 out of the search (exact for
        the flat index; a faiss ID selector for the approximate ones).
        """
        if self._index is None:
            raise ConfigError("search called before add")
        q = self._prepare(queries)
        if exclude is not None and exclude[0] >= exclude[1]:
            exclude = None
        if exclude is not None and self.ntotal - (exclude[1] - exclude[0]) < k:
            raise ConfigError(f"{k} nearest rows requested but only "
                              f"{self.ntotal - (exclude[1] - exclude[0])} remain outside "
                              "the excluded ones")
        if isinstance(self._index, ExactSearch):
            scores, idx = self._index.search(q, k, exclude)
        elif exclude is None:
            scores, idx = self._index.search(q, k)
        else:
            sel = faiss.IDSelectorNot(faiss.IDSelectorRange(int(exclude[0]), int(exclude[1])))
            if self.use_gpu:
                raise ConfigError("excluding bank rows needs a CPU index")
            if isinstance(self._index, faiss.IndexIVF):
                params = faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe)
            else:
                params = faiss.SearchParametersHNSW(sel=sel, efSearch=64)
            scores, idx = self._index.search(q, k, params=params)
        if self.distance == "cosine":
            dist = 1.0 - scores
        else:
            dist = np.sqrt(np.maximum(scores, 0.0))
        return dist.astype(np.float32), idx.astype(np.int64)
