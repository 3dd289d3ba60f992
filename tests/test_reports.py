"""Reports, thresholds and OOD analysis on a small generated dataset."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from openpyxl import load_workbook

from patchcore import metrics
from patchcore.data.layouts import load_dataset
from patchcore.data.synthetic import make_synthetic_dataset
from patchcore.evaluation.evaluate import evaluate_split
from patchcore.model import PatchCore
from patchcore.reports import (
    save_anomaly_scores,
    save_segmentation_images,
    write_category_report,
)
from patchcore.reports.ood import group_table, ood_report
from patchcore.reports.plots import confusion_plot, density_plot, pr_plot, roc_plot, strip_plot
from patchcore.reports.spreadsheet import misclassified


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A model fitted on a `val`-layout dataset (validation with anomalies), and its test run."""
    root = tmp_path_factory.mktemp("reports_data")
    make_synthetic_dataset(root, ("carpet",), n_train=8, n_test_good=4, n_test_defect=6,
                           size=128, seed=3, layout="val")
    split = load_dataset(root / "carpet")
    model = PatchCore(**FAST)
    model.progress = False
    model.fit(split)
    row, pred = evaluate_split(model, split)
    return model, split, row, pred


def test_threshold_from_validation_is_applied_unchanged_to_test(fitted) -> None:
    model, split, row, pred = fitted
    val = model.calibration_prediction_
    assert val is not None and len(val) == len(split.val)
    _, expected = metrics.f1_max(np.maximum(val.true_labels, 0), val.scores)
    thr = model.calibration_.image_threshold
    assert thr == expected and "f1_max" in model.calibration_.image_threshold_rule
    assert row["threshold"] == thr
    assert (pred.labels == (pred.scores >= thr)).all()
    at = metrics.precision_recall_f1(pred.true_labels, pred.scores, thr)
    for key in ("precision", "recall", "f1"):
        assert row[f"{key}_at_threshold"] == pytest.approx(at[key], nan_ok=True)


def test_good_only_thresholds(fitted) -> None:
    model, split, _, _ = fitted
    saved = model.calibration_
    try:
        cal = model.calibrate(split.val, threshold_fpr=0.25)
        val = model.calibration_prediction_
        good = val.scores[np.asarray(val.true_labels) == 0]
        thr = cal.image_threshold
        assert thr >= metrics.threshold_at_fpr(good, 0.25)
        assert np.mean(good >= thr) <= 0.25  # compared in float32, as the model does
        assert np.mean(good >= np.float32(metrics.threshold_at_fpr(good, 0.25))) >= 0.25
        assert np.mean(good >= thr) == np.mean(good.astype(np.float64) >= thr)
        assert "false-positive" in cal.image_threshold_rule
        cal = model.calibrate(split.val, threshold_percentile=90)
        assert cal.image_threshold == pytest.approx(np.percentile(good, 90))
    finally:
        model.calibration_ = saved


def test_plot_axis_labels(fitted) -> None:
    _, _, _, pred = fitted
    y = np.maximum(pred.true_labels, 0)
    cases = [
        (density_plot(pred.scores, y, 1.0), "anomaly score", "density"),
        (confusion_plot(y, pred.labels), "predicted label", "true label"),
        (roc_plot(y, pred.scores), "false positive rate", "true positive rate"),
        (pr_plot(y, pred.scores, 1.0), "recall", "precision"),
        (strip_plot(pred.scores, pred.groups), "group", "anomaly score"),
    ]
    for fig, xlabel, ylabel in cases:
        ax = fig.axes[0]
        assert (ax.get_xlabel(), ax.get_ylabel()) == (xlabel, ylabel)
    density = cases[0][0].axes[0]
    assert any(line.get_xdata()[0] == 1.0 for line in density.get_lines())  # threshold line


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.links.append(value)


def test_category_report(fitted, tmp_path: Path) -> None:
    model, split, row, pred = fitted
    # A threshold in the middle of the test scores guarantees some misclassified images.
    pred.labels = (pred.scores >= np.median(pred.scores)).astype(np.int64)
    folder = tmp_path / "reports" / "carpet"
    files = write_category_report(model, split, pred, row, folder)
    for name in ("Density_val.png", "Density_test.png", "matrix.png", "roc.png", "pr.png",
                 "Bad_predictions.xlsx", "results.csv", "results.json", "index.html"):
        assert (folder / name).is_file(), name
    assert files["index"] == folder / "index.html"

    wrong = np.flatnonzero(pred.labels != pred.true_labels)
    assert len(wrong) > 0 and sorted(misclassified(pred)) == wrong.tolist()
    ws = load_workbook(folder / "Bad_predictions.xlsx").active
    rows = list(ws.iter_rows(min_row=2, values_only=True))
    assert len(rows) == len(wrong)
    assert sorted(r[0] for r in rows) == sorted(str(pred.paths[i]) for i in wrong)
    assert len(ws._images) == 2 * len(wrong)  # image and overlay thumbnails

    page = (folder / "index.html").read_text()
    parser = _Links()
    parser.feed(page)
    assert len(parser.links) >= 2 * len(pred) + 5
    for link in parser.links:
        assert link.startswith("data:") or (folder / link).exists(), link
    assert "sortTable" in page and page.count("<tr class='bad'>") == len(wrong)
    header = (folder / "results.csv").read_text().splitlines()[0]
    assert "image_auroc" in header and "f1_at_threshold" in header


