"""Train/test overlap check (evaluation/overlap.py): good test images that are near-copies of
training images are reported; a split of new parts is not."""

from __future__ import annotations

import dataclasses
import logging
import shutil

import numpy as np
import pytest
from conftest import SHARED
from PIL import Image

from patchcore import PatchCore, load_dataset
from patchcore.data.synthetic import make_synthetic_dataset
from patchcore.evaluation.evaluate import evaluate_split
from patchcore.evaluation.overlap import source_shares

FAST = dict(backbone="resnet18", pretrained=False, imagesize=96, device="cpu", progress=False,
            percentage=0.25)


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    root = tmp_path_factory.mktemp("overlap") / "data"
    make_synthetic_dataset(root, categories=("carpet",), n_train=10, n_test_good=5,
                           n_test_defect=6, size=96, seed=3)
    return root / "carpet"


def _leaky_copy(honest, dest):
    """The same split with each good test image replaced by a training image seen under other
    lighting (brighter, slightly noisy): the same part in both sets."""
    shutil.copytree(honest, dest)
    train = sorted((dest / "train" / "good").glob("*.png"))
    rng = np.random.default_rng(0)
    for k, path in enumerate(sorted((dest / "test" / "good").glob("*.png"))):
        src = np.asarray(Image.open(train[2 * k]).convert("RGB"), dtype=np.float32)
        shot = np.clip(src * 1.03 + 3 + rng.normal(0, 2, src.shape), 0, 255).astype(np.uint8)
        Image.fromarray(shot).save(path)
    return dest, train


def test_near_copies_of_training_images_are_reported(honest, tmp_path, caplog):
    leaky, train = _leaky_copy(honest, tmp_path / "leaky")
    split = load_dataset(leaky)
    model = PatchCore(**FAST).fit(split)
    with caplog.at_level(logging.WARNING, logger="patchcore.evaluation.overlap"):
        row, pred = evaluate_split(model, split)
    assert row["train_test_overlap"] is True
    assert row["good_source_share"] >= 2 * row["anomalous_source_share"]
    assert "near-copies of training images" in caplog.text
    # Each good test image's closest training image is the one it was made from.
    best, share = source_shares(model, pred)
    goods = [i for i in range(len(pred)) if pred.true_labels[i] == 0]
    for k, i in enumerate(sorted(goods, key=lambda i: pred.paths[i])):
        assert model.training_path(int(best[i])).name == train[2 * k].name
        assert share[i] > 0.3
    assert train[0].name in caplog.text or train[2].name in caplog.text


def test_new_parts_are_not_reported(honest, caplog):
    split = load_dataset(honest)
    model = PatchCore(**FAST).fit(split)
    with caplog.at_level(logging.WARNING, logger="patchcore.evaluation.overlap"):
        row, _ = evaluate_split(model, split)
    assert row["train_test_overlap"] is False
    assert row["good_source_share"] < 2 * row["anomalous_source_share"]
    assert "near-copies" not in caplog.text


def test_shares_count_every_view_of_an_image(honest, tmp_path):
    """Tile mode: several views per image, bank provenance in views; the share is over all
    of an image's patches and names a training image, not a view."""
    leaky, train = _leaky_copy(honest, tmp_path / "leaky")
    split = load_dataset(leaky)
    model = PatchCore(**{**FAST, "preprocess": "tile", "tile_size": 64, "tile_stride": 32})
    model.fit(split)
    pred = model.score(split.test)
    assert len(pred.nearest) > len(pred)  # several views per image
    best, share = source_shares(model, pred)
    assert best.max() < len(train) and (share > 0).all() and (share <= 1).all()
    goods = sorted((i for i in range(len(pred)) if pred.true_labels[i] == 0),
                   key=lambda i: pred.paths[i])
    assert [model.training_path(int(best[i])).name for i in goods] == [
        train[2 * k].name for k in range(len(goods))]


