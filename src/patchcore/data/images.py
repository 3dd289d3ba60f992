"""Image and mask decoding (hardened against hostile files) and the preprocessing.

Every image enters through one of three doors, all with the same rules:

* `load_image` / `load_mask` for files,
* `to_pil_image` for what the Python API is given (PIL images, numpy arrays, encoded bytes).

The rules: only the formats in DECODABLE_FORMATS are decoded; an image declaring more than
MAX_IMAGE_PIXELS pixels is refused before its pixels are decoded (decompression bombs); the EXIF
orientation is applied, so images and masks are used as they are displayed; pixel depth is
decided by data type (see `_to_uint8`), never guessed from the values. `Preprocessor` refuses
images whose aspect ratio or resized size exceed MAX_ASPECT_RATIO / MAX_RESIZED_PIXELS before
it allocates anything. Every refusal is a one-line DataError naming the file and the fix.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ..errors import DataError, PatchCoreError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# The decoders behind IMAGE_SUFFIXES (JPEG includes multi-picture MPO files from cameras; DIB:
# headerless BMP). Nothing else is decoded, so no file can reach e.g. the EPS plugin (which
# runs Ghostscript).
DECODABLE_FORMATS = ("PNG", "JPEG", "BMP", "DIB", "TIFF", "WEBP")
# Declared pixels (W x H) above which a file is refused before decoding: Pillow's default.
MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3  # 89,478,485 (about 256 MiB of 24-bit pixels)
# Longer side / shorter side above which Preprocessor refuses an image (resizing the shorter
# side to `resize` would make the longer one huge: a 1x20000 image becomes 256x5,120,000).
MAX_ASPECT_RATIO = 20.0
# Pixels of the resized frame (before the center crop) above which Preprocessor refuses.
MAX_RESIZED_PIXELS = 40_000_000
# Float pixel data whose maximum is at most this is read as 0-1, otherwise as 0-255. A 0-255
# image whose brightest pixel is <= 1.5 is black under either reading, while 0-1 data that
# overshoots 1 slightly (resampling, arithmetic) is still read correctly.
FLOAT_UNIT_MAX = 1.5
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ARRAY_HINT = ("pass an H x W or H x W x C array (C = 1, 3 or 4) of uint8 (0-255), uint16 "
               "(0-65535), bool or float (0-1 or 0-255)")


# -- pixel depth -------------------------------------------------------------------------------


def _to_uint8(array: np.ndarray, top: float | None = None, name: str = "image") -> np.ndarray:
    """Scale pixel data to uint8 by its data type, never by the range of its values.

    * uint8 as is; bool: False -> 0, True -> 255;
    * uint16 is divided by 65535, whatever the values; other integer types need `top` (the
      maximum of the bit depth a file declares: negative values clip to 0) and are a DataError
      without it, as their range is not known;
    * floats: NaN or infinity is a DataError; data whose maximum is <= FLOAT_UNIT_MAX is read as
      0-1, otherwise as 0-255; values below 0 are clipped to 0 when they are rounding noise
      (at most one 8-bit level below 0) and are a DataError otherwise (normalised data, e.g.
      ImageNet mean/std, is not an image); values above the top are clipped.
    """
    if array.dtype == np.uint8 and top is None:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        if top is None:
            if array.dtype != np.uint16:
                raise DataError(f"{name} has pixel data of type {array.dtype}; {_ARRAY_HINT}")
            top = 65535.0
        scaled = array.astype(np.float32) * np.float32(255.0 / top)
        return np.clip(scaled, 0, 255).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise DataError(f"{name} has NaN or infinite pixel values; replace them (np.nan_to_num)"
                            " or pass finite values in 0-1 or 0-255")
        if array.size == 0:
            return np.zeros(array.shape, np.uint8)
        scale = 255.0 if float(array.max()) <= FLOAT_UNIT_MAX else 1.0
        lo = float(array.min())
        if lo * scale < -1.0:
            raise DataError(f"{name} has negative float pixel values (minimum {lo:g}); it looks "
                            "normalised: pass pixel values in 0-1 or 0-255")
        data = np.clip(array, 0.0, 255.0 / scale).astype(np.float32)  # clip first: no overflow
        return np.clip(data * np.float32(scale), 0, 255).round().astype(np.uint8)
    raise DataError(f"{name} has pixel data of type {array.dtype}; {_ARRAY_HINT}")


def _declared_depth(img: Image.Image, head: bytes) -> tuple[int, bool] | None:
    """(bits per sample, signed) as the file declares them, for 32-bit integer ("I") images."""
    if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" and len(head) > 24:
        return int(head[24]), False  # older Pillow opens 16-bit grayscale PNGs as "I"
    tags = getattr(img, "tag_v2", None)
    if tags is not None:
        try:
            bits = tags.get(258)  # BitsPerSample
            fmt = tags.get(339)  # SampleFormat: 1 unsigned, 2 signed
            bits = int(max(bits)) if isinstance(bits, tuple) else int(bits)
            fmt = int(max(fmt)) if isinstance(fmt, tuple) else int(fmt or 1)
        except (TypeError, ValueError):
            return None
        if 1 <= bits <= 32:
            return bits, fmt == 2
    return None


def to_rgb(
    img: Image.Image, depth: tuple[int, bool] | None = None, name: str = "image"
) -> Image.Image:
    """Convert any PIL mode (1, L, P, LA, RGBA, I;16, I, F, CMYK, ...) to 8-bit RGB.

    Transparent pixels become black. 16-bit modes are divided by 65535 whatever their values.
    Mode "I" (32-bit integers) is scaled by `depth` (bits, signed) when the file declared one,
    otherwise it is taken as 16-bit data (Pillow's use of "I"), values clipped to 0-65535.
    Float mode "F" follows the float rule of `_to_uint8`. `name` is what a DataError names.
    """
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("La", "RGBa"):  # premultiplied alpha: the colour bands are the composite
        bands = img.split()
        return Image.merge("RGB", [bands[0]] * 3 if img.mode == "La" else bands[:3])
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16"):
        gray = _to_uint8(np.asarray(img).astype(np.uint16), name=name)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode == "I":
        top = 65535.0
        if depth is not None:
            bits, signed = depth
            top = float(2 ** (bits - 1) - 1 if signed else 2**bits - 1)
        gray = _to_uint8(np.asarray(img), top=max(top, 1.0), name=name)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img), name=name), mode="L").convert("RGB")
    if img.mode in ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return img.convert("RGB")
    try:
        array = np.asarray(img)
    except Exception as exc:  # a mode numpy cannot take
        raise DataError(f"{name} has an unsupported mode {img.mode} ({exc}); convert it to "
                        "RGB") from None
    if array.ndim == 3 and array.shape[2] >= 3:
        return Image.fromarray(_to_uint8(array[..., :3], name=name), mode="RGB")
    if array.ndim == 2:
        return Image.fromarray(_to_uint8(array, name=name), mode="L").convert("RGB")
    raise DataError(f"{name} has an unsupported mode {img.mode} with shape {array.shape}; "
                    "convert it to RGB")


# -- decoding ----------------------------------------------------------------------------------


def check_regular_file(path: Path, what: str = "image") -> None:
    """DataError unless `path` is an existing regular file; never opens it (a FIFO would block)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise DataError(f"{what} {path} cannot be read (permission denied)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{what} {path} cannot be used as a file path: {exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{what} {path} is a folder, not an image: pass its image files, or "
                        f"load_dataset({str(path)!r}) for a dataset folder")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{what} {path} is not a regular file (a FIFO, socket or device); "
                        "copy the image to a regular file")


