"""The memory bank: coreset rows of the training patch features with their provenance."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import PatchCoreConfig
from ..errors import ConfigError
from .index import NearestNeighbourIndex
from .memory import FeatureStore
from .sampling import get_sampler

log = logging.getLogger(__name__)


@dataclass
class MemoryBank:
    """Persisted state of one backbone: bank rows and where each came from.

    `image_index[i]` is the training image row i was taken from and `position[i]` its
    (row, col) on the feature grid; `norm` is the (mean, std) used to put ensemble members'
    scores on one scale.
    """

    backbone: str
    layers: tuple[str, ...]
    features: np.ndarray  # M x D, float32 or float16
    image_index: np.ndarray  # M, int32
    position: np.ndarray  # M x 2, int16
    norm: tuple[float, float] = (0.0, 1.0)

    def __len__(self) -> int:
        return len(self.features)


def bank_rows(total: int, config: PatchCoreConfig) -> int:
    """Rows of the memory bank taken from `total` training patches; a bank smaller than
    `anomaly_scorer_num_nn` is an error."""
    n = total if config.sampler == "identity" else max(1, int(total * config.percentage))
    if config.anomaly_scorer_num_nn > n:
        raise ConfigError(
            f"anomaly_scorer_num_nn={config.anomaly_scorer_num_nn} is larger than the memory "
            f"bank ({n} rows from {total} patches); lower it or raise --percentage")
    return n


def build_bank(
    store: FeatureStore | np.ndarray, grid: tuple[int, int], config: PatchCoreConfig, seed: int,
    device: torch.device | str = "cpu", progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Subsample the training patch features (N*h*w x D, image-major) into a memory bank.

    Returns the bank rows (ascending feature order), their image index, grid position and
    timing information. `config.anomaly_scorer_num_nn` larger than the bank is an error.
    """
    total = len(store)
    n = bank_rows(total, config)
    sampler = get_sampler(config.sampler, config.projection_dim, config.num_starting_points,
                          device, progress)
    t0 = time.perf_counter()
    idx = np.sort(np.asarray(sampler.select(store, n, seed), dtype=np.int64))
    seconds = time.perf_counter() - t0
    rows = store.gather(idx) if isinstance(store, FeatureStore) else np.asarray(
        store, dtype=np.float32)[idx]
    if config.bank_dtype == "float16":
        rows = rows.astype(np.float16)
    h, w = grid
    per_image = h * w
    image_index = (idx // per_image).astype(np.int32)
    position = np.stack([(idx % per_image) // w, idx % w], axis=1).astype(np.int16)
    return rows, image_index, position, {"patches": int(total), "bank_rows": int(len(rows)),
                                         "coreset_seconds": round(seconds, 3)}


def bank_index(
    features: np.ndarray, config: PatchCoreConfig, device: torch.device | str = "cpu"
) -> NearestNeighbourIndex:
    """The nearest-neighbour index over bank rows that scoring searches."""
    index = NearestNeighbourIndex(config.distance, config.index, device=device)
    return index.add(np.asarray(features, dtype=np.float32))
