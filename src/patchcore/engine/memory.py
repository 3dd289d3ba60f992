"""Patch features of the training set: in RAM, or in a temporary file past a memory budget."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import DataError

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
        self._offset = 0  # bytes before the first row in the file
        self._owned = True  # a temporary file of this store, deleted by close()
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

    @classmethod
    def open_npy(cls, path: str | Path, max_memory_mb: float | None = None) -> FeatureStore:
        """An existing 2-D float32 `.npy` file as a full, read-only store.

        Within `max_memory_mb` the rows are loaded into RAM; past it they are read from the file
        slice by slice (the file is never deleted by `close`). DataError when the file is not
        such an array or is shorter or longer than its header says.
        """
        shape, dtype, offset = read_npy_header(path)
        if len(shape) != 2 or dtype != np.dtype(np.float32):
            raise DataError(f"{path} holds a {dtype} array of shape {shape}, not rows of float32 "
                            "features; delete it so that it is recomputed")
        store = cls.__new__(cls)
        store.rows, store.dim = int(shape[0]), int(shape[1])
        store.filled = store.rows
        store._offset, store._owned = offset, False
        store._file, store._array = None, None
        nbytes = store.rows * store.dim * 4
        if max_memory_mb is not None and nbytes > max_memory_mb * 2**20:
            store._file = Path(path)
            store._handle = open(path, "rb")  # noqa: SIM115 - closed in close()
            log.info("features (%.0f MB) exceed --max-memory %.0f MB: read from %s as needed",
                     nbytes / 2**20, max_memory_mb, path)
        else:
            store._array = np.fromfile(path, dtype=np.float32, count=store.rows * store.dim,
                                       offset=offset).reshape(store.rows, store.dim)
        return store

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
        if not self._owned:
            raise ValueError("this feature store was opened read-only from an existing file")
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
        self._handle.seek(self._offset + start * self.dim * 4)
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
        """Free the array and delete the temporary file (an opened `.npy` file is kept)."""
        if self._file is not None:
            self._handle.close()
            if self._owned:
                self._file.unlink(missing_ok=True)
            self._file = None
        self._array = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_npy_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a C-order `.npy` file, read from its header.

    DataError when the file is not a `.npy` array or its size does not match the header (a
    truncated or appended-to file).
    """
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = fh.tell()
        size = os.path.getsize(path)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npy array ({str(exc)[:120]}); delete it so "
                        "that it is recomputed") from None
    if fortran or dtype.hasobject:
        raise DataError(f"{path} is not a plain C-order numeric array; delete it so that it is "
                        "recomputed")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != expected:
        raise DataError(f"{path} has {size} bytes but its header promises {expected} (truncated "
                        "or damaged); delete it so that it is recomputed")
    return tuple(int(n) for n in shape), dtype, offset