def _check_declared_pixels(size: tuple[int, int], name: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise DataError(f"{name} is {w}x{h} pixels: an image needs at least 1x1")
    if w * h > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{name} declares {w}x{h} = {w * h:,} pixels, more than the limit of "
            f"{MAX_IMAGE_PIXELS:,} (MAX_IMAGE_PIXELS; a decompression bomb or an image too large "
            "to score): downscale or tile it"
        )


def _decode(source: Path | bytes, name: str) -> tuple[Image.Image, tuple[int, bool] | None]:
    """Open, check the declared size, decode fully and orient one image (no mode conversion).

    `name` is how messages name the source ("image x.png", "mask y.png", "image bytes").
    """
    if isinstance(source, Path):
        try:
            with open(source, "rb") as fh:
                head = fh.read(32)
        except OSError as exc:
            raise DataError(f"{name} cannot be read: {exc.strerror or exc}") from None
        fp: Any = source
    else:
        head = source[:32]
        fp = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp, formats=DECODABLE_FORMATS) as img:
                _check_declared_pixels(img.size, name)
                depth = _declared_depth(img, head) if img.mode == "I" else None
                img.load()
                oriented = _oriented(img)
                if oriented is img:  # must outlive the `with` block
                    oriented = img.copy()
                _check_declared_pixels(oriented.size, name)
                return oriented, depth
    except PatchCoreError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Raised by Pillow's own check (Image.MAX_IMAGE_PIXELS) before ours could run.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f"{int(found.group(1)):,} pixels" if found else "more pixels"
        limit = min(MAX_IMAGE_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_IMAGE_PIXELS)
        raise DataError(
            f"{name} declares {declared}, more than the limit of {limit:,} "
            "(MAX_IMAGE_PIXELS; a decompression bomb or an image too large to score): "
            "downscale or tile it"
        ) from None
    except Image.UnidentifiedImageError:
        raise DataError(f"{name} is not a readable image (unknown or corrupt format; decodable: "
                        f"{', '.join(DECODABLE_FORMATS)})") from None
    except MemoryError:
        raise DataError(f"{name} is too large to decode in the available memory") from None
    except Exception as exc:  # a hostile file can make a decoder raise almost anything
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{name} is truncated or corrupt: {detail}") from None


