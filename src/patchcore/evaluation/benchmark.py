"""Benchmarks from Python: every category of a dataset with every backbone, in one call.

`benchmark(root, categories, backbones, output, **config)` fits and evaluates one model per
(backbone, category) pair with the same code as `patchcore fit` (`evaluation.runs`) and returns a
pandas DataFrame: one row per pair (image and pixel AUROC, PRO, F1, fit and predict time, ...)
and a `mean` row per backbone. OUTPUT/results.csv is rewritten (atomically) after every finished
pair; a later call with the same settings skips the pairs it already holds, so an interrupted
benchmark continues where it stopped. Each row carries a `config_id` (a hash of the
hyperparameters, the data folder and how it is read); rows of other settings are recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import PatchCoreConfig, RuntimeSettings, split_overrides
from ..errors import ConfigError, DataError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

log = logging.getLogger(__name__)

RESULTS_FILE = "results.csv"
PLOT_FILE = "comparison.png"
MEAN = "mean"
KEY_COLUMNS = ("backbone", "category")
MAIN_COLUMNS = ("image_auroc", "pixel_auroc", "pro", "f1_max", "f1_at_threshold",
                "fit_seconds", "predict_ms_per_image")
# Columns averaged into a backbone's mean row (thresholds and rules are per category).
MEAN_COLUMNS = MAIN_COLUMNS + ("precision_at_threshold", "recall_at_threshold", "n_train",
                               "n_test", "n_anomalous")


def list_categories(root: str | Path) -> list[str]:
    """The category names of a dataset root (its subfolders with a train/ folder), or the one
    category when `root` is itself a category folder."""
    from ..data.layouts import category_folders

    return [folder.resolve().name for folder in category_folders(root, None)]


def backbone_label(backbone: str | Sequence[str]) -> str:
    """A backbone (or ensemble) as one name: "resnet18", "resnet18+densenet201"."""
    return backbone if isinstance(backbone, str) else "+".join(backbone)


def folder_name(label: str) -> str:
    """A backbone label usable as a folder name ("timm:vit_small" -> "timm_vit_small")."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", label)


