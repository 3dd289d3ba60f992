"""Known-geometry checks of the centre crop and its inverse (maps back onto the original image).

The sizes are chosen so that every step is an exact factor of two: the shorter side halves when
resized, the crop offset is an integer, and bilinear upsampling by two of a 0/1 square crosses
0.5 exactly on the square's border. The expected pixel boxes are worked out by hand below.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore.data.preprocess import Preprocessor

RESIZE, CROP = 100, 80

# (original W x H, hot square in crop coordinates (top, bottom, left, right), its box in the
# original image). Landscape 300 x 200 -> resized 150 x 100, crop offset (left 35, top 10);
# portrait 200 x 300 -> resized 100 x 150, crop offset (left 10, top 35). The factor back to the
# original is 2, so crop row r lands on original rows 2 * (r + top) and 2 * (r + top) + 1.
GEOMETRY = [
    pytest.param((300, 200), (20, 40, 10, 30), (60, 100, 90, 130), id="landscape"),
    pytest.param((200, 300), (10, 30, 20, 40), (90, 130, 60, 100), id="portrait"),
    pytest.param((200, 200), (5, 25, 50, 70), (30, 70, 120, 160), id="square"),
]


def _box(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    top, bottom, left, right = box
    out = np.zeros(shape, dtype=bool)
    out[top:bottom, left:right] = True
    return out


@pytest.mark.parametrize("size,crop_box,original_box", GEOMETRY)
def test_map_lands_on_the_right_original_pixels(size, crop_box, original_box) -> None:
    pre = Preprocessor(RESIZE, CROP)
    amap = _box((CROP, CROP), crop_box).astype(np.float32)
    back = pre.to_original(amap, size)
    w, h = size
    assert back.shape == (h, w)
    expected = _box((h, w), original_box)
    np.testing.assert_array_equal(back > 0.5, expected)
    # The bilinear ramp is one pixel wide on each side of the border, nothing leaks further.
    top, bottom, left, right = original_box
    inner = _box((h, w), (top + 1, bottom - 1, left + 1, right - 1))
    outer = ~_box((h, w), (top - 1, bottom + 1, left - 1, right + 1))
    assert np.allclose(back[inner], 1.0) and np.allclose(back[outer], 0.0)


@pytest.mark.parametrize("size,crop_box,original_box", GEOMETRY)
def test_mask_and_back_projection_line_up(size, crop_box, original_box) -> None:
    pre = Preprocessor(RESIZE, CROP)
    w, h = size
    mask = _box((h, w), original_box)
    cropped = pre.mask(mask)
    assert isinstance(cropped, torch.Tensor) and cropped.shape == (CROP, CROP)
    np.testing.assert_array_equal(cropped.numpy(), _box((CROP, CROP), crop_box))
    # ... and the round trip through the map inverse gives the mask back.
    back = pre.to_original(cropped.numpy().astype(np.float32), size)
    np.testing.assert_array_equal(back > 0.5, mask)


def test_image_crop_matches_the_mask_crop() -> None:
    """The image pixels that end up at the hot crop square are those under the mask."""
    pre = Preprocessor(RESIZE, CROP, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    w, h = 300, 200
    mask = _box((h, w), (60, 100, 90, 130))
    rgb = np.zeros((h, w, 3), dtype=np.uint8)
    rgb[mask] = 255
    tensor = pre.image(Image.fromarray(rgb))
    bright = tensor[0].numpy() > 0.5
    np.testing.assert_array_equal(bright, _box((CROP, CROP), (20, 40, 10, 30)))
