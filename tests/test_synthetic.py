"""Tests for the synthetic dataset generator (patchcore.data.synthetic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from patchcore.data.synthetic import (
    DEFECTS,
    TEXTURES,
    make_synthetic_dataset,
    make_texture,
    paste_defect,
)


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _stats(image: np.ndarray) -> np.ndarray:
    """Colour and texture summary: channel means and stds, mean absolute gradients."""
    f = image.astype(np.float64) / 255.0
    grad_y = np.abs(np.diff(f, axis=0)).mean()
    grad_x = np.abs(np.diff(f, axis=1)).mean()
    return np.concatenate([f.mean(axis=(0, 1)), f.std(axis=(0, 1)), [grad_y, grad_x]])


# --------------------------------------------------------------------------------------
# textures and defects
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TEXTURES)
def test_make_texture_shape_dtype_and_size_tuple(kind: str) -> None:
    image = make_texture(np.random.default_rng(0), (96, 128), kind)
    assert image.shape == (96, 128, 3) and image.dtype == np.uint8
    assert image.std() > 5  # a texture, not a flat colour
    if kind == "tile":
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_make_texture_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown texture"):
        make_texture(np.random.default_rng(0), 64, "marble")


def test_textures_alike_within_kind_and_distinct_between_kinds() -> None:
    samples = {
        kind: np.array(
            [_stats(make_texture(np.random.default_rng(i), 128, kind)) for i in range(4)]
        )
        for kind in TEXTURES
    }
    centres = {kind: s.mean(axis=0) for kind, s in samples.items()}
    for kind, stats in samples.items():
        spread = np.linalg.norm(stats - centres[kind], axis=1).max()
        nearest_other = min(
            np.linalg.norm(centres[kind] - c) for k, c in centres.items() if k != kind
        )
        assert spread < nearest_other / 3, kind
        # random phase and noise: no two samples are identical
        images = [make_texture(np.random.default_rng(i), 64, kind) for i in range(2)]
        assert not np.array_equal(images[0], images[1])


@pytest.mark.parametrize("kind", DEFECTS)
@pytest.mark.parametrize("texture", TEXTURES)
def test_paste_defect_mask_covers_exactly_the_changed_pixels(texture: str, kind: str) -> None:
    for seed in range(3):
        image = make_texture(np.random.default_rng(seed), 128, texture)
        original = image.copy()
        out, mask = paste_defect(np.random.default_rng(seed + 10), image, kind)
        assert np.array_equal(image, original)  # input untouched
        assert out.shape == image.shape and out.dtype == np.uint8
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}
        changed = (out != image).any(axis=-1)
        inside = mask > 0
        assert not changed[~inside].any(), "pixels outside the mask were modified"
        # the mask is the changed area dilated by at most a couple of pixels
        grown = ndimage.binary_dilation(changed, structure=np.ones((3, 3)), iterations=2)
        assert not (inside & ~grown).any()
        # a visible defect: large intensity change on the defect pixels
        diff = np.abs(out.astype(int) - image.astype(int)).sum(axis=-1)
        assert diff[inside].mean() > 30


def test_paste_defect_grayscale_input_and_errors() -> None:
    gray = make_texture(np.random.default_rng(0), 64, "tile")[..., 0]
    out, mask = paste_defect(np.random.default_rng(1), gray, "spot")
    assert out.shape == gray.shape and mask.shape == gray.shape
    assert not (out != gray)[mask == 0].any() and (out != gray).any()
    with pytest.raises(ValueError, match="unknown defect"):
        paste_defect(np.random.default_rng(0), gray, "dent")
    with pytest.raises(ValueError, match="uint8"):
        paste_defect(np.random.default_rng(0), gray.astype(float), "spot")


# --------------------------------------------------------------------------------------
# datasets on disk
# --------------------------------------------------------------------------------------


def test_mvtec_layout(tmp_path: Path) -> None:
    root = make_synthetic_dataset(
        tmp_path / "ds",
        categories=("carpet", "tile"),
        n_train=5,
        n_test_good=3,
        n_test_defect=5,
        size=64,
        defects=("scratch", "spot", "crack"),
    )
    assert root == tmp_path / "ds"
    for category in ("carpet", "tile"):
        base = root / category
        assert sorted(p.name for p in base.iterdir()) == ["ground_truth", "test", "train"]
        assert len(_pngs(base / "train" / "good")) == 5
        assert sorted(p.name for p in (base / "test").iterdir()) == [
            "crack",
            "good",
            "scratch",
            "spot",
        ]
        assert len(_pngs(base / "test" / "good")) == 3
        counts = {d: len(_pngs(base / "test" / d)) for d in ("scratch", "spot", "crack")}
        assert counts == {"scratch": 2, "spot": 2, "crack": 1}  # 5 assigned in turn
        assert not (base / "ground_truth" / "good").exists()
        for image_path in _pngs(base / "test"):
            if image_path.parent.name == "good":
                continue
            mask_path = (
                base / "ground_truth" / image_path.parent.name / f"{image_path.stem}_mask.png"
            )
            image, mask = _load(image_path), _load(mask_path)
            assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
            assert mask.max() == 255 and set(np.unique(mask)) == {0, 255}
            # defect pixels stand out from the image's own background
            inside = mask > 0
            background = np.median(image[~inside], axis=0)
            deviation = np.abs(image.astype(float) - background).sum(axis=-1)
            assert deviation[inside].mean() > 1.5 * deviation[~inside].mean()


def test_val_layout_has_val_split_without_masks(tmp_path: Path) -> None:
    root = make_synthetic_dataset(
        tmp_path, n_train=3, n_test_good=2, n_test_defect=4, size=48, layout="val"
    )
    base = root / "carpet"
    assert sorted(p.name for p in base.iterdir()) == ["ground_truth", "test", "train", "val"]
    for split in ("val", "test"):
        assert len(_pngs(base / split / "good")) == 2
        assert len(_pngs(base / split / "scratch")) == 2
        assert len(_pngs(base / split / "spot")) == 2
    assert len(_pngs(base / "ground_truth")) == 4  # masks for the test split only
    # val and test hold different images
    assert not np.array_equal(_load(base / "val/good/000.png"), _load(base / "test/good/000.png"))


def test_folder_layout_nests_defects_without_ground_truth(tmp_path: Path) -> None:
    root = make_synthetic_dataset(
        tmp_path,
        categories=("wood",),
        n_train=2,
        n_test_good=2,
        n_test_defect=6,
        size=48,
        layout="folder",
    )
    base = root / "wood"
    assert sorted(p.name for p in base.iterdir()) == ["test", "train"]
    good = _pngs(base / "test" / "good")
    assert len(good) == 2 and all(p.parent == base / "test" / "good" for p in good)
    defective = [p for p in _pngs(base / "test") if "good" not in p.parts]
    assert len(defective) == 6
    for path in defective:
        rel = path.relative_to(base / "test")
        assert len(rel.parts) >= 3  # test/<defect>/<batch>/<image>.png
    assert {p.parent.name for p in defective} == {"batch1", "batch2"}


def test_dataset_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    kwargs = dict(categories=("grid", "fabric"), n_train=3, n_test_good=2, n_test_defect=2, size=64)
    a = make_synthetic_dataset(tmp_path / "a", seed=3, **kwargs)
    b = make_synthetic_dataset(tmp_path / "b", seed=3, **kwargs)
    c = make_synthetic_dataset(tmp_path / "c", seed=4, **kwargs)
    files_a = [p.relative_to(a) for p in _pngs(a)]
    assert files_a == [p.relative_to(b) for p in _pngs(b)] == [p.relative_to(c) for p in _pngs(c)]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    assert sum((a / f).read_bytes() != (c / f).read_bytes() for f in files_a) == len(files_a)
    # images within a split differ from each other
    train = [_load(p) for p in _pngs(a / "grid" / "train")]
    assert not np.array_equal(train[0], train[1])


def test_image_modes(tmp_path: Path) -> None:
    modes = ("RGB", "L", "I;16", "RGBA")
    root = make_synthetic_dataset(
        tmp_path, n_train=4, n_test_good=1, n_test_defect=2, size=32, modes=modes
    )
    train = _pngs(root / "carpet" / "train" / "good")
    assert [Image.open(p).mode for p in train] == list(modes)
    sixteen = _load(train[2])
    assert sixteen.dtype == np.uint16 and sixteen.max() > 255
    rgba = _load(train[3])
    assert rgba.shape == (32, 32, 4) and (rgba[..., 3] == 255).all()
    for mask in _pngs(root / "carpet" / "ground_truth"):
        assert Image.open(mask).mode == "L"


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layout"):
        make_synthetic_dataset(tmp_path, layout="imagenet")
    with pytest.raises(ValueError, match="category"):
        make_synthetic_dataset(tmp_path, categories=("bottle",))
    with pytest.raises(ValueError, match="defect"):
        make_synthetic_dataset(tmp_path, defects=("dent",))
    with pytest.raises(ValueError, match="mode"):
        make_synthetic_dataset(tmp_path, modes=("CMYK",))
    assert not any(tmp_path.iterdir())  # validation happens before writing


def _local_features(image: np.ndarray) -> np.ndarray:
    f = image.astype(np.float64) / 255.0
    mean = ndimage.gaussian_filter(f, (2, 2, 0))
    std = np.sqrt(np.maximum(ndimage.gaussian_filter(f**2, (2, 2, 0)) - mean**2, 0))
    return np.concatenate([mean, std], axis=-1).reshape(-1, 6)


@pytest.mark.parametrize("category", ["carpet", "fabric", "wood"])
def test_defects_are_localisable_by_a_simple_normal_model(tmp_path: Path, category: str) -> None:
    """A Gaussian model of local colour statistics, fitted on train/good only, finds defects.

    This checks that normal images of a category are alike and that defects depart from them
    where the masks say they do.
    """
    root = make_synthetic_dataset(
        tmp_path, categories=(category,), n_train=6, n_test_good=2, n_test_defect=4, size=96
    )
    base = root / category
    train = np.concatenate([_local_features(_load(p)) for p in _pngs(base / "train")])
    centre = train.mean(axis=0)
    precision = np.linalg.inv(np.cov(train.T) + 1e-6 * np.eye(6))
    truth, scores = [], []
    for path in _pngs(base / "test"):
        image = _load(path)
        feats = _local_features(image) - centre
        scores.append(np.einsum("ij,jk,ik->i", feats, precision, feats))
        if path.parent.name == "good":
            truth.append(np.zeros(image.shape[:2], dtype=bool).ravel())
        else:
            mask_path = base / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
            truth.append(_load(mask_path).ravel() > 0)
    assert roc_auc_score(np.concatenate(truth), np.concatenate(scores)) > 0.9
