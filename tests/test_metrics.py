"""Tests for patchcore.evaluation.metrics: scikit-learn, hand-computed cases, slow references."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from patchcore.evaluation.metrics import (
    evaluate,
    f1_max,
    image_auroc,
    pixel_auroc,
    precision_recall_f1,
    pro_curve,
    pro_score,
    threshold_at_fpr,
    threshold_at_percentile,
)

# --------------------------------------------------------------------------------------
# fixtures and references
# --------------------------------------------------------------------------------------


def _image_data(seed: int, n: int = 200, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    scores = rng.normal(size=n) + 0.8 * labels
    if ties:
        scores = np.round(scores, 1)
    return labels, scores


def _blob_dataset(
    seed: int, n: int = 4, size: int = 48, quantize: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Masks with a few blobs of varied size and smooth anomaly maps that partly find them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n - 1):  # the last image stays normal
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(4, size - 4, size=2)
            r = rng.uniform(1.5, 7)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    noise = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 2, 2))
    signal = ndimage.gaussian_filter(masks.astype(float), sigma=(0, 1.5, 1.5))
    maps = (noise / noise.std() + 2.5 * signal * rng.uniform(0.3, 1.5, size=(n, 1, 1))).astype(
        np.float32
    )
    if quantize:
        maps = np.round(maps * 4).astype(np.float32)
    return masks, maps


def _reference_pro(
    masks: np.ndarray, maps: np.ndarray, thresholds: np.ndarray, fpr_limit: float
) -> float:
    """Slow AU-PRO: loop over thresholds, relabel regions, integrate the resulting curve."""
    structure = np.ones((3, 3))
    regions = [ndimage.label(m, structure=structure) for m in masks]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.sort(thresholds)[::-1]:
        pred = maps >= t
        overlaps = []
        for (lab, n_lab), p in zip(regions, pred, strict=True):
            for r in range(1, n_lab + 1):
                region = lab == r
                overlaps.append(np.count_nonzero(p & region) / np.count_nonzero(region))
        fpr = np.count_nonzero(pred & normal) / np.count_nonzero(normal)
        points.append((fpr, float(np.mean(overlaps))))
    fprs = np.array([p[0] for p in points])
    pros = np.array([p[1] for p in points])
    # integrate from 0 to fpr_limit, interpolating at the limit
    area = 0.0
    for i in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[i - 1], fprs[i], pros[i - 1], pros[i]
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    """10x10 image, two regions, scores chosen so the PRO curve can be worked out by hand.

    Region A: 4 pixels on a diagonal (one region only under 8-connectivity), score 0.9.
    Region B: a 4x4 block; 8 pixels score 0.7, 8 pixels score 0.5.
    Normal pixels (80): 8 score 0.8, 16 score 0.5, 56 score 0.1.

    Curve (FPR, PRO): (0, 0) -> t=0.9: (0, 0.5) -> t=0.8: (0.1, 0.5) -> t=0.7: (0.1, 0.75)
    -> t=0.5: (0.3, 1.0) -> t=0.1: (1, 1).
    """
    mask = np.zeros((10, 10), dtype=bool)
    amap = np.full((10, 10), 0.1)
    for i in range(4):
        mask[i, i] = True
        amap[i, i] = 0.9
    mask[5:9, 5:9] = True
    amap[5:7, 5:9] = 0.7
    amap[7:9, 5:9] = 0.5
    normal = np.flatnonzero(~mask.ravel())
    amap.ravel()[normal[:8]] = 0.8
    amap.ravel()[normal[8:24]] = 0.5
    return mask[None], amap[None]


# --------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_matches_sklearn(seed: int, ties: bool) -> None:
    labels, scores = _image_data(seed, ties=ties)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc(labels.astype(int), scores) == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-12
    )


def test_image_auroc_one_class_is_nan_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="patchcore.evaluation.metrics"):
        assert math.isnan(image_auroc([0, 0, 0], [0.1, 0.5, 0.2]))
    assert "one class" in caplog.text


def test_image_auroc_rejects_non_binary_labels_and_bad_lengths() -> None:
    with pytest.raises(ValueError, match="binary"):
        image_auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="entries"):
        image_auroc([0, 1, 1], [0.1, 0.2])


@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_auroc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = rng.random((6, 20, 24)) < 0.15
    # quantised scores create many ties between normal and anomalous pixels
    maps = np.round(rng.normal(size=masks.shape) + masks, 1).astype(np.float32)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    # 0/255 uint8 masks (as read from MVTec PNGs) and float64 maps give the same result
    masks_255 = masks.astype(np.uint8) * 255
    assert pixel_auroc(masks_255, maps.astype(np.float64)) == pytest.approx(expected, abs=1e-12)
    # a list of per-image arrays is accepted too
    assert pixel_auroc(list(masks), list(maps)) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_degenerate_and_invalid(caplog: pytest.LogCaptureFixture) -> None:
    maps = np.random.default_rng(0).random((2, 8, 8))
    with caplog.at_level(logging.WARNING, logger="patchcore.evaluation.metrics"):
        assert math.isnan(pixel_auroc(np.zeros((2, 8, 8), bool), maps))
    assert "one class" in caplog.text
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc(np.zeros((2, 8, 7), bool), maps)
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(np.ones((2, 8, 8), bool), bad)


# --------------------------------------------------------------------------------------
# PRO
# --------------------------------------------------------------------------------------


def test_pro_hand_computed_case() -> None:
    masks, maps = _hand_case()
    fpr, pro, thresholds = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, 0.1, 0.1, 0.3, 1.0])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 0.75, 1.0, 1.0])
    np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.8, 0.7, 0.5, 0.1])
    # area to 0.3: 0.1 * 0.5 + 0.2 * (0.75 + 1) / 2 = 0.225 -> / 0.3
    assert pro_score(masks, maps, fpr_limit=0.3) == pytest.approx(0.75)
    # limit inside the sloped segment: PRO(0.2) = 0.875, area 0.05 + 0.1 * 1.625 / 2
    assert pro_score(masks, maps, fpr_limit=0.2) == pytest.approx(0.13125 / 0.2)
    # whole curve: 0.225 + 0.7 * 1
    assert pro_score(masks, maps, fpr_limit=1.0) == pytest.approx(0.925)


def test_pro_uses_eight_connectivity_and_counts_regions_across_images() -> None:
    masks, maps = _hand_case()
    # With 4-connectivity region A would be 4 regions and PRO(t=0.9) would be 4/5, not 1/2.
    assert pro_curve(masks, maps)[1][1] == pytest.approx(0.5)
    # Splitting the regions over two images changes nothing: regions are pooled.
    split_masks = np.concatenate([masks, masks])
    split_masks[0, 5:, 5:] = False
    split_masks[1, :5, :5] = False
    split_maps = np.concatenate([maps, maps])
    fpr, pro, _ = pro_curve(split_masks, split_maps)
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 0.75, 1.0, 1.0])


def test_pro_perfect_map_is_one_and_inverted_map_is_zero() -> None:
    masks, maps = _blob_dataset(3)
    perfect = masks + 0.01 * np.random.default_rng(0).random(masks.shape)
    assert pro_score(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    assert pro_score(masks, -masks.astype(float)) == pytest.approx(0.0, abs=1e-12)


def test_pro_invariant_to_monotone_transforms() -> None:
    masks, maps = _blob_dataset(4)
    maps = maps.astype(np.float64)
    base = pro_score(masks, maps)
    assert 0.2 < base < 0.98  # non-trivial case
    assert pro_score(masks, np.exp(2 * maps)) == pytest.approx(base, abs=1e-12)
    assert pro_score(masks, 5 * maps**3 - 7) == pytest.approx(base, abs=1e-12)


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_pro_matches_exact_slow_reference_on_tied_scores(seed: int, fpr_limit: float) -> None:
    masks, maps = _blob_dataset(seed, quantize=True)
    reference = _reference_pro(masks, maps, np.unique(maps), fpr_limit)
    assert pro_score(masks, maps, fpr_limit=fpr_limit) == pytest.approx(reference, abs=1e-9)


@pytest.mark.parametrize("seed", [5, 6])
def test_pro_close_to_threshold_grid_reference(seed: int) -> None:
    masks, maps = _blob_dataset(seed)
    grid = np.linspace(maps.min(), maps.max(), 400)
    reference = _reference_pro(masks, maps, grid, 0.3)
    assert pro_score(masks, maps) == pytest.approx(reference, abs=1e-2)


def test_pro_degenerate_inputs(caplog: pytest.LogCaptureFixture) -> None:
    maps = np.random.default_rng(0).random((2, 8, 8))
    with caplog.at_level(logging.WARNING, logger="patchcore.evaluation.metrics"):
        assert math.isnan(pro_score(np.zeros((2, 8, 8), bool), maps))
        assert math.isnan(pro_score(np.ones((2, 8, 8), bool), maps))
    assert "anomalous regions" in caplog.text and "normal pixels" in caplog.text
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:4, 2:4] = True
    for limit in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fpr_limit"):
            pro_score(masks, maps, fpr_limit=limit)


# --------------------------------------------------------------------------------------
# F1 and thresholds
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_max_equals_brute_force(seed: int, ties: bool) -> None:
    labels, scores = _image_data(seed, n=120, ties=ties)
    best = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    value, threshold = f1_max(labels, scores)
    assert value == pytest.approx(best, abs=1e-12)
    assert f1_score(labels, scores >= threshold) == pytest.approx(best, abs=1e-12)


def test_f1_max_without_anomalies_is_nan() -> None:
    value, threshold = f1_max([0, 0, 0], [0.2, 0.3, 0.1])
    assert math.isnan(value) and math.isnan(threshold)


@pytest.mark.parametrize("seed", [0, 1])
def test_precision_recall_f1_matches_sklearn(seed: int) -> None:
    labels, scores = _image_data(seed)
    threshold = float(np.median(scores))
    pred = scores >= threshold
    out = precision_recall_f1(labels, scores, threshold)
    tn, fp, fn, tp = confusion_matrix(labels, pred).ravel()
    assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (tp, fp, tn, fn)
    assert out["precision"] == pytest.approx(precision_score(labels, pred))
    assert out["recall"] == pytest.approx(recall_score(labels, pred))
    assert out["f1"] == pytest.approx(f1_score(labels, pred))
    assert out["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert out["threshold"] == threshold


def test_precision_recall_f1_undefined_rates_are_nan() -> None:
    # only good images, nothing flagged: precision and recall undefined, accuracy 1
    out = precision_recall_f1([0, 0, 0], [0.1, 0.2, 0.3], threshold=0.5)
    assert math.isnan(out["precision"]) and math.isnan(out["recall"]) and math.isnan(out["f1"])
    assert out["accuracy"] == 1.0 and out["tn"] == 3.0
    # anomalies present but none flagged: precision undefined, recall and F1 zero
    out = precision_recall_f1([1, 0], [0.1, 0.2], threshold=0.5)
    assert math.isnan(out["precision"]) and out["recall"] == 0.0 and out["f1"] == 0.0


@pytest.mark.parametrize("fpr", [0.0, 0.05, 0.1, 0.25, 0.5, 0.99])
def test_threshold_at_fpr_is_lowest_threshold_within_fpr(fpr: float) -> None:
    rng = np.random.default_rng(0)
    good = np.round(rng.normal(size=200), 1)  # with ties
    t = threshold_at_fpr(good, fpr)
    assert np.mean(good >= t) <= fpr
    # the highest good score below t would already exceed the allowed rate
    below = good[good < t]
    assert np.mean(good >= below.max()) > fpr


def test_threshold_at_fpr_edges() -> None:
    good = np.array([0.3, 0.1, 0.2, 0.4])
    assert threshold_at_fpr(good, 1.0) == 0.1
    assert threshold_at_fpr(good, 0.25) > 0.3 and np.sum(good >= threshold_at_fpr(good, 0.25)) == 1
    assert threshold_at_fpr(good, 0.0) > 0.4
    with pytest.raises(ValueError):
        threshold_at_fpr(good, 1.5)
    with pytest.raises(ValueError):
        threshold_at_fpr([], 0.1)


def test_threshold_at_percentile() -> None:
    good = np.random.default_rng(1).random(101)
    assert threshold_at_percentile(good, 99) == pytest.approx(np.percentile(good, 99))
    assert threshold_at_percentile(good, 100) == good.max()
    assert np.mean(good >= threshold_at_percentile(good, 90)) == pytest.approx(11 / 101)
    with pytest.raises(ValueError):
        threshold_at_percentile(good, 101)


# --------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------


def test_evaluate_combines_metrics() -> None:
    masks, maps = _blob_dataset(7)
    labels = masks.any(axis=(1, 2))
    labels[-1] = False
    scores = maps.max(axis=(1, 2))
    out = evaluate(labels, scores, masks=masks, maps=maps, threshold=float(np.median(scores)))
    assert out["image_auroc"] == image_auroc(labels, scores)
    assert (out["f1_max"], out["f1_max_threshold"]) == f1_max(labels, scores)
    assert out["pixel_auroc"] == pixel_auroc(masks, maps)
    assert out["pro"] == pro_score(masks, maps)
    at = precision_recall_f1(labels, scores, float(np.median(scores)))
    for key in ("precision", "recall", "f1", "accuracy", "tp", "fp", "tn", "fn"):
        assert out[f"{key}_at_threshold"] == pytest.approx(at[key], nan_ok=True)
    assert out["threshold"] == float(np.median(scores))
    assert all(isinstance(v, float) for v in out.values())

    image_only = evaluate(labels, scores)
    assert set(image_only) == {"image_auroc", "f1_max", "f1_max_threshold"}
    with pytest.raises(ValueError, match="maps"):
        evaluate(labels, scores, masks=masks)