def _oriented(img: Image.Image) -> Image.Image:
    """The image as displayed (EXIF orientation applied); unreadable EXIF keeps it as stored."""
    try:
        out = ImageOps.exif_transpose(img)
    except Exception:  # corrupt EXIF: the stored orientation is the only one known
        return img
    return img if out is None else out


def load_image(path: str | Path) -> Image.Image:
    """Decode any supported image to 8-bit RGB as displayed; DataError naming the file if not."""
    path = Path(path)
    check_regular_file(path, "image")
    img, depth = _decode(path, f"image {path}")
    return _rgb(img, depth, f"image {path}")


def _rgb(img: Image.Image, depth: tuple[int, bool] | None, name: str) -> Image.Image:
    try:
        return to_rgb(img, depth, name)
    except PatchCoreError:
        raise
    except (ValueError, OSError) as exc:
        raise DataError(f"{name} cannot be converted to RGB: {exc}") from None


def load_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Binary mask (H x W bool, as displayed) that must have the image's `size` (W, H).

    Every non-zero pixel is foreground; a mask with an alpha channel uses its gray value.
    """
    path = Path(path)
    check_regular_file(path, "mask")
    img, _ = _decode(path, f"mask {path}")
    try:
        if img.mode.startswith("I;16") or img.mode in ("I", "F"):
            array = np.asarray(img)
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise DataError(f"mask {path} has NaN or infinite values; save it as 8-bit")
        else:
            array = np.asarray(img.convert("L"))
    except ValueError as exc:
        raise DataError(f"mask {path} has an unsupported mode {img.mode}: {exc}") from None
    if (array.shape[1], array.shape[0]) != tuple(size):
        raise DataError(
            f"mask {path} is {array.shape[1]}x{array.shape[0]} but its image is "
            f"{size[0]}x{size[1]}; masks must have the same size as their image"
        )
    return array > 0


# -- Python API inputs -------------------------------------------------------------------------


def to_pil_image(x: Any) -> Image.Image:
    """An 8-bit RGB PIL image from what the Python API accepts as one image.

    * a PIL image (any mode; its EXIF orientation is applied, as for files);
    * a numpy array H x W or H x W x C, C in 1, 3, 4 (RGBA: transparent pixels become black),
      of uint8, uint16, bool or float; depth by data type as `_to_uint8` describes;
    * `bytes` / `bytearray` holding an encoded image file (decoded like a file);
    * a path (str or Path) to an image file (`load_image`).

    Anything else, an empty, closed or oversized image is a DataError saying what to pass.
    """
    if isinstance(x, Image.Image):
        return _pil_to_rgb(x)
    if isinstance(x, np.ndarray):
        return _array_to_rgb(x)
    if isinstance(x, (bytes, bytearray, memoryview)):
        data = bytes(x)
        if not data:
            raise DataError("image bytes are empty; pass the content of an image file")
        img, depth = _decode(data, "image bytes")
        return _rgb(img, depth, "image bytes")
    if isinstance(x, (str, os.PathLike)):
        return load_image(x)
    what = "None" if x is None else f"an object of type {type(x).__name__}"
    raise DataError(f"cannot use {what} as an image; pass a file path, a PIL image, encoded "
                    "image bytes, or a numpy array (H x W or H x W x 1/3/4)")


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    name = f"PIL image ({img.mode})"
    _check_declared_pixels(img.size, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except ValueError as exc:
        if "closed" in str(exc):
            raise DataError("the PIL image is closed; pass it before closing it (or pass "
                            "img.copy() made inside the `with Image.open(...)` block)") from None
        raise DataError(f"{name} cannot be decoded: {exc}") from None
    except MemoryError:
        raise DataError(f"{name} is too large to decode in the available memory") from None
    except Exception as exc:  # a lazily opened file that turns out corrupt
        raise DataError(f"{name} cannot be decoded: {exc}") from None
    return _rgb(_oriented(img), None, name)


def _array_to_rgb(x: np.ndarray) -> Image.Image:
    name = f"image array of shape {x.shape} and dtype {x.dtype}"
    kind, width = x.dtype.kind, x.dtype.itemsize
    if not (kind == "b" or (kind == "u" and width <= 2) or (kind == "f" and width <= 8)):
        raise DataError(f"cannot use an {name}; {_ARRAY_HINT}")
    if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] not in (1, 3, 4)):
        raise DataError(f"cannot use an {name}; {_ARRAY_HINT}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"cannot use an empty {name}; it needs at least 1x1 pixels")
    _check_declared_pixels((x.shape[1], x.shape[0]), name)
    arr = x[..., 0] if x.ndim == 3 and x.shape[2] == 1 else x
    arr = np.ascontiguousarray(_to_uint8(arr.astype(arr.dtype.newbyteorder("="), copy=False),
                                         name=name))
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L").convert("RGB")
    if arr.shape[2] == 4:
        return to_rgb(Image.fromarray(arr, mode="RGBA"))
    return Image.fromarray(arr, mode="RGB")


def image_size(path: str | Path) -> tuple[int, int]:
    """(W, H) of an image file as displayed (EXIF orientation applied), read from its header."""
    path = Path(path)
    check_regular_file(path, "image")
    try:
        with Image.open(path, formats=DECODABLE_FORMATS) as img:
            w, h = img.size
            try:
                turned = img.getexif().get(0x0112) in (5, 6, 7, 8)
            except Exception:  # corrupt EXIF: as stored, the same rule as `_oriented`
                turned = False
    except Exception:  # noqa: BLE001 - the full decode names the exact problem
        load_image(path)
        raise DataError(f"image {path} is not a readable image") from None
    return (h, w) if turned else (w, h)

