"""Fit and evaluate one category after another: the loop behind `patchcore fit` and
`patchcore.benchmark`.

`fit_category` fits and saves one model (timed), `evaluate_category` evaluates it on the test
images and writes the requested per-category outputs (report folder, segmentation images, score
CSV), and `fit_categories` runs both over category folders. Callers that track what is being
written (the CLI, for its Ctrl-C message) pass `writing` and `on_saved` hooks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PatchCoreConfig, RuntimeSettings
from ..data.layouts import DatasetSplit
from ..model import PatchCore, Prediction

log = logging.getLogger(__name__)

Writing = Callable[[Path], AbstractContextManager[Path]]


@dataclass(frozen=True)
class ReportRequest:
    """Which optional outputs to write per evaluated category (under the results folder)."""

    reports: bool = False  # reports/<category>/: plots, Bad_predictions.xlsx, index.html
    segmentation_images: bool = False  # segmentation/<category>/: image | mask | overlay
    anomaly_scores: bool = False  # scores/<category>.csv: path, group, label, score


def fit_category(split: DatasetSplit, config: PatchCoreConfig, settings: RuntimeSettings,
                 models_dir: Path) -> tuple[PatchCore, Path, float]:
    """Fit a model on `split`'s training images and save it as MODELS_DIR/<category>.

    Returns the model, its folder and the fit time in seconds (saving not included).
    """
    t0 = time.perf_counter()
    model = PatchCore(config, settings).fit(split)
    fit_s = time.perf_counter() - t0
    return model, model.save(models_dir / split.name), fit_s


def evaluate_category(
    model: PatchCore, split: DatasetSplit, out: Path, request: ReportRequest | None = None,
    normal: str = "good", tracker: Any = None, writing: Writing = nullcontext,
    say: Callable[[str], None] = log.info,
) -> tuple[dict[str, Any], Prediction]:
    """The results row and test prediction of `model` on `split`, the outputs `request` asks
    for written under `out`, and the metrics logged to `tracker` (a reports.tracking.Tracker)."""
    from ..reports import save_anomaly_scores, save_segmentation_images, write_category_report
    from . import evaluate

    request = request or ReportRequest()
    row, pred = evaluate.evaluate_split(model, split)
    if tracker is not None:
        tracker.log_metrics(row, prefix=f"{split.name}/")
    if request.reports:
        with writing(out / "reports" / split.name) as folder:
            files = write_category_report(model, split, pred, row, folder, normal=normal)
        say(f"{split.name}: report {files['index']}")
    if request.segmentation_images:
        with writing(out / "segmentation" / split.name) as folder:
            save_segmentation_images(model, split.test, pred, folder)
    if request.anomaly_scores:
        with writing(out / "scores" / f"{split.name}.csv") as path:
            save_anomaly_scores(pred, path)
    return row, pred


def fit_categories(
    folders: Iterable[Path], load: Callable[[Path], DatasetSplit], config: PatchCoreConfig,
    settings: RuntimeSettings, out: Path, *, evaluate: bool = True,
    request: ReportRequest | None = None, normal: str = "good", tracker: Any = None,
    writing: Writing = nullcontext, on_saved: Callable[[Path], Any] | None = None,
    say: Callable[[str], None] = log.info,
) -> list[dict[str, Any]]:
    """Fit one model per category folder into OUT/models/<category> and, with `evaluate`,
    evaluate each on its test images: one results row per evaluated category (with
    `fit_seconds`). `load` turns a folder into its DatasetSplit."""
    rows: list[dict[str, Any]] = []
    for folder in folders:
        split = load(folder)
        model, path, fit_s = fit_category(split, config, settings, out / "models")
        if on_saved is not None:
            on_saved(path)
        say(f"{split.name}: fitted in {fit_s:.1f}s on {len(split.train)} images -> {path}")
        if evaluate and split.test:
            row, _ = evaluate_category(model, split, out, request, normal, tracker, writing, say)
            row["fit_seconds"] = round(fit_s, 2)
            rows.append(row)
    return rows
