"""Evaluation metrics for anomaly detection: image/pixel AUROC, PRO, F1 and thresholds.

All functions take numpy arrays (or anything ``np.asarray`` accepts) and return plain Python
floats. Labels and masks are binary: ``True``/``1`` (or any non-zero mask value, e.g. 255)
means anomalous. A score is classified anomalous when ``score >= threshold``.

Undefined results (for example an AUROC when only one class is present) are returned as
``NaN`` and a warning is logged, so that a whole evaluation run is not aborted by one
degenerate category.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.integrate import trapezoid
from sklearn.metrics import precision_recall_curve, roc_auc_score

__all__ = [
    "evaluate",
    "f1_max",
    "image_auroc",
    "pixel_auroc",
    "precision_recall_f1",
    "pro_curve",
    "pro_score",
    "threshold_at_fpr",
    "threshold_at_percentile",
]

logger = logging.getLogger(__name__)

# 8-connectivity, as in the MVTec AD reference evaluation code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# Number of positive scores ranked against the negatives at once in ``pixel_auroc``.
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _binary_labels(labels: Any, name: str = "labels") -> np.ndarray:
    """Return ``labels`` as a 1-D bool array; they must be bool or 0/1."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.dtype == bool:
        return arr
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must be binary (bool or 0/1), got values {np.unique(arr)[:5]}")
    return arr.astype(bool)


