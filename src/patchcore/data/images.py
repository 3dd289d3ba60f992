"""Image and mask decoding (robust to 16-bit, grayscale, RGBA, palette) and the preprocessing."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError

from ..errors import DataError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale integer or float pixel data of any depth to 0-255."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
        return np.clip(array.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
    finite = np.nan_to_num(array.astype(np.float64))
    top = 1.0 if finite.max(initial=0) <= 1.0 else finite.max()
    return np.clip(finite * (255.0 / top), 0, 255).round().astype(np.uint8)


def load_image(path: str | Path) -> Image.Image:
    """Decode any supported image to 8-bit RGB; DataError naming the file when it can't."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return to_rgb(img)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except UnidentifiedImageError:
        raise DataError(f"{path} is not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"image {path} is truncated or corrupt: {exc}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (1, L, P, LA, RGBA, I;16, I, F, CMYK, ...) to 8-bit RGB."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        gray = _to_uint8(np.asarray(img))
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode in ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    array = np.asarray(img)
    if array.ndim == 3 and array.shape[2] >= 3:
        return Image.fromarray(_to_uint8(array[..., :3]), mode="RGB")
    if array.ndim == 2:
        return Image.fromarray(_to_uint8(array), mode="L").convert("RGB")
    raise DataError(f"unsupported image mode {img.mode} with shape {array.shape}")


def load_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Binary mask (H x W bool) that must have the image's `size` (W, H)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            array = np.asarray(img.convert("L") if img.mode not in ("I;16", "I", "F") else img)
    except FileNotFoundError:
        raise DataError(f"mask {path} does not exist") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"mask {path} is not a readable image: {exc}") from None
    if (array.shape[1], array.shape[0]) != tuple(size):
        raise DataError(
            f"mask {path} is {array.shape[1]}x{array.shape[0]} but its image is "
            f"{size[0]}x{size[1]}; masks must have the same size as their image"
        )
    return array > 0


class Preprocessor:
    """Resize (shorter side), center crop, normalise; and the inverse for anomaly maps."""

    def __init__(
        self,
        resize: int,
        imagesize: int,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
    ) -> None:
        self.resize = resize
        self.imagesize = imagesize
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(W, H) after resizing the shorter side to `resize`, as torchvision does."""
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

    def image(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> normalised 3 x imagesize x imagesize tensor."""
        resized = img.resize(self.resized_size(img.size), Image.BILINEAR)
        cropped = resized.crop(self.crop_box(img.size))
        array = np.asarray(cropped, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)
        return (tensor - self.mean) / self.std

    def mask(self, mask: np.ndarray) -> torch.Tensor:
        """H x W bool mask -> imagesize x imagesize bool tensor (nearest neighbour)."""
        img = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
        resized = img.resize(self.resized_size(img.size), Image.NEAREST)
        cropped = np.asarray(resized.crop(self.crop_box(img.size))) > 127
        return torch.from_numpy(cropped)

    def to_original(self, amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """An imagesize x imagesize map back onto the original image (H x W for size (W, H)).

        The crop is placed inside the resized frame, the border outside the crop repeats the
        nearest map value, and the frame is resized bilinearly to the original size.
        """
        rw, rh = self.resized_size(size)
        left, top, right, bottom = self.crop_box(size)
        t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
        t = F.pad(t, (left, rw - right, top, rh - bottom), mode="replicate")
        t = F.interpolate(t, size=(size[1], size[0]), mode="bilinear", align_corners=False)
        return t[0, 0].numpy()
