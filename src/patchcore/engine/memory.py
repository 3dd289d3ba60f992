"""Patch features of the training set: in RAM, or in a temporary file past a memory budget."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class FeatureStore:
    """An N x D float32 array filled batch by batch; kept on disk when it exceeds the budget.

    On disk the rows are written and read with plain file I/O, not a memory map: mapped pages
    would count towards the process's resident memory and defeat the budget. Row slices
    (`store[a:b]`) read just those rows, so streaming consumers never hold the whole array.
    """

    def __init__(
        self, rows: int, dim: int, max_memory_mb: float | None = None, tmpdir: str | None = None
    ) -> None:
        self.rows, self.dim = rows, dim
        self.filled = 0
        self._file: Path | None = None
        self._array: np.ndarray | None = None
        nbytes = rows * dim * 4
        if max_memory_mb is not None and nbytes > max_memory_mb * 2**20:
            fd, name = tempfile.mkstemp(prefix="patchcore-features-", suffix=".f32", dir=tmpdir)
            os.close(fd)
            self._file = Path(name)
            self._handle = open(name, "r+b")  # noqa: SIM115 - closed in close()
            log.info("features (%.0f MB) exceed --max-memory %.0f MB: kept on disk in %s",
                     nbytes / 2**20, max_memory_mb, name)
        else:
            self._array = np.empty((rows, dim), dtype=np.float32)

    @property
    def on_disk(self) -> bool:
        """True when the features live in a temporary file."""
        return self._file is not None

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, dim)."""
        return (self.rows, self.dim)

    def __len__(self) -> int:
        return self.rows

    def append(self, batch: np.ndarray) -> None:
        """Write the next rows."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        n = len(batch)
        if self._array is not None:
            self._array[self.filled : self.filled + n] = batch
        else:
            self._handle.seek(self.filled * self.dim * 4)
            self._handle.write(batch.tobytes())
        self.filled += n

    def __getitem__(self, item: slice) -> np.ndarray:
        """Rows of a contiguous slice (a copy when on disk)."""
        if self._array is not None:
            return self._array[item]
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("an on-disk feature store supports contiguous row slices only")
        start, stop, _ = item.indices(self.rows)
        self._handle.flush()
        self._handle.seek(start * self.dim * 4)
        data = np.fromfile(self._handle, dtype=np.float32, count=max(stop - start, 0) * self.dim)
        return data.reshape(-1, self.dim)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if self._array is not None:
            return self._array if dtype is None else self._array.astype(dtype)
        log.warning("loading all %d on-disk feature rows into memory", self.rows)
        return self[0 : self.rows] if dtype is None else self[0 : self.rows].astype(dtype)

    def gather(self, indices: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """Rows at `indices`, in ascending index order, read chunk by chunk."""
        indices = np.sort(np.asarray(indices, dtype=np.int64))
        if self._array is not None:
            return self._array[indices]
        out = np.empty((len(indices), self.dim), dtype=np.float32)
        done = 0
        for start in range(0, self.rows, chunk):
            lo, hi = np.searchsorted(indices, [start, start + chunk])
            if hi > lo:
                out[done : done + hi - lo] = self[start : start + chunk][indices[lo:hi] - start]
                done += hi - lo
        return out

    def close(self) -> None:
        """Free the array and delete the temporary file."""
        if self._file is not None:
            self._handle.close()
            self._file.unlink(missing_ok=True)
            self._file = None
        self._array = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
