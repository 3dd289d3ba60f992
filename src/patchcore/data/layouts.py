"""Dataset layouts on disk (MVTec AD, validation split, plain folders) -> lists of samples."""

from __future__ import annotations

import glob
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "mvtec", "val", "folder", "test")
MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
    "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)


@dataclass(frozen=True)
class Sample:
    """One image: its path, label (0 normal, 1 anomalous), group name and optional mask path."""

    path: Path
    label: int
    group: str
    mask: Path | None = None


@dataclass
class DatasetSplit:
    """Train (normal only), optional validation and test samples of one category."""

    name: str
    root: Path
    layout: str
    train: list[Sample]
    test: list[Sample] = field(default_factory=list)
    val: list[Sample] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        """True when every anomalous test image has a ground-truth mask."""
        bad = [s for s in self.test if s.label == 1]
        return bool(bad) and all(s.mask is not None for s in bad)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (sorted), optionally in all subfolders.

    Only regular files count; hidden files ("._x.png" from macOS) and files inside hidden
    folders (".ipynb_checkpoints", ".cache", ...) are never listed. Symlinked folders are
    followed, each real folder visited once (a link back up the tree is not a loop).
    """
    if not folder.is_dir():
        return []
    if not recursive:
        return sorted(p for p in folder.iterdir() if not _hidden(p.name)
                      and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []  # reached again through a link: already listed
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        found += [Path(top) / f for f in files if not _hidden(f)
                  and Path(f).suffix.lower() in IMAGE_SUFFIXES and (Path(top) / f).is_file()]
    return sorted(found)


def _category_name(root: Path) -> str:
    """The category's name from the resolved folder ("." inside bottle/ is "bottle")."""
    name = root.resolve().name
    if name in ("", ".", ".."):
        raise DataError(f"dataset folder {root} has no name to call its category by (it is the "
                        "filesystem root); move the category into a named folder")
    return name


def _require(images: list[Path], folder: Path, what: str) -> list[Path]:
    if not images:
        raise DataError(
            f"{what} folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); "
            "check the dataset path, --layout and category name"
        )
    return images


def _labelled_groups(
    folder: Path, normal: str, gt_root: Path | None, recursive: bool
) -> list[Sample]:
    samples: list[Sample] = []
    if not folder.is_dir():
        return samples
    for group_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not _hidden(p.name)):
        label = 0 if group_dir.name == normal else 1
        for path in list_images(group_dir, recursive=recursive):
            group = path.parent.relative_to(folder).as_posix() if recursive else group_dir.name
            mask = None
            if label and gt_root is not None:
                candidate = gt_root / group_dir.name / f"{path.stem}_mask.png"
                if not candidate.is_file():
                    pattern = f"{glob.escape(path.stem)}_mask.*"  # stems like "a[1]" too
                    matches = sorted((gt_root / group_dir.name).glob(pattern))
                    candidate = matches[0] if matches else candidate
                mask = candidate if candidate.is_file() else None
            samples.append(Sample(path, label, group, mask))
    return samples


def load_mvtec(root: Path, normal: str = "good") -> DatasetSplit:
    """MVTec AD: train/good, test/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png."""
    train = _require(list_images(root / "train" / normal), root / "train" / normal, "training")
    test = _labelled_groups(root / "test", normal, root / "ground_truth", recursive=False)
    missing = [s.path for s in test if s.label == 1 and s.mask is None]
    if missing and (root / "ground_truth").is_dir():
        log.warning("%d anomalous test images of %s have no mask, e.g. %s", len(missing), root,
                    missing[0])
    return DatasetSplit(
        _category_name(root), root, "mvtec", [Sample(p, 0, normal) for p in train], test
    )


def load_val_layout(root: Path, normal: str = "good") -> DatasetSplit:
    """train/good, val/{good,<defects>}, test/{good,<defects>} (+ optional ground_truth)."""
    split = load_mvtec(root, normal)
    gt = root / "ground_truth"
    split.val = _labelled_groups(root / "val", normal, gt if gt.is_dir() else None, False)
    split.layout = "val"
    return split


def load_folder(root: Path, normal: str = "good") -> DatasetSplit:
    """train/<normal>/..., test/<normal>/..., test/<other>/... at any depth; image labels only."""
    train_dir = root / "train" / normal
    train = _require(list_images(train_dir, recursive=True), train_dir, "training")
    test = _labelled_groups(root / "test", normal, None, recursive=True)
    return DatasetSplit(
        _category_name(root), root, "folder", [Sample(p, 0, normal) for p in train], test
    )