def config_id(config: PatchCoreConfig, data: dict[str, Any]) -> str:
    """Short hash of the hyperparameters and how the data is read: rows with the same id were
    computed the same way."""
    text = json.dumps({"config": config.to_dict(), "data": data}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def benchmark(
    root: str | Path,
    categories: Sequence[str] | None = None,
    backbones: Sequence[str | Sequence[str]] = ("efficientnet_lite0",),
    output: str | Path = "benchmark",
    *,
    layout: str = "auto",
    normal: str = "good",
    max_train: int | None = None,
    reports: bool = True,
    download: str | None = None,
    accept_licence: bool = False,
    mirror: str | None = None,
    **config: Any,
) -> pd.DataFrame:
    """Fit and evaluate every (backbone, category) pair; return the results table.

    `root` is a dataset root (or one category folder), `categories` the category folders to use
    (default: all, see `list_categories`), `backbones` registered backbone names (a tuple of
    names is an ensemble), `config` further hyperparameters and runtime settings as accepted by
    `PatchCore(...)` (e.g. `imagesize=224, percentage=0.1, device="cpu", progress=False`).
    Models go to OUTPUT/<backbone>/models/<category>; with `reports`, each category's report
    (plots, Bad_predictions.xlsx, index.html) to OUTPUT/<backbone>/reports/<category>, and a
    comparison plot to OUTPUT/comparison.png. `max_train` keeps the first N training images.

    Pairs already in OUTPUT/results.csv with the same settings are not recomputed.

    `download` ("mvtec" or "visa") first fetches the missing categories into `root` (see
    `patchcore.datasets.download_dataset`; `accept_licence=True` accepts the dataset's licence,
    `mirror` replaces its published location), so that one call goes from nothing to the
    results table; offline, the error says which file to fetch by hand and where to put it.
    """
    from tqdm.auto import tqdm

    from ..data.layouts import category_folders, load_dataset
    from ..engine.pipeline import parse_members
    from ..reports.predictions import check_output_folder
    from .runs import ReportRequest, evaluate_category, fit_category

    try:
        import pandas  # noqa: F401 - checked here, before any work
    except ImportError:
        raise ConfigError("patchcore.benchmark needs pandas: pip install 'patchcore[benchmark]'"
                          ) from None
    hyper, runtime = split_overrides(config)
    if "backbone" in hyper:
        raise ConfigError("benchmark takes its backbones as backbones=[...], not backbone=")
    if isinstance(backbones, str):
        backbones = [backbones]
    if not backbones:
        raise ConfigError("benchmark needs at least one backbone, e.g. "
                          "backbones=['efficientnet_lite0']")
    if max_train is not None and max_train < 1:
        raise ConfigError(f"max_train must be at least 1, got {max_train}")
    settings = RuntimeSettings(**runtime)
    configs: dict[str, PatchCoreConfig] = {}
    for backbone in backbones:
        cfg = PatchCoreConfig(**hyper, backbone=backbone)
        cfg.validate()
        parse_members(cfg.backbone, cfg.layers)  # unknown backbones fail before any work
        configs[backbone_label(cfg.backbone)] = cfg
    if download is not None:
        from ..datasets import download_dataset

        download_dataset(download, root, list(categories or ()), accept_licence=accept_licence,
                         mirror=mirror, progress=settings.progress)
    folders = category_folders(root, list(categories) if categories else None)
    data = {"root": str(Path(root).resolve()), "layout": layout, "normal": normal,
            "max_train": max_train}
    ids = {label: config_id(cfg, data) for label, cfg in configs.items()}
    output = Path(output)
    check_output_folder(output)
    results_path = output / RESULTS_FILE
    done = read_finished(results_path, ids)
    pairs = [(label, folder) for label in configs for folder in folders]
    rows: list[dict[str, Any]] = []
    request = ReportRequest(reports=reports)
    for label, folder in tqdm(pairs, desc="benchmark", disable=not settings.progress):
        name = folder.resolve().name
        if (label, name) in done:
            log.info("benchmark: %s / %s already in %s, skipped", label, name, results_path)
            rows.append(done[(label, name)])
            continue
        cfg = configs[label]
        split = load_dataset(folder, layout, normal, seed=cfg.seed)
        split.train = split.train[:max_train]
        if not split.test:
            raise DataError(f"category {split.name} ({folder}) has no test images to benchmark "
                            "on; add a test/ folder or leave the category out")
        out = output / folder_name(label)
        model, path, fit_s = fit_category(split, cfg, settings, out / "models")
        row, _ = evaluate_category(model, split, out, request, normal)
        row.update(backbone=label, category=name, fit_seconds=round(fit_s, 3),
                   config_id=ids[label])
        rows.append(row)
        log.info("benchmark: %s / %s: image AUROC %.4f, fitted in %.1fs -> %s", label, name,
                 row["image_auroc"], fit_s, path)
        write_table(results_table(rows), results_path)
    table = results_table(rows)
    write_table(table, results_path)
    if reports and len(table):
        from ..reports.plots import save_figure

        save_figure(comparison_plot(table), output / PLOT_FILE)
    return table


def read_finished(path: Path, ids: dict[str, str]) -> dict[tuple[str, str], dict[str, Any]]:
    """Rows of an earlier results.csv whose backbone is benchmarked again with the same
    settings (`ids`: backbone label -> config_id), by (backbone, category)."""
    import pandas as pd

    if not path.is_file():
        return {}
    try:
        frame = pd.read_csv(path, dtype={"backbone": str, "category": str, "config_id": str})
    except (ValueError, OSError) as exc:  # an unreadable or foreign file: start afresh
        log.warning("%s could not be read (%s); every pair is recomputed", path, exc)
        return {}
    if not set(KEY_COLUMNS + ("config_id", "image_auroc")) <= set(frame.columns):
        log.warning("%s is not a benchmark results table; every pair is recomputed", path)
        return {}
    finished = {}
    stale = 0
    for row in frame.to_dict("records"):
        if row["category"] == MEAN:
            continue
        if ids.get(row["backbone"]) != row["config_id"]:
            stale += row["backbone"] in ids
            continue
        finished[(row["backbone"], row["category"])] = {
            k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
    if stale:
        log.info("%s: %d rows were computed with other settings and are recomputed", path, stale)
    return finished


def results_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows per (backbone, category) in the given order, then one mean row per backbone."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=list(KEY_COLUMNS + MAIN_COLUMNS))
    means = []
    for label, part in frame.groupby("backbone", sort=False):
        mean: dict[str, Any] = {"backbone": label, "category": MEAN,
                                "config_id": part["config_id"].iloc[0]}
        for column in MEAN_COLUMNS:
            if column in part:
                mean[column] = pd.to_numeric(part[column], errors="coerce").mean()
        means.append(mean)
    frame = pd.concat([frame, pd.DataFrame(means)], ignore_index=True)
    first = [c for c in KEY_COLUMNS + MAIN_COLUMNS if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first]]


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    """Write `frame` as CSV to `path` atomically (a crash leaves the previous file)."""
    fd, tmp = tempfile.mkstemp(prefix=".results-", suffix=".csv", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            frame.to_csv(fh, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def comparison_plot(table: pd.DataFrame) -> Any:
    """Figure: image and pixel AUROC per category, one bar per backbone."""
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(dict.fromkeys(table["backbone"]))
    categories = list(dict.fromkeys(table["category"]))
    metrics = [m for m in ("image_auroc", "pixel_auroc") if table[m].notna().any()]
    side = max(4.0, 1.0 + 0.35 * len(categories) * len(labels))
    fig, axes = plt.subplots(1, max(1, len(metrics)), squeeze=False,
                             figsize=(side * max(1, len(metrics)), 3.8))
    width = 0.8 / len(labels)
    x = np.arange(len(categories))
    for ax, metric in zip(axes[0], metrics, strict=False):
        for k, label in enumerate(labels):
            part = table[table["backbone"] == label].set_index("category")
            values = [float(part[metric].get(c, np.nan)) for c in categories]
            ax.bar(x + (k - (len(labels) - 1) / 2) * width, values, width, label=label)
        ax.set_xticks(x)
        ax.set_xticklabels(categories, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel(metric.replace("_", " "))
        ax.legend(fontsize=7)
    fig.suptitle("Benchmark by category and backbone")
    return fig
