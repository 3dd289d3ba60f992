"""Thumbnails of test images and their heatmap overlays (PIL), as PNG bytes or data URIs."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..data.images import load_image
from .overlay import overlay

if TYPE_CHECKING:
    from ..engine.calibration import Calibration


def scaled_map(pred: Any, i: int, calibration: Calibration) -> np.ndarray:
    """Image i's anomaly map at original size, 0-1 with 0.5 at the pixel threshold.

    Without a pixel calibration the map is min-max scaled over all maps of `pred`.
    """
    raw = pred.original_map(i)
    scaled = pred.calibrated_map(i, calibration)
    if np.isnan(scaled).any():
        lo, hi = float(pred.maps.min()), float(pred.maps.max())
        scaled = np.clip((raw - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    return scaled


def overlay_image(pred: Any, i: int, calibration: Calibration) -> Image.Image:
    """Heatmap overlay of image i at its original resolution."""
    return overlay(load_image(pred.paths[i]), scaled_map(pred, i, calibration))


def thumbnail(image: Image.Image, size: int = 128) -> Image.Image:
    """A copy of `image` fitted inside size x size."""
    copy = image.convert("RGB").copy()
    copy.thumbnail((size, size))
    return copy


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding of a PIL image."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes | Image.Image, mime: str = "image/png") -> str:
    """A base64 data: URI of PNG bytes or a PIL image (for self-contained HTML)."""
    if isinstance(data, Image.Image):
        data = png_bytes(data)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_thumbnail(path: str | Path, size: int = 128) -> Image.Image:
    """Thumbnail of the image file at `path`."""
    return thumbnail(load_image(path), size)
