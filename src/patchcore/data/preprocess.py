"""Preprocessing: an image -> square views for the backbone, and view maps -> one map of the image.

Every mode cuts an image into one or more views, each a box of the original image resized to
imagesize x imagesize:

* ``crop``: the paper's shorter-side resize to `resize` and centre crop to `imagesize` (one view;
  the rest of the image is never seen). Kept to reproduce MVTec AD numbers.
* ``square``: the whole image resized to imagesize x imagesize (one view).
* ``aspect``: the shorter side resized to imagesize, the longer side covered by overlapping
  imagesize squares (at least a quarter overlap): the whole image, undistorted.
* ``tile``: overlapping tiles of `tile_size` original pixels every `tile_stride` pixels, each
  resized to imagesize (large images, small defects).

With `standardize`, an image's views are shifted and scaled together to a fixed mean and
contrast, so that a brighter or flatter exposure of a normal part looks like the training images
to the backbone.

`to_original` turns a view's anomaly maps back into one map of the whole original image: the
crop mode pads the crop with its border values, the others stitch the views (bilinear, and the
mean where views overlap).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..errors import DataError
from .images import MAX_ASPECT_RATIO, MAX_RESIZED_PIXELS, to_rgb
from .resample import resize_bilinear, sample_bilinear

if TYPE_CHECKING:  # torch is imported where tensors are made: geometry and maps need only numpy
    import torch

MODES = ("crop", "square", "aspect", "tile")
MIN_OVERLAP = 0.25  # aspect mode: share of a view shared with its neighbour, at least
MAX_VIEWS = 1024  # views of one image (each imagesize x imagesize): a memory bound


def _count(length: float, window: float, stride: float | None) -> int:
    """len(_positions(...)) without building the list."""
    if length <= window:
        return 1
    step = stride if stride is not None else window * (1.0 - MIN_OVERLAP)
    return math.ceil((length - window) / step) + 1


def _positions(length: float, window: float, stride: float | None) -> list[float]:
    """Start offsets of windows covering [0, length], the last one flush with the end."""
    if length <= window:
        return [0.0]
    step = stride if stride is not None else window * (1.0 - MIN_OVERLAP)
    n = math.ceil((length - window) / step) + 1
    return [(length - window) * k / (n - 1) for k in range(n)]


# Standardized images get the mean and spread of a typical ImageNet photo (in [0, 1]), the
# inputs the pretrained backbones know; an image flatter than STD_FLOOR is stretched at most
# to it, not up to its sensor noise.
STANDARD_MEAN = 0.45
STANDARD_STD = 0.225
STD_FLOOR = 0.02


def standardize(views: np.ndarray) -> np.ndarray:
    """An image's views (V x C x H x W in [0, 1]) shifted and scaled together so that their
    pixels have mean STANDARD_MEAN and standard deviation STANDARD_STD over all channels
    (colour ratios kept; values may leave [0, 1])."""
    mean = float(views.mean(dtype=np.float64))
    out = views - np.float32(mean)
    std = max(math.sqrt(float(np.mean(np.square(out), dtype=np.float64))), STD_FLOOR)
    out *= np.float32(STANDARD_STD / std)  # in place: ~0.17 ms for a 224 x 224 view, not 0.29
    out += np.float32(STANDARD_MEAN)
    return out


class Preprocessor:
    """Views of an image for the backbone (RGB in [0, 1], then (x - mean) / std), and back."""

    def __init__(
        self,
        resize: int,
        imagesize: int,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
        mode: str = "crop",
        tile_size: int | None = None,
        tile_stride: int | None = None,
        standardize: bool = False,
    ) -> None:
        if mode not in MODES:
            raise DataError(f"unknown preprocessing mode {mode!r}; choose one of {MODES}")
        self.resize = resize
        self.imagesize = imagesize
        self.mode = mode
        self.tile_size = tile_size or 2 * imagesize
        self.tile_stride = tile_stride or self.tile_size // 2
        self.standardize = standardize
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    # -- geometry -------------------------------------------------------------------------------

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(W, H) after resizing the shorter side to `resize` (crop mode), as torchvision does."""
        w, h = size
        if w <= h:
            return self.resize, int(self.resize * h / w)
        return int(self.resize * w / h), self.resize

    def crop_box(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the center crop within the resized image."""
        rw, rh = self.resized_size(size)
        top = int(round((rh - self.imagesize) / 2.0))
        left = int(round((rw - self.imagesize) / 2.0))
        return left, top, left + self.imagesize, top + self.imagesize

    def _aspect_size(self, size: tuple[int, int]) -> tuple[int, int]:
        w, h = size
        scale = self.imagesize / min(w, h)
        return max(self.imagesize, round(w * scale)), max(self.imagesize, round(h * scale))

    def boxes(self, size: tuple[int, int]) -> np.ndarray:
        """V x 4 boxes (left, top, right, bottom) in original pixels, one per view."""
        w, h = size
        if self.mode == "crop":
            rw, rh = self.resized_size(size)
            left, top, right, bottom = self.crop_box(size)
            sx, sy = w / rw, h / rh
            return np.array([[left * sx, top * sy, right * sx, bottom * sy]])
        if self.mode == "square":
            return np.array([[0.0, 0.0, float(w), float(h)]])
        if self.mode == "aspect":
            aw, ah = self._aspect_size(size)
            sx, sy = w / aw, h / ah
            s = self.imagesize
            return np.array([[round(x) * sx, round(y) * sy, (round(x) + s) * sx,
                              (round(y) + s) * sy]
                             for y in _positions(ah, s, None) for x in _positions(aw, s, None)])
        t, d = self.tile_size, self.tile_stride
        tw, th = min(t, w), min(t, h)
        return np.array([[round(x), round(y), round(x) + tw, round(y) + th]
                         for y in _positions(h, th, d) for x in _positions(w, tw, d)],
                        dtype=np.float64)

    def num_views(self, size: tuple[int, int]) -> int:
        """How many views an image of `size` (W, H) gives."""
        if self.mode in ("crop", "square"):
            return 1
        w, h = size
        if self.mode == "aspect":
            aw, ah = self._aspect_size(size)
            s = self.imagesize
            return _count(aw, s, None) * _count(ah, s, None)
        t, d = self.tile_size, self.tile_stride
        return _count(w, min(t, w), d) * _count(h, min(t, h), d)

    def check_size(self, size: tuple[int, int], name: str | Path | None = None) -> None:
        """DataError (naming `name`) when an image of `size` (W, H) would be too costly.

        Refused: an empty image, an aspect ratio above MAX_ASPECT_RATIO, or a resized frame of
        more than MAX_RESIZED_PIXELS pixels. Called before anything is allocated.
        """
        label = str(name) if name is not None else "an image"
        w, h = int(size[0]), int(size[1])
        if w < 1 or h < 1:
            raise DataError(f"{label} is {w}x{h} pixels: an image needs at least 1x1")
        ratio = max(w, h) / min(w, h)
        if ratio > MAX_ASPECT_RATIO:
            raise DataError(
                f"{label} is {w}x{h}, an aspect ratio of {ratio:.0f}:1, above the limit of "
                f"{MAX_ASPECT_RATIO:g}:1 (MAX_ASPECT_RATIO): crop it into tiles before scoring"
            )
        views = self.num_views((w, h))
        if views > MAX_VIEWS:
            raise DataError(
                f"{label} is {w}x{h} and would give {views:,} views of {self.imagesize}x"
                f"{self.imagesize}, above the limit of {MAX_VIEWS:,} (MAX_VIEWS): raise "
                "--tile-size / --tile-stride or downscale the image"
            )
        rw, rh = self.resized_size((w, h)) if self.mode == "crop" else (
            self._aspect_size((w, h)) if self.mode == "aspect" else (w, h))
        if rw * rh > MAX_RESIZED_PIXELS:
            raise DataError(
                f"{label} is {w}x{h} and would be {rw}x{rh} after resizing, above the limit of "
                f"{MAX_RESIZED_PIXELS:,} pixels (MAX_RESIZED_PIXELS): crop it into tiles or "
                "lower resize"
            )

    # -- images ---------------------------------------------------------------------------------

    def view_images(self, img: Image.Image, name: str | Path | None = None) -> list[Image.Image]:
        """The imagesize x imagesize RGB views of an image, in `boxes` order."""
        self.check_size(img.size, name)
        if img.mode != "RGB":
            img = to_rgb(img)
        s = self.imagesize
        if self.mode == "crop":
            resized = img.resize(self.resized_size(img.size), Image.BILINEAR)
            return [resized.crop(self.crop_box(img.size))]
        if self.mode == "square":
            return [img.resize((s, s), Image.BILINEAR)]
        if self.mode == "aspect":
            aw, ah = self._aspect_size(img.size)
            resized = img.resize((aw, ah), Image.BILINEAR)
            return [resized.crop((round(x), round(y), round(x) + s, round(y) + s))
                    for y in _positions(ah, s, None) for x in _positions(aw, s, None)]
        return [img.crop(tuple(int(v) for v in box)).resize((s, s), Image.BILINEAR)
                for box in self.boxes(img.size)]

    def view_arrays(self, img: Image.Image, name: str | Path | None = None) -> np.ndarray:
        """V x 3 x imagesize x imagesize normalised float32 arrays of the image's views
        (standardized together first, when `standardize`)."""
        arrays = np.stack([np.asarray(v, dtype=np.float32) / 255.0
                           for v in self.view_images(img, name)]).transpose(0, 3, 1, 2)
        if self.standardize:
            arrays = standardize(arrays)
        return (arrays - self.mean) / self.std

    def views(self, img: Image.Image, name: str | Path | None = None) -> torch.Tensor:
        """V x 3 x imagesize x imagesize normalised tensors of the image's views."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.view_arrays(img, name)))

    def image(self, img: Image.Image, name: str | Path | None = None) -> torch.Tensor:
        """The first view (3 x imagesize x imagesize): the only one in crop and square modes."""
        return self.views(img, name)[0]

    def mask(self, mask: np.ndarray, name: str | Path | None = None) -> torch.Tensor:
        """H x W bool mask -> its first view, imagesize x imagesize bool (nearest neighbour)."""
        import torch

        size = (mask.shape[1], mask.shape[0])
        self.check_size(size, name if name is not None else "a mask")
        img = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
        if self.mode == "crop":
            resized = img.resize(self.resized_size(img.size), Image.NEAREST)
            return torch.from_numpy(np.asarray(resized.crop(self.crop_box(img.size))) > 127)
        box = tuple(int(round(v)) for v in self.boxes(size)[0])
        view = img.crop(box).resize((self.imagesize, self.imagesize), Image.NEAREST)
        return torch.from_numpy(np.asarray(view) > 127)

    # -- maps -----------------------------------------------------------------------------------

    def to_original(
        self, amap: np.ndarray, size: tuple[int, int], name: str | Path | None = None
    ) -> np.ndarray:
        """An image's view maps (V x S x S, or one S x S map) as one H x W map of the original.

        Crop mode places the crop inside the resized frame, repeats the border outside it and
        resizes bilinearly; the other modes sample each view bilinearly inside its box and
        average where views overlap. Sizes the preprocessing refuses are refused here too.
        """
        self.check_size(size, name if name is not None else f"an image of size {size}")
        maps = np.asarray(amap, dtype=np.float32)
        maps = maps[None] if maps.ndim == 2 else maps
        w, h = size
        if self.mode == "crop":
            rw, rh = self.resized_size(size)
            left, top, right, bottom = self.crop_box(size)
            padded = np.pad(maps[0], ((top, rh - bottom), (left, rw - right)), mode="edge")
            return resize_bilinear(padded, (h, w))
        boxes = self.boxes(size)
        if len(boxes) != len(maps):
            raise DataError(f"{len(maps)} view maps for an image with {len(boxes)} views")
        if len(boxes) == 1 and tuple(boxes[0]) == (0.0, 0.0, float(w), float(h)):
            return resize_bilinear(maps[0], (h, w))
        total = np.zeros((h, w), dtype=np.float64)
        count = np.zeros((h, w), dtype=np.float64)
        for view, (left, top, right, bottom) in zip(maps, boxes, strict=True):
            x0, x1 = max(0, math.floor(left)), min(w, math.ceil(right))
            y0, y1 = max(0, math.floor(top)), min(h, math.ceil(bottom))
            xs = (np.arange(x0, x1) + 0.5 - left) / (right - left) * 2 - 1
            ys = (np.arange(y0, y1) + 0.5 - top) / (bottom - top) * 2 - 1
            inside_x, inside_y = np.abs(xs) <= 1, np.abs(ys) <= 1
            sampled = sample_bilinear(view, xs, ys)
            weight = np.outer(inside_y, inside_x)
            total[y0:y1, x0:x1] += sampled * weight
            count[y0:y1, x0:x1] += weight
        return (total / np.maximum(count, 1)).astype(np.float32)
