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
from .loader import as_samples
from .preprocess import Preprocessor

__all__ = [
    "MVTEC_CATEGORIES", "DatasetSplit", "Preprocessor", "Sample", "as_samples",
    "category_folders", "detect_layout", "list_images", "load_dataset", "load_image", "load_mask",
    "to_pil_image",
]
