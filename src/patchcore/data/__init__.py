"""Data: layouts on disk, image decoding and preprocessing, generated demo datasets."""

from .images import load_image, load_mask, to_pil_image
from .layouts import (
    MVTEC_CATEGORIES,
    DatasetSplit,
    Sample,
    category_folders,
    detect_layout,
    list_images,
    load_dataset,
)
from .preprocess import Preprocessor


def __getattr__(name: str):  # the loader imports torch: resolved on first use
    if name == "as_samples":
        from .loader import as_samples

        return as_samples
    raise AttributeError(f"module 'patchcore.data' has no attribute {name!r}")


__all__ = [
    "MVTEC_CATEGORIES", "DatasetSplit", "Preprocessor", "Sample", "as_samples",
    "category_folders", "detect_layout", "list_images", "load_dataset", "load_image", "load_mask",
    "to_pil_image",
]