def _scores_1d(scores: Any, n: int, name: str = "scores") -> np.ndarray:
    """Return ``scores`` as a finite 1-D float array of length ``n``."""
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but labels have {n}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _float_dtype(maps: Any) -> np.dtype:
    """Floating dtype used for the flattened copies of ``maps`` (float32 unless float64)."""
    dtype = getattr(maps, "dtype", None)
    if dtype is None and isinstance(maps, Sequence) and len(maps):
        dtype = getattr(maps[0], "dtype", None)
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _iter_images(masks: Any, maps: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(mask, map)`` pairs, one 2-D image at a time, with the mask as bool.

    Accepts stacked arrays of shape (N, H, W), a single (H, W) image, or sequences of
    (H, W) arrays (which may differ in size between images).
    """
    if isinstance(masks, np.ndarray) and masks.ndim == 2:
        masks, maps = masks[None], np.asarray(maps)[None]
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} anomaly maps")
    for i in range(len(masks)):
        mask = np.asarray(masks[i])
        amap = np.asarray(maps[i])
        if mask.ndim != 2 or mask.shape != amap.shape:
            raise ValueError(
                f"image {i}: mask shape {mask.shape} and map shape {amap.shape} must be equal "
                "and 2-D"
            )
        if not np.isfinite(amap).all():
            raise ValueError(f"image {i}: anomaly map contains NaN or infinite values")
        yield (mask if mask.dtype == bool else mask != 0), amap


def _one_class(labels: np.ndarray, what: str) -> bool:
    """Log a warning and return True when ``labels`` lacks a positive or a negative."""
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        logger.warning("%s is undefined with only one class present; returning NaN", what)
        return True
    return False


# --------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------


def image_auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of image-level ``scores`` against binary ``labels``.

    Returns NaN (and logs a warning) if ``labels`` contains only one class.
    """
    y = _binary_labels(labels)
    s = _scores_1d(scores, y.size)
    if _one_class(y, "image AUROC"):
        return math.nan
    return float(roc_auc_score(y, s))


def pixel_auroc(masks: Any, maps: Any) -> float:
    """Pixel-level ROC AUC over all pixels of all images.

    ``masks`` are ground-truth masks of shape (N, H, W) (bool, 0/1 or 0/255) and ``maps`` the
    anomaly maps of the same shape. The result equals ``roc_auc_score(masks.ravel(),
    maps.ravel())`` (ties count one half) but needs only one flattened copy of the scores,
    so it is usable on full datasets. Returns NaN (with a warning) if all pixels belong to
    one class.
    """
    dtype = _float_dtype(maps)
    n_pos = n_neg = 0
    for mask, _ in _iter_images(masks, maps):
        k = int(np.count_nonzero(mask))
        n_pos += k
        n_neg += mask.size - k
    if n_pos == 0 or n_neg == 0:
        logger.warning("pixel AUROC is undefined with only one class present; returning NaN")
        return math.nan

    pos = np.empty(n_pos, dtype=dtype)
    neg = np.empty(n_neg, dtype=dtype)
    ip = ineg = 0
    for mask, amap in _iter_images(masks, maps):
        values = amap[mask]
        pos[ip : ip + values.size] = values
        ip += values.size
        values = amap[~mask]
        neg[ineg : ineg + values.size] = values
        ineg += values.size
    neg.sort()

    # Mann-Whitney U: each positive counts the negatives below it, plus one half per tie.
    twice_u = 0
    for start in range(0, n_pos, _CHUNK):
        chunk = pos[start : start + _CHUNK]
        below = np.searchsorted(neg, chunk, side="left")
        below_or_tied = np.searchsorted(neg, chunk, side="right")
        twice_u += int(below.sum(dtype=np.int64)) + int(below_or_tied.sum(dtype=np.int64))
    return twice_u / (2.0 * n_pos * n_neg)


# --------------------------------------------------------------------------------------
# PRO
# --------------------------------------------------------------------------------------


def _area_to_limit(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoidal area under a curve with non-decreasing ``fpr`` from 0 to ``limit``.

    The curve is linearly interpolated at exactly ``limit`` when no point lies there.
    """
    n_in = int(np.searchsorted(fpr, limit, side="right"))
    area = float(trapezoid(pro[:n_in], fpr[:n_in]))
    if n_in < fpr.size and fpr[n_in - 1] < limit:
        x0, x1 = fpr[n_in - 1], fpr[n_in]
        y0, y1 = pro[n_in - 1], pro[n_in]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_limit) / 2.0
    return area


def pro_curve(
    masks: Any, maps: Any, fpr_limit: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Exact per-region-overlap curve of anomaly ``maps`` against ground-truth ``masks``.

    Every connected component (8-connectivity) of every mask is one region. For each distinct
    threshold ``t`` (every distinct score value, in decreasing order) the curve holds the
    false-positive rate on normal pixels (outside all masks) and the mean over all regions of
    the fraction of the region's pixels with ``score >= t``.

    Returns ``(fpr, pro, thresholds)``, starting at the point (0, 0) whose threshold is
    ``+inf``. Only points up to ``fpr_limit`` are computed, plus the first one beyond it, so
    that the curve can be interpolated at ``fpr_limit``. Returns None (with a warning) when
    there are no anomalous regions or no normal pixels.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    dtype = _float_dtype(maps)

    # Pass 1: normal-pixel scores, to find the lowest threshold the curve needs.
    n_pix = n_neg = 0
    for mask, _ in _iter_images(masks, maps):
        n_pix += mask.size
        n_neg += mask.size - int(np.count_nonzero(mask))
    if n_neg == 0 or n_neg == n_pix:
        what = "normal pixels" if n_neg == 0 else "anomalous regions"
        logger.warning("PRO is undefined without %s; returning NaN", what)
        return None
    max_fp = math.floor(fpr_limit * n_neg + 1e-9)
    if max_fp >= n_neg:
        cut = -np.inf
    else:
        neg = np.empty(n_neg, dtype=dtype)
        i = 0
        for mask, amap in _iter_images(masks, maps):
            values = amap[~mask]
            neg[i : i + values.size] = values
            i += values.size
        # Highest threshold whose FPR exceeds the limit: the (max_fp + 1)-th largest score.
        kth = n_neg - 1 - max_fp
        neg.partition(kth)
        cut = neg[kth]
        del neg

    # Pass 2: label regions and keep the pixels scoring at least ``cut``.
    scores_parts: list[np.ndarray] = []
    region_parts: list[np.ndarray] = []
    sizes_parts: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]  # slot 0: normal pixels
    offset = 0
    for mask, amap in _iter_images(masks, maps):
        regions, n_regions = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        if n_regions:
            sizes_parts.append(np.bincount(regions.ravel(), minlength=n_regions + 1)[1:])
            regions[regions > 0] += offset
            offset += n_regions
        keep = amap >= cut
        scores_parts.append(amap[keep].astype(dtype, copy=False))
        region_parts.append(regions[keep])
    scores = np.concatenate(scores_parts)
    regions = np.concatenate(region_parts)
    del scores_parts, region_parts
    sizes = np.concatenate(sizes_parts)

    # Each region contributes 1 / (n_regions * size) per covered pixel, so the cumulative sum
    # over pixels in decreasing score order is the mean overlap of all regions.
    weights = np.zeros(sizes.size, dtype=np.float64)
    weights[1:] = 1.0 / (offset * sizes[1:])
    order = np.argsort(scores)[::-1]
    scores = scores[order]
    regions = regions[order]
    del order
    false_pos = np.cumsum(regions == 0)
    overlap = np.cumsum(weights[regions])
    # One curve point per distinct score: the last pixel of each run of tied scores.
    ends = np.append(np.flatnonzero(scores[1:] != scores[:-1]), scores.size - 1)

    fpr = np.concatenate(([0.0], false_pos[ends] / n_neg))
    pro = np.concatenate(([0.0], np.minimum(overlap[ends], 1.0)))
    thresholds = np.concatenate(([np.inf], scores[ends].astype(np.float64)))
    return fpr, pro, thresholds


def pro_score(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD's AU-PRO).

    The PRO curve (see :func:`pro_curve`) is integrated over the false-positive rate from 0
    to ``fpr_limit`` with the trapezoidal rule, interpolating at exactly ``fpr_limit``, and
    divided by ``fpr_limit`` so that a perfect anomaly map scores 1.0. The result is exact
    (every distinct score is a threshold) and invariant to strictly increasing transforms of
    ``maps``. Returns NaN (with a warning) if there are no anomalous regions or no normal
    pixels.
    """
    curve = pro_curve(masks, maps, fpr_limit=fpr_limit)
    if curve is None:
        return math.nan
    fpr, pro, _ = curve
    return _area_to_limit(fpr, pro, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------------------
# F1 and thresholds
# --------------------------------------------------------------------------------------


def f1_max(labels: Any, scores: Any) -> tuple[float, float]:
    """Best F1 score over all thresholds, and the (lowest) threshold achieving it.

    Returns ``(nan, nan)`` with a warning when there is no anomalous label.
    """
    y = _binary_labels(labels)
    s = _scores_1d(scores, y.size)
    if not y.any():
        logger.warning("F1 is undefined without anomalous labels; returning NaN")
        return math.nan, math.nan
    precision, recall, thresholds = precision_recall_curve(y, s)
    precision, recall = precision[: thresholds.size], recall[: thresholds.size]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def precision_recall_f1(labels: Any, scores: Any, threshold: float) -> dict[str, float]:
    """Confusion counts and derived rates when predicting anomalous for ``score >= threshold``.

    Keys: precision, recall, f1, accuracy, tp, fp, tn, fn, threshold. A rate whose
    denominator is zero (e.g. precision when nothing is predicted anomalous, recall without
    anomalous labels) is NaN.
    """
    y = _binary_labels(labels)
    s = _scores_1d(scores, y.size)
    pred = s >= threshold
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    tn = int(y.size - tp - fp - fn)
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, y.size),
        "tp": float(tp),
        "fp": float(fp),
        "tn": float(tn),
        "fn": float(fn),
        "threshold": float(threshold),
    }


def _good_scores(good_scores: Any) -> np.ndarray:
    s = np.asarray(good_scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("good_scores is empty")
    if not np.isfinite(s).all():
        raise ValueError("good_scores contains NaN or infinite values")
    return s


def threshold_at_fpr(good_scores: Any, fpr: float) -> float:
    """Lowest threshold that flags at most a fraction ``fpr`` of the good (normal) scores.

    Only normal images are needed, as in production. The threshold is just above (the next
    representable float64 after) the highest good score that must not be flagged, so that
    ``mean(good_scores >= threshold) <= fpr``; for ``fpr >= 1`` it is the lowest good score.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    s = np.sort(_good_scores(good_scores))
    allowed = math.floor(fpr * s.size + 1e-9)
    if allowed >= s.size:
        return float(s[0])
    return float(np.nextafter(s[s.size - 1 - allowed], np.inf))


def threshold_at_percentile(good_scores: Any, q: float) -> float:
    """The ``q``-th percentile (0-100, linear interpolation) of the good (normal) scores."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    return float(np.percentile(_good_scores(good_scores), q))


# --------------------------------------------------------------------------------------
# all at once
# --------------------------------------------------------------------------------------


def evaluate(
    labels: Any,
    scores: Any,
    masks: Any | None = None,
    maps: Any | None = None,
    threshold: float | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """Standard metric set for one category.

    Always: ``image_auroc``, ``f1_max``, ``f1_max_threshold``. With ``masks`` (and ``maps``):
    ``pixel_auroc`` and ``pro`` (AU-PRO up to ``fpr_limit``). With ``threshold``:
    ``threshold`` and the :func:`precision_recall_f1` results at it, with the suffix
    ``_at_threshold`` (``precision_at_threshold``, ``tp_at_threshold``, ...).
    """
    result: dict[str, float] = {"image_auroc": image_auroc(labels, scores)}
    result["f1_max"], result["f1_max_threshold"] = f1_max(labels, scores)
    if masks is not None:
        if maps is None:
            raise ValueError("maps are required when masks are given")
        result["pixel_auroc"] = pixel_auroc(masks, maps)
        result["pro"] = pro_score(masks, maps, fpr_limit=fpr_limit)
    if threshold is not None:
        at = precision_recall_f1(labels, scores, threshold)
        result["threshold"] = at.pop("threshold")
        result.update({f"{key}_at_threshold": value for key, value in at.items()})
    return result
