"""Batches of preprocessed images (and masks) for feature extraction."""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..errors import ConfigError, DataError, PatchCoreError
from .images import check_regular_file, load_image, load_mask
from .layouts import Sample
from .preprocess import Preprocessor


@dataclass
class Batch:
    """Preprocessed images with what is needed to map results back to each file."""

    images: torch.Tensor  # V x 3 x S x S: every view of the batch's images, image by image
    paths: list[Path]
    sizes: list[tuple[int, int]]  # original (W, H)
    labels: list[int]
    groups: list[str]
    masks: list[np.ndarray] | None  # H x W bool at each image's own size, when requested
    view_counts: list[int] | None = None  # views per image (images holds all views in order)

    def __post_init__(self) -> None:
        if self.view_counts is None:
            self.view_counts = [1] * len(self.paths)


class SampleDataset(Dataset):
    """Decodes and preprocesses samples; masks of normal images are all zero."""

    def __init__(self, samples: Sequence[Sample], pre: Preprocessor, masks: bool = False) -> None:
        self.samples = list(samples)
        self.pre = pre
        self.masks = masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        try:
            return self._item(i)
        except PatchCoreError as exc:
            if get_worker_info() is None:
                raise
            # In a worker process: hand the error to the main process as data, so that
            # `batches` re-raises it as is instead of torch's multi-line worker traceback.
            return {"error": exc}

    def _item(self, i: int) -> dict:
        sample = self.samples[i]
        img = load_image(sample.path)
        item = {"views": self.pre.views(img, name=f"image {sample.path}"), "path": sample.path,
                "size": img.size, "label": sample.label, "group": sample.group}
        if self.masks:
            if sample.mask is not None:
                item["mask"] = load_mask(sample.mask, img.size)
            else:
                item["mask"] = np.zeros((img.size[1], img.size[0]), dtype=bool)
        return item


@dataclass
class _Failed:
    """What a worker's collate returns when a sample could not be loaded."""

    error: PatchCoreError


def _collate(items: list[dict]) -> Batch | _Failed:
    for it in items:
        if "error" in it:
            return _Failed(it["error"])
    return Batch(
        images=torch.cat([it["views"] for it in items]),
        paths=[it["path"] for it in items],
        sizes=[it["size"] for it in items],
        labels=[it["label"] for it in items],
        groups=[it["group"] for it in items],
        masks=[it["mask"] for it in items] if "mask" in items[0] else None,
        view_counts=[len(it["views"]) for it in items],
    )


def batches(
    samples: Sequence[Sample],
    pre: Preprocessor,
    batch_size: int,
    masks: bool = False,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """Iterate over samples in order, in batches.

    A sample that cannot be used raises its one-line DataError naming the file, with or without
    worker processes. Invalid `batch_size` / `num_workers` raise ConfigError at once.
    """
    if not _is_count(num_workers, 0):
        raise ConfigError(f"num_workers must be an integer >= 0 (0 loads images in the main "
                          f"process), got {num_workers!r}")
    if not _is_count(batch_size, 1):
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    loader = DataLoader(
        SampleDataset(samples, pre, masks), batch_size=int(batch_size), shuffle=False,
        num_workers=int(num_workers), collate_fn=_collate,
    )
    return _iterate(loader)


def _is_count(value: object, minimum: int) -> bool:
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and int(value) >= minimum)


def _iterate(loader: DataLoader) -> Iterator[Batch]:
    for batch in loader:
        if isinstance(batch, _Failed):
            err = batch.error
            raise type(err)(*err.args) from None
        yield batch


def as_samples(
    items: str | os.PathLike | Sample | Iterable[str | os.PathLike | Sample],
) -> list[Sample]:
    """Samples for one path / Sample or an iterable of them, each checked to be a usable file.

    A single str or Path is one image (never iterated character by character). Plain paths
    become unlabelled samples (label -1) grouped by their folder's name. DataError, naming the
    item, for: a missing file, a folder (use `load_dataset(folder)`), a FIFO, socket or device
    (never opened: that could block), or an object that is not a path or Sample.
    """
    if isinstance(items, (str, os.PathLike, Sample)):
        items = [items]
    elif isinstance(items, (bytes, bytearray)):
        raise DataError("got bytes where image paths were expected; pass file paths (str or "
                        "Path), or pass encoded images to predict")
    try:
        seq = list(items)
    except TypeError:
        raise DataError(f"cannot use an object of type {type(items).__name__} as a list of "
                        "images; pass a file path or a list of paths / Samples") from None
    out = []
    for k, x in enumerate(seq):
        if isinstance(x, Sample):
            check_regular_file(Path(x.path), "image")
            if x.mask is not None:
                check_regular_file(Path(x.mask), "mask")
            out.append(x)
        elif isinstance(x, (str, os.PathLike)):
            path = Path(x)
            check_regular_file(path, "image")
            out.append(Sample(path, -1, path.absolute().parent.name))
        else:
            what = "None" if x is None else f"an object of type {type(x).__name__}"
            raise DataError(f"item {k} of the image list is {what}; pass image file paths "
                            "(str or Path) or Samples")
    return out
