"""Nearest-neighbour search over the memory bank (faiss): `add(bank)`, `search(queries, k)`."""

from __future__ import annotations

import logging

import faiss
import numpy as np

from ..errors import ConfigError

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


class NearestNeighbourIndex:
    """Exact (flat) or approximate (IVF / HNSW) faiss index over bank rows.

    `search` returns euclidean distances, or cosine distances (1 - cosine similarity) when
    `distance="cosine"`, together with bank row indices.
    """

    def __init__(
        self, distance: str = "euclidean", kind: str = "flat", use_gpu: bool = False,
        nprobe: int = 16, hnsw_m: int = 32,
    ) -> None:
        if distance not in ("euclidean", "cosine"):
            raise ConfigError(f"unknown distance {distance!r}")
        self.distance = distance
        self.kind = kind
        self.use_gpu = use_gpu and _gpu_available()
        self.nprobe = nprobe
        self.hnsw_m = hnsw_m
        self._index = None
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
        metric = faiss.METRIC_INNER_PRODUCT if self.distance == "cosine" else faiss.METRIC_L2
        if self.kind == "flat" or n < 4096:
            index = faiss.IndexFlat(d, metric)
        elif self.kind == "ivf":
            nlist = int(max(16, min(4 * np.sqrt(n), n // 39)))
            index = faiss.IndexIVFFlat(faiss.IndexFlat(d, metric), d, nlist, metric)
            index.train(x)
            index.nprobe = self.nprobe
        elif self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, self.hnsw_m, metric)
            index.hnsw.efSearch = 64
        else:
            raise ConfigError(f"unknown index kind {self.kind!r}")
        if self.use_gpu and self.kind != "hnsw":
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(x)
        self._index = index
        return self

    @property
    def ntotal(self) -> int:
        """Number of indexed rows."""
        return 0 if self._index is None else int(self._index.ntotal)

    def search(
        self, queries: np.ndarray, k: int = 1, exclude: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Distances and indices (both Q x k) of each query's k nearest bank rows.

        `exclude` = (start, stop) leaves bank rows start..stop-1 out of the search (a faiss ID
        selector: no extra memory, exact for the flat index).
        """
        if self._index is None:
            raise ConfigError("search called before add")
        q = self._prepare(queries)
        if exclude is None or exclude[0] >= exclude[1]:
            scores, idx = self._index.search(q, k)
        else:
            if self.ntotal - (exclude[1] - exclude[0]) < k:
                raise ConfigError(f"{k} nearest rows requested but only "
                                  f"{self.ntotal - (exclude[1] - exclude[0])} remain outside "
                                  "the excluded ones")
            sel = faiss.IDSelectorNot(faiss.IDSelectorRange(int(exclude[0]), int(exclude[1])))
            if self.use_gpu:
                raise ConfigError("excluding bank rows needs a CPU index")
            if self.kind == "ivf" and isinstance(self._index, faiss.IndexIVF):
                params = faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe)
            elif self.kind == "hnsw" and isinstance(self._index, faiss.IndexHNSW):
                params = faiss.SearchParametersHNSW(sel=sel, efSearch=64)
            else:
                params = faiss.SearchParameters(sel=sel)
            scores, idx = self._index.search(q, k, params=params)
        if self.distance == "cosine":
            dist = 1.0 - scores
        else:
            dist = np.sqrt(np.maximum(scores, 0.0))
        return dist.astype(np.float32), idx.astype(np.int64)
