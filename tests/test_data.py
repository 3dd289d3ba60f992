"""Decoding odd images, dataset layouts, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from patchcore import DataError, PatchCore
from patchcore.data import detect_layout, load_dataset, load_image
from patchcore.data.images import load_mask
from patchcore.data.preprocess import Preprocessor
from patchcore.data.synthetic import make_synthetic_dataset


def test_image_modes_decode_to_rgb(tmp_path):
    gray16 = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    Image.fromarray(np.full((48, 64), 200, np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(np.full((48, 64, 4), 100, np.uint8), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((48, 64, 3), 50, np.uint8)).convert("P").save(tmp_path / "pal.bmp")
    Image.fromarray(gray16).save(tmp_path / "g16.tif")
    for name in ("g16.png", "gray.png", "rgba.png", "pal.bmp", "g16.tif"):
        img = load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == (64, 48)
    a = np.asarray(load_image(tmp_path / "g16.png"))
    assert a.max() > 200 and a.min() == 0  # 16-bit range scaled, not clipped to white


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match="bad.png"):
        load_image(bad)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 100, 3), np.uint8)).save(
        tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.jpg.*truncated"):
        load_image(tmp_path / "cut.jpg")


def test_fit_stops_at_a_corrupt_training_image(tmp_path):
    root = make_synthetic_dataset(tmp_path, n_train=4, n_test_good=1, n_test_defect=1, size=64)
    (root / "carpet" / "train" / "good" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    model = PatchCore(backbone="resnet18", pretrained=False, resize=64, imagesize=64)
    model.progress = False
    with pytest.raises(DataError, match="002.png"):
        model.fit(load_dataset(root / "carpet"))


def test_mask_of_wrong_size(tmp_path):
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(DataError, match="m.png is 12x10 but its image is 20x20"):
        load_mask(tmp_path / "m.png", (20, 20))


def test_empty_category_and_missing_folder(tmp_path):
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="has no images"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nothing")


@pytest.mark.parametrize("layout", ["mvtec", "val", "folder"])
def test_layouts_detected_and_loaded(tmp_path, layout):
    root = make_synthetic_dataset(tmp_path, n_train=5, n_test_good=2, n_test_defect=4, size=48,
                                  layout=layout)
    cat = root / "carpet"
    assert detect_layout(cat) == layout
    split = load_dataset(cat)
    assert len(split.train) == 5 and len(split.test) == 6
    assert sum(s.label for s in split.test) == 4
    if layout == "val":
        assert len(split.val) == 6 and sum(s.label for s in split.val) == 4
    if layout == "folder":
        assert not split.has_masks
        assert {s.group for s in split.test if s.label} == {
            "scratch/batch1", "scratch/batch2", "spot/batch1", "spot/batch2"}
    else:
        assert split.has_masks


def test_train_val_split(tmp_path):
    root = make_synthetic_dataset(tmp_path, n_train=10, n_test_good=1, n_test_defect=1, size=48)
    split = load_dataset(root / "carpet", train_val_split=0.8)
    assert len(split.train) == 8 and len(split.val) == 2
    assert not {s.path for s in split.train} & {s.path for s in split.val}


def test_map_back_to_original_size():
    pre = Preprocessor(256, 224)
    amap = np.zeros((224, 224), np.float32)
    amap[:, :112] = 1.0  # left half of the crop is anomalous
    out = pre.to_original(amap, (400, 300))  # W=400, H=300
    assert out.shape == (300, 400)
    assert out[:, :150].mean() > 0.9 and out[:, 250:].mean() < 0.1
