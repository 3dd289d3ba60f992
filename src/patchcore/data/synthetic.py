"""Synthetic anomaly-detection datasets: procedural textures with pasted, masked defects.

Used by the test-suite and by ``patchcore demo``. Normal images of one category share the same
texture statistics (random phase and noise, fixed palette and scale), so a pretrained CNN sees
them as alike; defect images carry a scratch, spot or crack whose ground-truth mask covers every
changed pixel. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import fft as sfft
from scipy import ndimage

__all__ = [
    "DEFECTS",
    "LAYOUTS",
    "MODES",
    "TEXTURES",
    "make_synthetic_dataset",
    "make_texture",
    "paste_defect",
]

TEXTURES: tuple[str, ...] = ("carpet", "grid", "fabric", "wood", "tile")
"""Texture kinds accepted by :func:`make_texture` (and category names of the datasets)."""

DEFECTS: tuple[str, ...] = ("scratch", "spot", "crack")
"""Defect kinds accepted by :func:`paste_defect`."""

LAYOUTS: tuple[str, ...] = ("mvtec", "val", "folder")
"""Directory layouts written by :func:`make_synthetic_dataset`."""

MODES: tuple[str, ...] = ("RGB", "L", "I;16", "RGBA")
"""PNG image modes :func:`make_synthetic_dataset` can write."""

_SPLIT_CODES = {"train": 0, "test": 1, "val": 2}


# --------------------------------------------------------------------------------------
# noise helpers
# --------------------------------------------------------------------------------------


def _band_noise(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    sigma: float | tuple[float, float],
) -> np.ndarray:
    """Gaussian-filtered white noise (periodic) with unit standard deviation.

    ``shape`` is (..., H, W); ``sigma`` the filter width in pixels, per axis (y, x) if a pair.
    """
    sy, sx = (sigma, sigma) if np.isscalar(sigma) else sigma
    h, w = shape[-2:]
    spectrum = sfft.rfft2(rng.standard_normal(shape, dtype=np.float32))
    fy = sfft.fftfreq(h)[:, None]
    fx = sfft.rfftfreq(w)[None, :]
    spectrum *= np.exp(-2 * math.pi**2 * ((sy * fy) ** 2 + (sx * fx) ** 2)).astype(np.float32)
    out = sfft.irfft2(spectrum, s=(h, w))
    out -= out.mean(axis=(-2, -1), keepdims=True)
    out /= out.std(axis=(-2, -1), keepdims=True) + 1e-12
    return out


def _shape_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, (int, np.integer)) else size
    if h < 16 or w < 16:
        raise ValueError(f"image size must be at least 16x16, got {h}x{w}")
    return int(h), int(w)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------
# textures
# --------------------------------------------------------------------------------------


def _carpet(rng: np.random.Generator, h: int, w: int, s: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    period = 7.0 * s
    px, py = rng.uniform(0, period, 2)
    knots = np.sin(2 * np.pi * (xx + px) / period) * np.sin(2 * np.pi * (yy + py) / period)
    fine, mid = _band_noise(rng, (h, w), 0.8 * s), _band_noise(rng, (h, w), 3 * s)
    lum = 1.0 + 0.18 * fine + 0.10 * mid + 0.10 * knots + rng.uniform(-0.03, 0.03)
    chroma = 0.025 * _band_noise(rng, (3, h, w), 1.0 * s)
    base = np.array([0.62, 0.46, 0.38])
    return base * lum[..., None] + np.moveaxis(chroma, 0, -1)


def _grid(rng: np.random.Generator, h: int, w: int, s: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    period, half_width = 16.0 * s, 1.7 * s
    warp = 0.8 * s * _band_noise(rng, (2, h, w), 10 * s)
    wires = []
    for coord, jitter in ((xx, warp[0]), (yy, warp[1])):
        d = np.mod(coord + jitter - rng.uniform(0, period), period)
        d = np.minimum(d, period - d)
        wires.append(np.exp(-((d / half_width) ** 2)))
    wire = np.maximum(wires[0], wires[1]) + 0.25 * wires[0] * wires[1]
    lum = 0.14 + 0.6 * wire + 0.035 * _band_noise(rng, (h, w), 0.8 * s)
    lum += 0.03 * _band_noise(rng, (h, w), 8 * s) + rng.uniform(-0.02, 0.02)
    return lum[..., None] * np.array([0.95, 0.98, 1.0])


def _fabric(rng: np.random.Generator, h: int, w: int, s: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    cell = 9.0 * s
    warp = 0.35 * s * _band_noise(rng, (2, h, w), 12 * s)
    u = (xx + warp[0] - rng.uniform(0, 2 * cell)) / cell
    v = (yy + warp[1] - rng.uniform(0, 2 * cell)) / cell
    over = (np.floor(u) + np.floor(v)) % 2 == 0  # plain weave: warp and weft alternate
    shade = np.where(over, np.sin(np.pi * (u % 1.0)), np.sin(np.pi * (v % 1.0))) ** 0.6
    colour = np.where(over[..., None], np.array([0.22, 0.32, 0.58]), np.array([0.34, 0.46, 0.70]))
    fibre = 0.05 * _band_noise(rng, (h, w), (0.6 * s, 0.6 * s))
    lum = 0.55 + 0.45 * shade + fibre + rng.uniform(-0.03, 0.03)
    return colour * lum[..., None]


def _wood(rng: np.random.Generator, h: int, w: int, s: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    period = 20.0 * s * rng.uniform(0.95, 1.05)
    angle = rng.uniform(-0.05, 0.05)
    u = xx * math.cos(angle) + yy * math.sin(angle) + 5.0 * s * _band_noise(rng, (h, w), 24 * s)
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    grain = _band_noise(rng, (h, w), (10 * s, 0.6 * s))  # streaks along the grain (y)
    t = np.clip(0.65 * rings**1.5 + 0.12 * grain + 0.15 + rng.uniform(-0.03, 0.03), 0, 1)
    light, dark = np.array([0.80, 0.60, 0.40]), np.array([0.50, 0.32, 0.18])
    return light + (dark - light) * t[..., None]


def _tile(rng: np.random.Generator, h: int, w: int, s: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    size, grout = 64.0 * s, 3.0 * s
    ox, oy = rng.uniform(0, size, 2)
    gx, gy = (xx - ox) % size, (yy - oy) % size
    in_grout = (gx < grout) | (gy < grout)
    tile_id = (np.floor((xx - ox) / size) * 7 + np.floor((yy - oy) / size)).astype(np.int64)
    tile_shift = 0.025 * np.sin(tile_id * 12.9898 + rng.uniform(0, 2 * np.pi))
    speckle = _band_noise(rng, (h, w), 1.2 * s)
    lum = 0.78 + tile_shift + 0.04 * _band_noise(rng, (h, w), 6 * s)
    lum -= 0.4 * np.clip((speckle - 1.5) * 1.5, 0, 1)
    lum = np.where(in_grout, 0.42 + 0.03 * speckle, lum)
    return np.repeat(lum[..., None], 3, axis=-1)


_TEXTURE_FUNCS = {
    "carpet": _carpet,
    "grid": _grid,
    "fabric": _fabric,
    "wood": _wood,
    "tile": _tile,
}


def make_texture(
    rng: np.random.Generator, size: int | tuple[int, int] = 256, kind: str = "carpet"
) -> np.ndarray:
    """A normal (defect-free) texture image as an (H, W, 3) uint8 RGB array.

    ``size`` is the side length, or (height, width). ``kind`` is one of :data:`TEXTURES`;
    "tile" is grayscale (equal channels). Samples of one kind differ only by random phase
    and noise, and features scale with ``size`` (relative to 256 px).
    """
    if kind not in _TEXTURE_FUNCS:
        raise ValueError(f"unknown texture kind {kind!r}; choose from {TEXTURES}")
    h, w = _shape_hw(size)
    return _to_uint8(_TEXTURE_FUNCS[kind](rng, h, w, min(h, w) / 256.0))


# --------------------------------------------------------------------------------------
# defects
# --------------------------------------------------------------------------------------


def _stroke_alpha(points: np.ndarray, half_width: float, h: int, w: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a stroke along ``points`` (K, 2) as (y, x)."""
    alpha = np.zeros((h, w), dtype=np.float64)
    pad = int(math.ceil(half_width)) + 2
    pts = np.rint(points).astype(np.int64)
    inside = (pts[:, 0] >= -pad) & (pts[:, 0] < h + pad) & (pts[:, 1] >= -pad)
    inside &= pts[:, 1] < w + pad
    pts = pts[inside]
    if pts.size == 0:
        return alpha
    y0, x0 = np.maximum(pts.min(axis=0) - pad, 0)
    y1, x1 = np.minimum(pts.max(axis=0) + pad + 1, (h, w))
    if y0 >= y1 or x0 >= x1:
        return alpha
    # Rasterise into a box that also holds the off-image part of the stroke near the edge.
    oy, ox = pts.min(axis=0) - pad
    box = np.zeros(tuple(pts.max(axis=0) - (oy, ox) + pad + 1), dtype=bool)
    box[pts[:, 0] - oy, pts[:, 1] - ox] = True
    dist = ndimage.distance_transform_edt(~box)
    cover = np.clip(half_width + 0.5 - dist, 0.0, 1.0)
    alpha[y0:y1, x0:x1] = cover[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    return alpha


def _densify(vertices: np.ndarray) -> np.ndarray:
    """Points every half pixel along a polyline through ``vertices`` (K, 2)."""
    parts = []
    for a, b in zip(vertices[:-1], vertices[1:], strict=True):
        n = max(2, int(np.ceil(2 * np.linalg.norm(b - a))) + 1)
        parts.append(a + (b - a) * np.linspace(0.0, 1.0, n)[:, None])
    return np.concatenate(parts)


def _scratch_alpha(rng: np.random.Generator, h: int, w: int, s: float) -> np.ndarray:
    centre = rng.uniform(0.3, 0.7, 2) * (h, w)
    length = rng.uniform(0.35, 0.6) * min(h, w)
    theta = rng.uniform(0, np.pi)
    direction = np.array([math.sin(theta), math.cos(theta)])
    normal = np.array([direction[1], -direction[0]])
    p0, p2 = centre - direction * length / 2, centre + direction * length / 2
    p1 = centre + normal * rng.uniform(-0.3, 0.3) * length
    t = np.linspace(0.0, 1.0, int(2 * length) + 2)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # quadratic Bezier
    return _stroke_alpha(curve, rng.uniform(1.5, 3.0) * s, h, w)


def _crack_alpha(rng: np.random.Generator, h: int, w: int, s: float) -> np.ndarray:
    vertices = [rng.uniform(0.3, 0.7, 2) * (h, w)]
    heading = rng.uniform(0, 2 * np.pi)
    lo, hi = np.array([0.1 * h, 0.1 * w]), np.array([0.9 * h, 0.9 * w])
    for _ in range(rng.integers(6, 10)):
        heading += rng.uniform(-0.7, 0.7)
        step = rng.uniform(0.04, 0.08) * min(h, w)
        nxt = vertices[-1] + step * np.array([math.sin(heading), math.cos(heading)])
        if np.any(nxt < lo) or np.any(nxt > hi):  # turn back instead of leaving the image
            heading += np.pi
            nxt = vertices[-1] + step * np.array([math.sin(heading), math.cos(heading)])
        vertices.append(nxt)
    points = _densify(np.array(vertices))
    # one side branch from a random vertex
    start = vertices[rng.integers(1, len(vertices) - 1)]
    heading += rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 1.4)
    branch = [start]
    for _ in range(rng.integers(2, 4)):
        heading += rng.uniform(-0.5, 0.5)
        step = rng.uniform(0.03, 0.06) * min(h, w)
        branch.append(branch[-1] + step * np.array([math.sin(heading), math.cos(heading)]))
    points = np.concatenate([points, _densify(np.array(branch))])
    return _stroke_alpha(points, rng.uniform(0.8, 1.5) * s, h, w)


