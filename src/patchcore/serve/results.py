"""One image's answer: scores, label, thresholds, and on request its map and overlay.

Maps: `png` is an 8-bit grayscale PNG at the image's own size of the calibrated map (0.5 = the
model's pixel threshold) or, for a model without a pixel threshold, of the raw map divided by
its maximum; `array` is the raw map as little-endian float16, base64-encoded, with its shape.
The overlay is the same heatmap overlay the CLI writes (`reports.overlay.overlay`).
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import numpy as np
from PIL import Image

from ..reports.overlay import overlay as blend

MAP_FORMATS = ("none", "png", "array")


def png_bytes(image: Image.Image) -> bytes:
    """An image encoded as PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def b64(data: bytes) -> str:
    """Bytes as base64 text."""
    return base64.b64encode(data).decode("ascii")


def finite_or_none(value: Any) -> float | None:
    """A float, or None for None / NaN / infinity (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def unit_map(prediction: Any, row: int, calibration: Any) -> np.ndarray:
    """Image `row`'s map at its own size in 0-1: calibrated (0.5 = pixel threshold) when the
    model has a pixel threshold, else the raw map over its maximum."""
    if calibration.pixel_threshold is not None:
        return prediction.calibrated_map(row, calibration)
    raw = prediction.original_map(row)
    top = float(np.max(raw)) if raw.size else 0.0
    return raw / top if top > 0 else np.zeros_like(raw)


def overlay_png(prediction: Any, row: int, calibration: Any, image: Image.Image) -> bytes:
    """The heatmap overlay PNG of image `row` (pixels below the pixel threshold untouched)."""
    if calibration.pixel_threshold is None:
        values = np.zeros((image.height, image.width), np.float32)  # no threshold: no tint
    else:
        values = prediction.calibrated_map(row, calibration)
    return png_bytes(blend(image, values))


def image_result(prediction: Any, row: int, calibration: Any, maps: str = "none",
                 image: Image.Image | None = None) -> dict[str, Any]:
    """The JSON answer for image `row` of `prediction`; `image` given: with its overlay."""
    width, height = prediction.sizes[row]
    out: dict[str, Any] = {
        "score": float(prediction.scores[row]),
        "calibrated_score": finite_or_none(prediction.calibrated[row]),
        "label": prediction.label_names[row],
        "image_threshold": finite_or_none(calibration.image_threshold),
        "pixel_threshold": finite_or_none(calibration.pixel_threshold),
        "width": int(width),
        "height": int(height),
    }
    if maps == "png":
        values = unit_map(prediction, row, calibration)
        gray = (np.clip(np.nan_to_num(values), 0.0, 1.0) * 255).round().astype(np.uint8)
        out["map"] = {"format": "png", "scale": "calibrated" if calibration.pixel_threshold
                      is not None else "max", "data": b64(png_bytes(Image.fromarray(gray)))}
    elif maps == "array":
        raw = np.asarray(prediction.original_map(row), dtype="<f2")
        out["map"] = {"format": "float16", "byteorder": "little", "shape": list(raw.shape),
                      "values": "raw", "data": b64(raw.tobytes())}
    if image is not None:
        out["overlay"] = {"format": "png",
                          "data": b64(overlay_png(prediction, row, calibration, image))}
    return out