def load_test_only(root: Path, normal: str = "good") -> DatasetSplit:
    """Test images only (for evaluating a fitted model): ROOT/test/<group>/... at any depth, or
    ROOT/<group>/... when there is no test/ folder; `normal` names the normal group."""
    folder = root / "test" if (root / "test").is_dir() else root
    test = _labelled_groups(folder, normal, None, recursive=True)
    if not test:
        raise DataError(f"{folder} has no images in group folders ({', '.join(IMAGE_SUFFIXES)});"
                        " expected test/<group>/... with one group named after --normal")
    return DatasetSplit(_category_name(root), root, "test", [], test)


def detect_layout(root: Path) -> str:
    """Guess the layout of a category folder; DataError when it is ambiguous or unknown."""
    if not (root / "train").is_dir():
        if (root / "test").is_dir():
            return "test"
        raise DataError(f"{root} has no train/ folder; expected a category folder of an "
                        "MVTec-style dataset (train/good, test/...), or test/<group>/... to "
                        "evaluate a fitted model on")
    if (root / "val").is_dir():
        return "val"
    if (root / "ground_truth").is_dir():
        return "mvtec"
    nested = any(
        p.is_dir() and not _hidden(p.name)
        for group in (root / "test").glob("*") if group.is_dir() and not _hidden(group.name)
        for p in group.iterdir()
    ) if (root / "test").is_dir() else False
    nested = nested or any(
        p.is_dir() and not _hidden(p.name) and not _hidden(p.parent.name)
        for p in (root / "train").glob("*/*")
    )
    if nested:
        return "folder"
    return "mvtec"


def load_dataset(
    root: str | Path,
    layout: str = "auto",
    normal: str = "good",
    train_val_split: float = 1.0,
    seed: int = 0,
) -> DatasetSplit:
    """Load one category folder in the given (or detected) layout.

    The category is named after the resolved folder, so "." inside bottle/ is "bottle".
    `train_val_split` < 1 moves the rest of the normal training images into the validation set.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    _category_name(root)
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    chosen = detect_layout(root) if layout == "auto" else layout
    loader = {"mvtec": load_mvtec, "val": load_val_layout, "folder": load_folder,
              "test": load_test_only}[chosen]
    split = loader(root, normal)
    if train_val_split < 1.0:
        if not 0.0 < train_val_split < 1.0:
            raise DataError("--train-val-split must be in (0, 1)")
        shuffled = split.train[:]
        random.Random(seed).shuffle(shuffled)
        keep = max(1, int(round(len(shuffled) * train_val_split)))
        split.train = sorted(shuffled[:keep], key=lambda s: s.path)
        split.val = split.val + sorted(shuffled[keep:], key=lambda s: s.path)
    log.info("%s (%s): %d train, %d val, %d test images", split.name, chosen, len(split.train),
             len(split.val), len(split.test))
    return split


def category_folders(data: str | Path, categories: list[str] | None) -> list[Path]:
    """The category folders to use: the named ones under `data`, or `data` itself, or all.

    Discovered categories are the non-hidden subfolders of `data` that have a train/ folder.
    """
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"dataset folder {data} does not exist")
    if categories:
        folders = []
        for c in categories:
            if c in ("", ".", "..") or "/" in c or "\\" in c:
                raise DataError(f"category {c!r} is not a category name; name a folder directly "
                                f"under {data}, e.g. --category bottle")
            folder = data / c
            if not folder.is_dir():
                raise DataError(f"category {c!r} not found: {folder} does not exist")
            folders.append(folder)
        return folders
    if (data / "train").is_dir():
        _category_name(data)
        return [data]
    found = sorted(
        p for p in data.iterdir() if not _hidden(p.name) and (p / "train").is_dir()
    )
    if not found:
        raise DataError(f"{data} has neither a train/ folder nor category folders containing one;"
                        " pass a category folder (with train/good) or the dataset folder above")
    return found


def image_items(images: object) -> list:
    """`images` as a non-empty list of single images: one path, Sample, PIL image, H x W(xC)
    array or encoded bytes becomes a list of one; a list or other iterable of them is listed."""
    import numpy as np
    from PIL import Image

    if isinstance(images, (str, os.PathLike, Sample, Image.Image, bytes, bytearray)) or (
        isinstance(images, np.ndarray) and images.ndim in (2, 3)
    ):
        return [images]
    try:
        items = list(images)  # type: ignore[call-overload]
    except TypeError:
        raise DataError(f"cannot use an object of type {type(images).__name__} as images; "
                        "pass a path, a PIL image, an array, encoded bytes, or a list of them"
                        ) from None
    if not items:
        raise DataError("predict() got no images; pass a path, an image or a list of them")
    return items