def test_segmentation_images_and_scores(fitted, tmp_path: Path) -> None:
    model, split, _, pred = fitted
    paths = save_segmentation_images(model, split.test, pred, tmp_path / "seg")
    assert len(paths) == len(split.test)
    from PIL import Image

    for i in (0, len(paths) - 1):
        w, h = Image.open(pred.paths[i]).size
        assert Image.open(paths[i]).size == (3 * w, h)
        assert paths[i].name == f"{pred.groups[i]}_{Path(pred.paths[i]).stem}.png"
    csv_path = save_anomaly_scores(pred, tmp_path / "scores" / "carpet.csv")
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "path,group,label,score" and len(lines) == len(pred) + 1


def test_ood_report_on_nested_groups(fitted, tmp_path: Path) -> None:
    model, _, _, _ = fitted
    root = tmp_path / "folder_data"
    make_synthetic_dataset(root, ("carpet",), n_train=2, n_test_good=3, n_test_defect=4,
                           size=128, seed=3, layout="folder")
    split = load_dataset(root / "carpet")
    assert split.layout == "folder"
    pred = model.score(split.test)
    thr = model.calibration_.image_threshold
    rows, section = ood_report(pred, tmp_path / "ood", "good", thr)
    names = [r["group"] for r in rows]
    assert names[0] == "good" and "scratch" in names and "scratch/batch1" in names
    assert math.isnan(rows[0]["auroc_vs_normal"])
    assert all(0.0 <= r["auroc_vs_normal"] <= 1.0 for r in rows[1:])
    assert sum(r["n"] for r in rows if "/" in r["group"] or r["group"] == "good") == len(pred)
    for name in ("ood_groups.csv", "ood_strip.png", "ood_density.png", "ood_samples.png"):
        assert (tmp_path / "ood" / name).is_file()
    assert re.search(r"<table", section)


def test_group_table_auroc() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.15])
    groups = ["good", "good", "good", "a/x", "a/y", "b"]
    rows = {r["group"]: r for r in group_table(scores, groups, "good", threshold=0.5)}
    assert rows["a"]["auroc_vs_normal"] == 1.0 and rows["a"]["n"] == 2
    assert rows["b"]["auroc_vs_normal"] == pytest.approx(1 / 3)
    assert rows["a/x"]["flagged_share"] == 1.0 and rows["good"]["flagged_share"] == 0.0


def test_evaluate_cli_saves_reports(fitted, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from patchcore.cli import app

    model, split, _, _ = fitted
    model_dir = model.save(tmp_path / "models" / "carpet")
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, [
        "-q", "evaluate", str(model_dir), str(split.root), "--device", "cpu", "-o", str(out),
        "--save-reports", "--save-anomaly-scores", "--log-project", "P", "--log-group", "G"])
    assert result.exit_code == 0, result.output
    base = out / "P" / "G"
    assert (base / "results.csv").is_file() and (base / "scores" / "carpet.csv").is_file()
    for name in ("index.html", "Density_val.png", "Density_test.png", "Bad_predictions.xlsx"):
        assert (base / "reports" / "carpet" / name).is_file(), name
    result = CliRunner().invoke(app, ["evaluate", str(model_dir), str(split.root),
                                      "--tracker", "nonexistent-tracker", "-o", str(out)])
    assert result.exit_code != 0


def test_tracking_folders_and_missing_tracker(tmp_path: Path) -> None:
    import importlib.util

    from patchcore.errors import ConfigError
    from patchcore.reports.tracking import Tracker, run_folder

    assert run_folder(tmp_path, "P", "G") == tmp_path / "P" / "G"
    assert run_folder(tmp_path, None, None) == tmp_path
    Tracker(None, tmp_path).log_metrics({"a": 1.0})  # no tracker: a no-op
    for kind in ("mlflow", "wandb"):
        if importlib.util.find_spec(kind) is None:
            with pytest.raises(ConfigError, match="not installed"):
                Tracker(kind, tmp_path)
    with pytest.raises(ConfigError):
        Tracker("tensorboard", tmp_path)


def test_overlay_leaves_normal_pixels_clear() -> None:
    from PIL import Image

    from patchcore.errors import DataError
    from patchcore.reports.overlay import overlay

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    cold = rng.uniform(0.0, 0.4999, (24, 32))
    assert np.array_equal(np.asarray(overlay(image, cold)), np.asarray(image))
    hot = cold.copy()
    hot[4:10, 6:14] = 1.0
    hot[14:18, 20:24] = 0.6
    out, base = np.asarray(overlay(image, hot), dtype=int), np.asarray(image, dtype=int)
    changed = (out != base).any(axis=2)
    assert changed[4:10, 6:14].all() and changed[14:18, 20:24].all()
    assert changed.sum() == 6 * 8 + 4 * 4  # nothing below the threshold is tinted
    strong = np.abs(out - base)[4:10, 6:14].mean()
    assert strong > np.abs(out - base)[14:18, 20:24].mean() > 0  # the tint grows with the map
    with pytest.raises(DataError, match="does not fit"):
        overlay(image, cold.T)
