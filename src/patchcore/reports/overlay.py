"""Heatmap overlays and map images at the original image size."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from PIL import Image  # noqa: E402

from ..errors import DataError  # noqa: E402

PIXEL_THRESHOLD = 0.5  # calibrated maps are 0.5 at the pixel threshold


def heatmap_rgb(values: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """A 0-1 map (H x W) as an RGB uint8 image."""
    rgba = colormaps[cmap](np.clip(values, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay(
    image: Image.Image, values: np.ndarray, alpha: float = 0.45, edge_alpha: float = 0.15,
) -> Image.Image:
    """Blend a 0-1 anomaly map (same H x W as `image`) over the image; normal pixels stay clear.

    Pixels below `PIXEL_THRESHOLD` (0.5, where calibrated maps put the pixel threshold) keep
    the image unchanged, so a good image looks exactly like itself. At the threshold the heat
    starts faint (`edge_alpha`, which outlines anomalous regions) and grows with the square root
    of the excess up to `alpha` at 1.
    """
    rgb = image.convert("RGB")
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0), 0.0, 1.0)
    if v.shape != (rgb.height, rgb.width):
        raise DataError(f"anomaly map of shape {v.shape} does not fit its {rgb.width}x"
                        f"{rgb.height} image; pass a H x W map at the image's size")
    hot = v >= PIXEL_THRESHOLD
    if not hot.any():
        return rgb
    base = np.asarray(rgb, dtype=np.float32)
    excess = (v[hot] - PIXEL_THRESHOLD) / (1.0 - PIXEL_THRESHOLD)
    weight = (edge_alpha + (alpha - edge_alpha) * np.sqrt(excess))[:, None]
    blended = base.copy()
    blended[hot] = base[hot] * (1.0 - weight) + heatmap_rgb(v[hot]).astype(np.float32) * weight
    return Image.fromarray(blended.round().astype(np.uint8))


def save_map_png(values: np.ndarray, path: Path) -> None:
    """A 0-1 map as an 8-bit grayscale PNG."""
    Image.fromarray((np.clip(values, 0.0, 1.0) * 255).round().astype(np.uint8), mode="L").save(path)
