"""Dataset discovery: symlinked folders, loops, hidden files, test-only folders."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from patchcore import DataError, PatchCore, load_dataset
from patchcore.data.layouts import list_images
from patchcore.data.synthetic import make_synthetic_dataset
from patchcore.evaluation.evaluate import evaluate_split


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)


def test_symlinked_folders_are_followed_once_and_loops_end(tmp_path):
    _png(tmp_path / "data" / "a" / "x.png")
    _png(tmp_path / "elsewhere" / "y.png")
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "a" / "linked")
    os.symlink(tmp_path / "data", tmp_path / "data" / "a" / "loop")  # points back up
    (tmp_path / "data" / "a" / "._x.png").write_bytes(b"resource fork")
    _png(tmp_path / "data" / ".cache" / "z.png")
    found = list_images(tmp_path / "data", recursive=True)
    names = sorted(p.name for p in found)
    assert names == ["x.png", "y.png"]


def test_test_only_folder_is_evaluated_per_group(tmp_path):
    make_synthetic_dataset(tmp_path / "fit", categories=("carpet",), n_train=5, n_test_good=3,
                           n_test_defect=3, size=48, seed=2)
    model = PatchCore(backbone="resnet18", pretrained=False, imagesize=32, device="cpu",
                      progress=False).fit(tmp_path / "fit" / "carpet")
    # An OOD-style folder without train/: normal images under test/gt, others nested deeper.
    src = tmp_path / "fit" / "carpet" / "test"
    only = tmp_path / "ood"
    for i, p in enumerate(sorted((src / "good").glob("*.png"))):
        (only / "test" / "gt").mkdir(parents=True, exist_ok=True)
        Image.open(p).save(only / "test" / "gt" / f"{i}.png")
    for i, p in enumerate(sorted(q for q in src.rglob("*.png") if q.parent.name != "good")):
        (only / "test" / "syn" / "scratchy").mkdir(parents=True, exist_ok=True)
        Image.open(p).save(only / "test" / "syn" / "scratchy" / f"{i}.png")
    split = load_dataset(only, normal="gt")
    assert split.layout == "test" and not split.train
    assert sorted({s.group for s in split.test}) == ["gt", "syn/scratchy"]
    assert [s.label for s in split.test].count(0) == 3
    row, pred = evaluate_split(model, split)
    assert np.isfinite(row["image_auroc"]) and len(pred) == len(split.test)


def test_folder_without_train_or_test_is_a_clear_error(tmp_path):
    _png(tmp_path / "x" / "a.png")
    with pytest.raises(DataError, match="test/<group>"):
        load_dataset(tmp_path / "x")
