"""Thresholds and score normalisation: from validation scores to a typed `Calibration`."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ModelFileError

log = logging.getLogger(__name__)

MIN_CALIBRATION_IMAGES = 2  # fewer normal images than this give no threshold at all
GOOD_PERCENTILE = 99.0  # normal-only image rule: max(this percentile, mean + 3 std)
PIXEL_PERCENTILE = 99.9  # normal-only pixel rule
PIXEL_SAMPLE_LIMIT = 2_000_000  # pixels used for the F1-optimal pixel threshold


@dataclass
class Calibration:
    """Image and pixel thresholds with the score range used to map scores to 0-1.

    An empty Calibration (`calibrated` False) means no threshold: labels are "uncalibrated" and
    calibrated scores NaN.
    """

    image_threshold: float | None = None
    image_min: float | None = None
    image_max: float | None = None
    image_threshold_rule: str = ""
    pixel_threshold: float | None = None
    pixel_min: float | None = None
    pixel_max: float | None = None
    pixel_threshold_rule: str = ""
    source_images: int = 0
    anomalous_images: int = 0

    @property
    def calibrated(self) -> bool:
        """True when an image threshold is known."""
        return self.image_threshold is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (empty when uncalibrated, as format-1 models stored it)."""
        return dataclasses.asdict(self) if self.calibrated else {}

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        """From a model file's `calibration` entry, type- and range-checked."""
        if not isinstance(data, dict):
            raise ModelFileError("the calibration entry must be a JSON object")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ModelFileError(f"unknown calibration entries: {', '.join(unknown)[:200]}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            default = names[key].default
            if isinstance(default, str):
                if not isinstance(value, str) or len(value) > 1000:
                    raise ModelFileError(f"calibration {key} must be a short text")
            elif isinstance(default, int):
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ModelFileError(f"calibration {key} must be a count")
            elif value is not None and (isinstance(value, bool) or not isinstance(
                    value, (int, float)) or not math.isfinite(value)):
                raise ModelFileError(f"calibration {key} must be a finite number, got {value!r}")
            values[key] = float(value) if isinstance(value, (int, float)) and not isinstance(
                default, (int, str)) else value
        cal = cls(**values)
        parts = (cal.image_threshold, cal.image_min, cal.image_max)
        if any(p is None for p in parts) and any(p is not None for p in parts):
            raise ModelFileError("calibration has an image threshold without its score range")
        return cal


def holdout_split(samples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(bank images, calibration images): `fraction` of the images (at least
    MIN_CALIBRATION_IMAGES) held out for thresholds, when there are at least 4 images."""
    if fraction <= 0 or len(samples) < 4:
        return list(samples), []
    order = np.random.default_rng(seed).permutation(len(samples))
    n_hold = min(max(MIN_CALIBRATION_IMAGES, int(round(len(samples) * fraction))),
                 len(samples) - 2)  # the bank keeps at least two images
    hold = set(order[:n_hold].tolist())
    return ([s for i, s in enumerate(samples) if i not in hold],
            [s for i, s in enumerate(samples) if i in hold])


def normalise(values: np.ndarray, calibration: Calibration, kind: str) -> np.ndarray:
    """Min-max scaling that puts the `kind` (image/pixel) threshold at 0.5, clipped to [0, 1].

    NaN everywhere when the model has no such threshold.
    """
    thr = getattr(calibration, f"{kind}_threshold")
    lo, hi = getattr(calibration, f"{kind}_min"), getattr(calibration, f"{kind}_max")
    values = np.asarray(values, dtype=np.float32)
    if thr is None or lo is None or hi is None:
        return np.full_like(values, np.nan)
    span = max(float(hi) - float(lo), 1e-12)
    return np.clip((values - thr) / span + 0.5, 0.0, 1.0)


def labels_for(scores: np.ndarray, calibration: Calibration) -> np.ndarray:
    """1 anomalous, 0 good, -1 uncalibrated (no threshold), per image score."""
    if not calibration.calibrated:
        return np.full(len(scores), -1, dtype=np.int64)
    return (np.asarray(scores) >= calibration.image_threshold).astype(np.int64)


def _round_up_f32(thr: float) -> float:
    # Scores are float32 and compared in float32: round the threshold up, not down, so that a
    # normal score exactly at the threshold is not flagged.
    t32 = np.float32(thr)
    return float(np.nextafter(t32, np.float32(np.inf)) if float(t32) < thr else t32)


def calibrate(
    scores: np.ndarray, maps: Sequence[np.ndarray], labels: np.ndarray,
    masks: Sequence[np.ndarray] | None = None,
    threshold_fpr: float | None = None, threshold_percentile: float | None = None,
    seed: int = 0,
) -> Calibration:
    """Image and pixel thresholds from validation scores (normal, optionally anomalous too).

    With anomalous images the image threshold maximises F1; with normal images only it is
    max(99th percentile, mean + 3 std) of their scores (a bare percentile of a few held-out
    images is optimistic). `threshold_fpr` (a false-positive rate) or `threshold_percentile`
    pick the threshold from the normal scores alone (a production rule), even when anomalous
    images are present. Pixel thresholds likewise use masks when present.
    """
    from ..evaluation import metrics  # scipy and scikit-learn: not needed to apply a calibration

    scores = np.asarray(scores, dtype=np.float32)
    labels = np.asarray(labels).clip(min=0)
    normal = labels == 0
    cal = Calibration(source_images=len(scores), anomalous_images=int(labels.sum()))
    if normal.sum() < MIN_CALIBRATION_IMAGES and labels.min() == labels.max():
        log.warning("only %d normal validation image(s): no threshold; predictions are "
                    "labelled 'uncalibrated' (give more training images, a validation set, or "
                    "use raw scores)", int(normal.sum()))
        return cal
    good_scores = scores[normal] if normal.any() else scores
    if threshold_fpr is not None:
        thr = _round_up_f32(metrics.threshold_at_fpr(good_scores, threshold_fpr))
        cal.image_threshold_rule = f"{threshold_fpr:g} false-positive rate on normal scores"
    elif threshold_percentile is not None:
        thr = metrics.threshold_at_percentile(good_scores, threshold_percentile)
        cal.image_threshold_rule = f"{threshold_percentile:g}th percentile of normal scores"
    elif labels.min() != labels.max():
        _, thr = metrics.f1_max(labels, scores)
        cal.image_threshold_rule = "f1_max on validation"
    else:
        thr = max(metrics.threshold_at_percentile(scores, GOOD_PERCENTILE),
                  float(scores.mean() + 3 * scores.std()))
        cal.image_threshold_rule = (
            f"max({GOOD_PERCENTILE:g}th percentile, mean + 3 std) of normal scores")
    cal.image_threshold = float(thr)
    cal.image_min, cal.image_max = float(scores.min()), float(scores.max())
    flat_maps = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
    if masks is not None and any(m.any() for m in masks):
        flat_masks = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in masks])
        sub_maps, sub_masks = _pixel_subsample(flat_maps, flat_masks, seed)
        _, pthr = metrics.f1_max(sub_masks, sub_maps)
        cal.pixel_threshold_rule = "f1_max on validation masks"
    else:
        good = [np.asarray(m).ravel() for m, ok in zip(maps, normal, strict=True) if ok]
        pthr = float(np.percentile(np.concatenate(good) if good else flat_maps,
                                   PIXEL_PERCENTILE))
        cal.pixel_threshold_rule = f"{PIXEL_PERCENTILE:g}th percentile of normal pixels"
    cal.pixel_threshold = float(pthr)
    cal.pixel_min, cal.pixel_max = float(flat_maps.min()), float(flat_maps.max())
    return cal


def _pixel_subsample(
    maps: np.ndarray, masks: np.ndarray, seed: int, limit: int = PIXEL_SAMPLE_LIMIT
) -> tuple[np.ndarray, np.ndarray]:
    flat_maps, flat_masks = maps.reshape(-1), masks.reshape(-1).astype(np.int64)
    if len(flat_maps) > limit:
        idx = np.random.default_rng(seed).choice(len(flat_maps), limit, replace=False)
        flat_maps, flat_masks = flat_maps[idx], flat_masks[idx]
    return flat_maps, flat_masks


def member_norm(bank_index: Any, bank: np.ndarray, seed: int, limit: int = 5000
                ) -> tuple[float, float]:
    """Mean and std of bank rows' distances to their nearest other row (ensemble scaling)."""
    bank = np.asarray(bank, dtype=np.float32)
    rows = np.random.default_rng(seed).choice(len(bank), min(limit, len(bank)), replace=False)
    dist, _ = bank_index.search(bank[rows], min(2, len(bank)))
    d = dist[:, -1]
    return float(d.mean()), float(max(d.std(), 1e-6))
