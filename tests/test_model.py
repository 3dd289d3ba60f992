"""The estimator end to end on generated images with known defects."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FAST

from patchcore import NotFittedError, PatchCore, metrics
from patchcore.config import PatchCoreConfig
from patchcore.errors import ConfigError


def test_detects_and_localises_generated_defects(fitted, split):
    pred = fitted.score(split.test, masks=True)
    labels = pred.true_labels
    assert labels.sum() == 8 and (labels == 0).sum() == 6
    # Pasted scratches and spots on a texture are easy for PatchCore: near-perfect separation.
    assert metrics.image_auroc(labels, pred.scores) >= 0.95
    maps = pred.original_maps()  # whole images at their own size, as the masks
    assert all(m.shape == a.shape == (160, 160) for m, a in zip(pred.masks, maps, strict=True))
    assert metrics.pixel_auroc(pred.masks, maps) >= 0.9
    assert metrics.pro_score(pred.masks, maps) >= 0.6
    # Inside each defect the map is higher than in the normal area of the same image.
    for i in np.flatnonzero(labels):
        m = pred.masks[i]
        assert maps[i][m].mean() > maps[i][~m].mean()


def test_bank_size_and_provenance(fitted):
    member = fitted.members_[0]
    h, w = fitted.feature_grid_
    n_train = len(fitted.train_paths_)
    assert len(member.bank) == int(n_train * h * w * 0.1)
    assert member.bank.image_index.max() < n_train
    assert member.bank.position[:, 0].max() < h and member.bank.position[:, 1].max() < w


def test_every_training_image_in_the_bank_and_calibrated(fitted, split):
    """By default no image is held out: thresholds come from leave-one-image-out scores."""
    cal = fitted.calibration_
    assert len(fitted.train_paths_) == len(split.train)
    assert cal.source_images == len(split.train) and "leave-one-image-out" in (
        cal.image_threshold_rule)
    pred = fitted.score(split.test)
    np.testing.assert_array_equal(pred.labels, pred.scores >= cal.image_threshold)
    assert ((pred.calibrated >= 0.5) == (pred.labels == 1)).all()
    assert pred.calibrated.min() >= 0 and pred.calibrated.max() <= 1
    normal = pred.scores[pred.true_labels == 0]
    assert (normal < cal.image_threshold).mean() >= 0.8  # few false alarms on unseen normals


def test_calibration_from_held_out_images(split):
    model = PatchCore(**FAST, calibration_holdout=0.25)
    model.progress = False
    model.fit(split)
    cal = model.calibration_
    assert cal.source_images == len(split.train) - len(model.train_paths_) == 3
    assert "leave-one-image-out" not in cal.image_threshold_rule


def test_same_seed_same_model(split):
    a = PatchCore(**FAST, seed=3, calibration_holdout=0.0)
    b = PatchCore(**FAST, seed=3, calibration_holdout=0.0)
    a.progress = b.progress = False
    a.fit(split.train[:6])
    b.fit(split.train[:6])
    np.testing.assert_array_equal(a.members_[0].bank.features, b.members_[0].bank.features)
    sa, sb = a.score(split.test[:4]).scores, b.score(split.test[:4]).scores
    np.testing.assert_array_equal(sa, sb)


def test_unfitted_model_and_bad_config():
    with pytest.raises(NotFittedError):
        PatchCore(**FAST).predict(np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(ConfigError, match="sampler"):
        PatchCoreConfig(sampler="kmeans")
    with pytest.raises(ConfigError, match="percentage"):
        PatchCoreConfig(percentage=0)
