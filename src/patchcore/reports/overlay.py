"""Heatmap overlays and map images at the original image size."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from PIL import Image  # noqa: E402


def heatmap_rgb(values: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """A 0-1 map (H x W) as an RGB uint8 image."""
    rgba = colormaps[cmap](np.clip(values, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay(image: Image.Image, values: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Blend a 0-1 anomaly map (same H x W as `image`) over the image."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    heat = heatmap_rgb(values).astype(np.float32)
    # Below 0.5 (normal) the heat fades out so the product stays visible.
    weight = alpha * np.clip(values, 0.0, 1.0)[..., None] ** 0.5
    blended = base * (1 - weight) + heat * weight
    return Image.fromarray(blended.round().astype(np.uint8))


def save_map_png(values: np.ndarray, path: Path) -> None:
    """A 0-1 map as an 8-bit grayscale PNG."""
    Image.fromarray((np.clip(values, 0.0, 1.0) * 255).round().astype(np.uint8), mode="L").save(path)
