"""Evaluate a fitted model on a category's test set; write results tables."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..data.layouts import DatasetSplit
from ..model import PatchCore, Prediction
from . import metrics
from .overlap import overlap_summary

log = logging.getLogger(__name__)

RESULT_COLUMNS = (
    "category", "image_auroc", "pixel_auroc", "pro", "f1_max", "f1_max_threshold",
    "precision_at_threshold", "recall_at_threshold", "f1_at_threshold", "threshold",
    "threshold_rule", "n_train", "n_test", "n_anomalous", "predict_ms_per_image",
)


def evaluate_split(model: PatchCore, split: DatasetSplit) -> tuple[dict[str, Any], Prediction]:
    """Image/pixel metrics of `model` on the test images of `split`, and the train/test
    overlap check (`overlap.overlap_summary`: a warning when good test images look like
    near-copies of training images)."""
    if not split.test:
        raise ValueError(f"category {split.name} has no test images to evaluate on")
    with_masks = split.has_masks
    t0 = time.perf_counter()
    pred = model.score(split.test, masks=with_masks, desc=f"evaluate [{split.name}]")
    elapsed = time.perf_counter() - t0
    threshold = model.calibration_.image_threshold
    # Pixel metrics over every pixel of every image, at the image's own size.
    result = metrics.evaluate(
        pred.true_labels, pred.scores,
        pred.masks if with_masks else None, pred.original_maps() if with_masks else None,
        threshold=threshold,
    )
    row: dict[str, Any] = {"category": split.name, **{k: _plain(v) for k, v in result.items()}}
    row["threshold"] = threshold
    row["threshold_rule"] = model.calibration_.image_threshold_rule
    row["n_train"] = model.fit_info_.get("train_images", len(model.train_paths_))
    row["n_test"] = len(split.test)
    row["n_anomalous"] = int(sum(s.label == 1 for s in split.test))
    row["predict_ms_per_image"] = round(1000 * elapsed / len(split.test), 2)
    row.update(overlap_summary(model, pred))
    return row, pred


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean over categories of every numeric column."""
    out: dict[str, Any] = {"category": "mean"}
    for key in RESULT_COLUMNS[1:]:
        values = [r.get(key) for r in rows]
        nums = [float(v) for v in values if isinstance(v, (int, float)) and not
                (isinstance(v, float) and math.isnan(v))]
        if nums and key not in ("threshold", "f1_max_threshold"):
            out[key] = float(np.mean(nums))
    return out


def write_results(rows: list[dict[str, Any]], folder: Path) -> Path:
    """results.csv (one row per category plus the mean) and results.json in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    table = rows + ([mean_row(rows)] if len(rows) > 0 else [])
    columns = list(RESULT_COLUMNS) + sorted({k for r in rows for k in r} - set(RESULT_COLUMNS))
    path = folder / "results.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in table:
            writer.writerow({k: _fmt(row.get(k)) for k in columns})
    (folder / "results.json").write_text(json.dumps(table, indent=2, default=str))
    return path


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return "" if value is None else value
