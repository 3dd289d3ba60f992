"""Patch features of the training set: in RAM, or in a disk-backed array past a memory budget."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class FeatureStore:
    """An N x D float32 array filled batch by batch; a memmap when it would exceed the budget."""

    def __init__(
        self, rows: int, dim: int, max_memory_mb: float | None = None, tmpdir: str | None = None
    ) -> None:
        self.rows, self.dim = rows, dim
        nbytes = rows * dim * 4
        self._file: Path | None = None
        if max_memory_mb is not None and nbytes > max_memory_mb * 2**20:
            fd, name = tempfile.mkstemp(prefix="patchcore-features-", suffix=".f32", dir=tmpdir)
            os.close(fd)
            self._file = Path(name)
            log.info("features (%.0f MB) exceed --max-memory %.0f MB: spilling to %s",
                     nbytes / 2**20, max_memory_mb, name)
            self.array = np.memmap(name, dtype=np.float32, mode="w+", shape=(rows, dim))
        else:
            self.array = np.empty((rows, dim), dtype=np.float32)
        self.filled = 0

    @property
    def on_disk(self) -> bool:
        """True when the features live in a temporary file."""
        return self._file is not None

    def append(self, batch: np.ndarray) -> None:
        """Write the next rows."""
        n = len(batch)
        self.array[self.filled : self.filled + n] = batch
        self.filled += n

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Rows at sorted `indices`, read in order (cheap on a memmap)."""
        return np.asarray(self.array[np.sort(indices)], dtype=np.float32)

    def close(self) -> None:
        """Free the array and delete its temporary file."""
        if self._file is not None:
            array = self.array
            if isinstance(array, np.memmap):
                array._mmap.close()  # noqa: SLF001 - release the mapping before unlinking
            self._file.unlink(missing_ok=True)
            self._file = None
        self.array = np.empty((0, self.dim), dtype=np.float32)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