def test_too_few_images_of_a_class_give_no_verdict(honest):
    split = load_dataset(honest)
    model = PatchCore(**FAST).fit(split)
    goods_only = [s for s in split.test if s.label == 0]
    row, _ = evaluate_split(model, dataclasses.replace(split, test=goods_only))
    assert row["train_test_overlap"] is None and row["good_source_share"] is None


@pytest.mark.skipif(not (SHARED / "hazelnut_toy").is_dir(),
                    reason="../shared/data/hazelnut_toy is absent (it is not shipped)")
def test_real_split_of_new_parts_is_not_reported():
    split = load_dataset(SHARED / "hazelnut_toy")
    model = PatchCore(backbone="efficientnet_lite0", device="cpu", progress=False).fit(split)
    row, _ = evaluate_split(model, split)
    assert row["train_test_overlap"] is False


def test_share_is_over_all_views_of_an_image(honest):
    """Views of one image whose nearest rows come from different training images: the image's
    source is the training image behind most of its patches over every view."""
    split = load_dataset(honest)
    model = PatchCore(**{**FAST, "preprocess": "tile", "tile_size": 64, "tile_stride": 32})
    model.fit(split)
    pred = model.score(split.test[:2])
    bank = model.members_[0].bank
    image_of_row = np.array([model.training_view(int(v))[0] for v in bank.image_index])
    row_from = {i: int(np.flatnonzero(image_of_row == i)[0]) for i in (1, 2)}
    views = np.flatnonzero(pred.view_image == 0)
    assert len(views) >= 3
    nearest = np.array(pred.nearest)
    nearest[views[0]] = row_from[1]
    nearest[views[1:]] = row_from[2]
    best, share = source_shares(model, dataclasses.replace(pred, nearest=nearest))
    assert best[0] == 2
    assert share[0] == pytest.approx((len(views) - 1) / len(views))


def test_rows_not_found_are_skipped_and_a_foreign_prediction_fails_no_evaluation(
        honest, caplog):
    """-1 (an approximate index that found no row) counts for no training image; nearest rows
    beyond the bank skip the check with a warning instead of failing the evaluation."""
    from patchcore.evaluation.overlap import overlap_summary

    split = load_dataset(honest)
    model = PatchCore(**FAST).fit(split)
    pred = model.score(split.test)
    nearest = np.array(pred.nearest)
    half = nearest[0].size // 2
    nearest[0].reshape(-1)[:half] = -1
    best, share = source_shares(model, dataclasses.replace(pred, nearest=nearest))
    source = model.training_images(model.members_[0].bank.image_index)
    kept = source[nearest[0].reshape(-1)[half:]]
    assert best[0] == np.bincount(kept).argmax()
    assert share[0] == pytest.approx(np.bincount(kept).max() / kept.size)
    nearest[1] = len(model.members_[0].bank)  # not a row of this bank
    with caplog.at_level(logging.WARNING, logger="patchcore.evaluation.overlap"):
        out = overlap_summary(model, dataclasses.replace(pred, nearest=nearest))
    assert out["train_test_overlap"] is None and "overlap check skipped" in caplog.text


def test_the_report_shows_the_split_check_with_the_closest_pairs(honest, tmp_path):
    from patchcore.reports import write_category_report

    leaky, train = _leaky_copy(honest, tmp_path / "leaky")
    split = load_dataset(leaky)
    model = PatchCore(**FAST).fit(split)
    row, pred = evaluate_split(model, split)
    files = write_category_report(model, split, pred, row, tmp_path / "report")
    page = files["index"].read_text()
    assert "Split check: good test images look like training images" in page
    section = page[page.index("Split check"):page.index("Metrics")]
    assert all(p.name in section for p in train[0:10:2])  # each good image's source named
    honest_split = load_dataset(honest)
    clean = PatchCore(**FAST).fit(honest_split)
    row, pred = evaluate_split(clean, honest_split)
    page = write_category_report(clean, honest_split, pred, row,
                                 tmp_path / "clean")["index"].read_text()
    assert "Split check" not in page
