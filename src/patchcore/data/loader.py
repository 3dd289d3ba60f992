"""Batches of preprocessed images (and masks) for feature extraction."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .images import Preprocessor, load_image, load_mask
from .layouts import Sample


@dataclass
class Batch:
    """Preprocessed images with what is needed to map results back to each file."""

    images: torch.Tensor  # B x 3 x S x S
    paths: list[Path]
    sizes: list[tuple[int, int]]  # original (W, H)
    labels: list[int]
    groups: list[str]
    masks: torch.Tensor | None  # B x S x S bool, when masks were requested


class SampleDataset(Dataset):
    """Decodes and preprocesses samples; masks of normal images are all zero."""

    def __init__(self, samples: Sequence[Sample], pre: Preprocessor, masks: bool = False) -> None:
        self.samples = list(samples)
        self.pre = pre
        self.masks = masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        img = load_image(sample.path)
        item = {"image": self.pre.image(img), "path": sample.path, "size": img.size,
                "label": sample.label, "group": sample.group}
        if self.masks:
            if sample.mask is not None:
                item["mask"] = self.pre.mask(load_mask(sample.mask, img.size))
            else:
                item["mask"] = torch.zeros(self.pre.imagesize, self.pre.imagesize, dtype=torch.bool)
        return item


def _collate(items: list[dict]) -> Batch:
    return Batch(
        images=torch.stack([it["image"] for it in items]),
        paths=[it["path"] for it in items],
        sizes=[it["size"] for it in items],
        labels=[it["label"] for it in items],
        groups=[it["group"] for it in items],
        masks=torch.stack([it["mask"] for it in items]) if "mask" in items[0] else None,
    )


def batches(
    samples: Sequence[Sample],
    pre: Preprocessor,
    batch_size: int,
    masks: bool = False,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """Iterate over samples in order, in batches."""
    loader = DataLoader(
        SampleDataset(samples, pre, masks), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, collate_fn=_collate,
    )
    yield from loader


def samples_from_paths(paths: Sequence[str | Path]) -> list[Sample]:
    """Unlabelled samples for plain files (label -1: unknown)."""
    return [Sample(Path(p), -1, Path(p).parent.name) for p in paths]
