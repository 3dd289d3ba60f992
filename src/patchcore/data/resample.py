"""Torch-free resampling of anomaly maps, in numpy.

The same arithmetic as the torch and scipy calls of the scoring path, so that maps can be mapped
back to original images, and exported models scored, without torch or scipy:

* `resize_bilinear` = ``F.interpolate(x, size, mode="bilinear", align_corners=False)``;
* `sample_bilinear` = ``F.grid_sample(x, meshgrid(xs, ys), mode="bilinear",
  padding_mode="border", align_corners=False)`` on a separable (meshgrid) grid;
* `gaussian_blur` = ``scipy.ndimage.gaussian_filter(x, sigma, axes=(-2, -1))`` (reflect mode,
  truncated at 4 sigma).

Results agree with those calls up to float32 rounding (a few 1e-7 relative).
"""

from __future__ import annotations

import functools

import numpy as np

TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default kernel radius, in sigmas


def _source_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, weight of i1) of every output position (torch's align_corners=False rule)."""
    scale = np.float32(n_in / n_out)
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    return i0, i1, lam


def _lerp_axis(x: np.ndarray, axis: int, i0: np.ndarray, i1: np.ndarray,
               lam: np.ndarray) -> np.ndarray:
    shape = [1] * x.ndim
    shape[axis] = len(lam)
    w1 = lam.reshape(shape)
    a, b = np.take(x, i0, axis=axis), np.take(x, i1, axis=axis)
    return a + (b - a) * w1


def resize_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Maps (... x H x W) resized bilinearly to `size` = (h, w), float32."""
    x = np.asarray(maps, dtype=np.float32)
    h, w = int(size[0]), int(size[1])
    if x.shape[-2:] == (h, w):
        return x.copy()
    x = _lerp_axis(x, x.ndim - 2, *_source_taps(x.shape[-2], h))
    return _lerp_axis(x, x.ndim - 1, *_source_taps(x.shape[-1], w)).astype(np.float32)


def _border_taps(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """grid_sample's (i0, i1, weight of i1) of normalised coordinates, border padding."""
    c = np.asarray(coords, dtype=np.float32)
    pos = ((c + np.float32(1.0)) * np.float32(n) - np.float32(1.0)) / np.float32(2.0)
    pos = np.clip(pos, np.float32(0.0), np.float32(n - 1))
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    return i0, i1, (pos - i0.astype(np.float32)).astype(np.float32)


def sample_bilinear(image: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """An H x W map sampled at normalised coordinates ([-1, 1] spans the map) on the grid
    ys x xs: a len(ys) x len(xs) float32 array (values beyond the border repeat it)."""
    x = np.asarray(image, dtype=np.float32)
    x = _lerp_axis(x, 0, *_border_taps(ys, x.shape[0]))
    return _lerp_axis(x, 1, *_border_taps(xs, x.shape[1])).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """n x n matrix of a 1-d Gaussian filter with scipy's reflect boundary (d c b a | a b c d)."""
    radius = int(TRUNCATE * float(sigma) + 0.5)
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 / float(sigma) ** 2 * taps.astype(np.float64) ** 2)
    kernel /= kernel.sum()
    src = (np.arange(n)[:, None] + taps[None, :]) % (2 * n)
    src = np.where(src >= n, 2 * n - 1 - src, src)
    matrix = np.zeros((n, n), dtype=np.float64)
    np.add.at(matrix, (np.repeat(np.arange(n), len(taps)), src.ravel()), np.tile(kernel, n))
    matrix.setflags(write=False)
    return matrix


def gaussian_blur(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Maps (... x H x W) blurred along their last two axes (float32; unchanged if sigma <= 0)."""
    x = np.asarray(maps, dtype=np.float32)
    if sigma <= 0:
        return x.copy()
    rows = np.matmul(_blur_matrix(x.shape[-2], float(sigma)), x.astype(np.float64))
    rows = rows.astype(np.float32).astype(np.float64)  # scipy keeps float32 between axes
    out = np.matmul(rows, _blur_matrix(x.shape[-1], float(sigma)).T)
    return out.astype(np.float32)