def _spot_alpha(rng: np.random.Generator, h: int, w: int, s: float) -> np.ndarray:
    cy, cx = rng.uniform(0.25, 0.75, 2) * (h, w)
    radius = rng.uniform(9.0, 20.0) * s
    aspect = rng.uniform(0.6, 1.0)
    rot = rng.uniform(0, np.pi)
    r_max = int(math.ceil(radius * 1.5)) + 2
    y0, y1 = max(int(cy) - r_max, 0), min(int(cy) + r_max + 1, h)
    x0, x1 = max(int(cx) - r_max, 0), min(int(cx) + r_max + 1, w)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    a = dx * math.cos(rot) + dy * math.sin(rot)
    b = (-dx * math.sin(rot) + dy * math.cos(rot)) / aspect
    rho = np.hypot(a, b) / radius
    phi = np.arctan2(b, a)
    boundary = np.ones_like(phi)
    for k in (2, 3, 5):  # irregular outline
        boundary += rng.uniform(0.0, 0.12) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    alpha = np.zeros((h, w), dtype=np.float64)
    alpha[y0:y1, x0:x1] = np.clip((boundary - rho) * radius + 0.5, 0.0, 1.0)
    return alpha


def _contrast_colour(rng: np.random.Generator, mean: np.ndarray, minimum: float) -> np.ndarray:
    """A gray level at least ``minimum`` brighter or darker than the luminance of ``mean``."""
    lum = float(mean.mean())
    options = [lum + minimum + 0.1 <= 1.0, lum - minimum - 0.1 >= 0.0]
    if all(options):
        sign = rng.choice([-1.0, 1.0])
    else:
        sign = 1.0 if lum < 0.5 else -1.0
    target = np.clip(lum + sign * rng.uniform(minimum, minimum + 0.1), 0.0, 1.0)
    return np.full_like(mean, target)


def _distinct_colour(rng: np.random.Generator, mean: np.ndarray, minimum: float) -> np.ndarray:
    """A random colour at least ``minimum`` (Euclidean) away from ``mean``."""
    best, best_dist = mean, -1.0
    for _ in range(100):
        colour = rng.uniform(0.0, 1.0, mean.shape)
        dist = float(np.linalg.norm(colour - mean)) / math.sqrt(mean.size / 3)
        if dist >= minimum:
            return colour
        if dist > best_dist:
            best, best_dist = colour, dist
    return best


def paste_defect(
    rng: np.random.Generator, image: np.ndarray, kind: str = "scratch"
) -> tuple[np.ndarray, np.ndarray]:
    """Add a defect to a uint8 image, returning ``(defective_image, mask)``.

    ``image`` is (H, W) or (H, W, C) uint8 and is not modified. ``kind`` is one of
    :data:`DEFECTS`: "scratch" (curved bright or dark line, a few px wide), "spot" (blob of a
    different colour) or "crack" (thin dark branching polyline). ``mask`` is (H, W) uint8 with
    255 on the defect, dilated by one pixel; every pixel outside it is unchanged.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"image must be a (H, W) or (H, W, C) uint8 array, got {img.dtype}")
    h, w = img.shape[:2]
    s = min(h, w) / 256.0
    pixels = img.reshape(h, w, -1).astype(np.float64) / 255.0
    mean = pixels.reshape(-1, pixels.shape[-1]).mean(axis=0)
    if kind == "scratch":
        alpha = _scratch_alpha(rng, h, w, s)
        colour, opacity = _contrast_colour(rng, mean, 0.4), 1.0
    elif kind == "crack":
        alpha = _crack_alpha(rng, h, w, s)
        colour, opacity = mean * rng.uniform(0.05, 0.2), 1.0
    elif kind == "spot":
        alpha = _spot_alpha(rng, h, w, s)
        colour, opacity = _distinct_colour(rng, mean, 0.45), rng.uniform(0.8, 0.95)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECTS}")

    changed = alpha > 0
    a = (alpha[changed] * opacity)[:, None]
    out = img.copy().reshape(h, w, -1)
    out[changed] = _to_uint8(pixels[changed] * (1.0 - a) + colour * a)
    mask = ndimage.binary_dilation(changed, structure=np.ones((3, 3), dtype=bool))
    return out.reshape(img.shape), mask.astype(np.uint8) * 255


# --------------------------------------------------------------------------------------
# datasets on disk
# --------------------------------------------------------------------------------------


def _encode(rgb: np.ndarray, mode: str) -> Image.Image:
    """Convert an RGB uint8 array to a PIL image of ``mode`` (one of :data:`MODES`)."""
    image = Image.fromarray(rgb)
    if mode == "RGB":
        return image
    if mode == "L":
        return image.convert("L")
    if mode == "RGBA":
        return image.convert("RGBA")
    if mode == "I;16":
        gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        return Image.fromarray(gray)
    raise ValueError(f"unknown image mode {mode!r}; choose from {MODES}")


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=1)


def make_synthetic_dataset(
    root: str | Path,
    categories: Sequence[str] = ("carpet",),
    n_train: int = 20,
    n_test_good: int = 6,
    n_test_defect: int = 8,
    size: int | tuple[int, int] = 256,
    seed: int = 0,
    layout: str = "mvtec",
    defects: Sequence[str] = ("scratch", "spot"),
    modes: Sequence[str] = ("RGB",),
) -> Path:
    """Write a synthetic dataset under ``root`` and return ``root`` as a Path.

    Each category (a texture kind from :data:`TEXTURES`) gets, by ``layout``:

    * ``"mvtec"`` (MVTec AD): ``train/good/NNN.png``, ``test/good/NNN.png``,
      ``test/<defect>/NNN.png`` and ``ground_truth/<defect>/NNN_mask.png`` (0/255).
    * ``"val"``: the same plus ``val/good`` and ``val/<defect>`` (no masks for val), with as
      many images as the test split.
    * ``"folder"``: ``train/good``, ``test/good`` and ``test/<defect>/batch<k>/NNN.png``
      (two nesting levels below ``test``), image-level labels only, no ground truth.

    ``n_test_defect`` is the total number of defect images per split, assigned to ``defects``
    in turn. The i-th image of each folder is written in ``modes[i % len(modes)]`` (from
    :data:`MODES`: 8-bit RGB, grayscale, 16-bit grayscale, RGBA); masks are always 8-bit.
    Output is byte-identical for the same arguments; each image's content depends only on
    ``seed``, category, split, defect kind and index.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    for name in categories:
        if name not in TEXTURES:
            raise ValueError(f"unknown category {name!r}; choose from {TEXTURES}")
    if not defects:
        raise ValueError("at least one defect kind is required")
    for kind in defects:
        if kind not in DEFECTS:
            raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECTS}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown image mode {mode!r}; choose from {MODES}")
    if not modes:
        raise ValueError("at least one image mode is required")
    if min(n_train, n_test_good, n_test_defect) < 0:
        raise ValueError("image counts must be non-negative")

    root = Path(root)
    splits = ["train", "test"] + (["val"] if layout == "val" else [])
    for category in categories:
        base = root / category
        cat_code = zlib.crc32(category.encode())
        for split in splits:
            n_good = n_train if split == "train" else n_test_good
            n_bad = 0 if split == "train" else n_test_defect
            for i in range(n_good):
                rng = np.random.default_rng([seed, cat_code, _SPLIT_CODES[split], 0, i])
                rgb = make_texture(rng, size, category)
                _save(_encode(rgb, modes[i % len(modes)]), base / split / "good" / f"{i:03d}.png")
            for j in range(n_bad):
                kind = defects[j % len(defects)]
                i = j // len(defects)
                code = zlib.crc32(kind.encode())
                rng = np.random.default_rng([seed, cat_code, _SPLIT_CODES[split], code, i])
                rgb, mask = paste_defect(rng, make_texture(rng, size, category), kind)
                image = _encode(rgb, modes[i % len(modes)])
                if layout == "folder" and split == "test":
                    _save(image, base / split / kind / f"batch{i % 2 + 1}" / f"{i:03d}.png")
                    continue
                _save(image, base / split / kind / f"{i:03d}.png")
                if split == "test":
                    _save(Image.fromarray(mask), base / "ground_truth" / kind / f"{i:03d}_mask.png")
    return root
