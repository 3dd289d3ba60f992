"""Everything written for one evaluated category: the report folder and the CLI extras.

`write_category_report` writes plots, Bad_predictions.xlsx, results and index.html into a
folder; `save_segmentation_images` (image | mask | overlay strips) and `save_anomaly_scores`
(a CSV of scores) back the matching `evaluate --save-...` options.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SKIP_METRICS = ("category",)


def _true_labels(pred: Any) -> np.ndarray:
    """True labels with unknown (-1) counted as good."""
    return np.maximum(np.asarray(pred.true_labels), 0)


def write_category_report(
    model: Any, split: Any, pred: Any, row: dict[str, Any], folder: Path,
    normal: str = "good", thumb: int = 112, max_unseen: int = 50,
) -> dict[str, Path]:
    """Plots, Bad_predictions.xlsx, results.csv/json and index.html of one category.

    `pred` is the test Prediction and `row` its results row (evaluation.evaluate_split). The
    validation density uses `model.calibration_prediction_`, or scores `split.val` (or up to
    `max_unseen` normal training images the model did not train on) for a model loaded from
    disk. Folder layouts with several test groups get an OOD section.
    """
    from ..evaluation.evaluate import write_results
    from .html import data_table, embed_file, img_tag, metrics_table, write_page
    from .plots import confusion_plot, density_plot, pr_plot, roc_plot, save_figure
    from .spreadsheet import misclassified, write_bad_predictions
    from .thumbs import data_uri, image_thumbnail, overlay_image, thumbnail

    folder.mkdir(parents=True, exist_ok=True)
    cal = model.calibration_
    thr = cal.image_threshold
    labels = _true_labels(pred)
    out: dict[str, Path] = {}
    val_pred, val_title = getattr(model, "calibration_prediction_", None), "Validation scores"
    if val_pred is None and getattr(split, "val", None):
        val_pred = model.score(split.val, desc=f"validation [{split.name}]")
    elif val_pred is None and model.train_paths_:
        # A model loaded from disk, calibrated on held-out training images: score normal
        # training images it has not seen (the calibration images among them).
        seen = {os.path.abspath(model.training_path(i)) for i in range(len(model.train_paths_))}
        unseen = [s for s in split.train if os.path.abspath(s.path) not in seen][:max_unseen]
        if unseen:
            val_pred = model.score(unseen, desc=f"held-out normals [{split.name}]")
            val_title = f"Held-out normal training images (n={len(unseen)})"
    if val_pred is not None:
        out["Density_val"] = save_figure(
            density_plot(val_pred.scores, _true_labels(val_pred), thr, val_title),
            folder / "Density_val.png")
    out["Density_test"] = save_figure(
        density_plot(pred.scores, labels, thr, "Test scores"), folder / "Density_test.png")
    out["matrix"] = save_figure(confusion_plot(labels, pred.labels), folder / "matrix.png")
    out["roc"] = save_figure(roc_plot(labels, pred.scores), folder / "roc.png")
    out["pr"] = save_figure(pr_plot(labels, pred.scores, thr), folder / "pr.png")
    out["Bad_predictions"] = write_bad_predictions(pred, cal, folder / "Bad_predictions.xlsx")
    out["results"] = write_results([row], folder)

    sections: list[tuple[str, str]] = [
        ("Metrics", metrics_table(row, SKIP_METRICS)),
        ("Calibration", metrics_table(cal.to_dict())),
        ("Plots", "<div class='plots'>" + "".join(
            img_tag(embed_file(p), name) for name, p in out.items() if p.suffix == ".png")
         + "</div>"),
    ]
    if row.get("train_test_overlap"):
        sections.insert(0, ("Split check: good test images look like training images",
                            _overlap_section(model, pred, row)))
    if split.layout in ("folder", "test") and len(set(pred.groups)) >= 3:
        from .ood import ood_report

        _, section = ood_report(pred, folder, normal, thr)
        out["ood"] = folder / "ood_groups.csv"
        sections.append(("Out-of-distribution groups", section))
    bad = set(misclassified(pred))
    rows = []
    for i in range(len(pred)):
        img = img_tag(data_uri(image_thumbnail(pred.paths[i], thumb)), "image")
        ov = img_tag(data_uri(thumbnail(overlay_image(pred, i, cal), thumb)), "overlay")
        rows.append([
            (img, i), (ov, i), str(pred.paths[i]), pred.groups[i] if pred.groups else "",
            "anomalous" if labels[i] else "good",
            (f"{pred.scores[i]:.4f}", float(pred.scores[i])),
            (f"{pred.calibrated[i]:.4f}", float(np.nan_to_num(pred.calibrated[i]))),
            pred.label_names[i],
            ("<b>wrong</b>" if i in bad else "ok", int(i in bad)),
        ])
    columns = ["image", "overlay", "path", "group", "true label", "score", "calibrated",
               "predicted", "correct"]
    sections.append((f"Test images ({len(pred)}, {len(bad)} misclassified; click a header to "
                     "sort)", data_table(columns, rows, "images",
                                ["bad" if i in bad else "" for i in range(len(pred))])))
    out["index"] = write_page(folder / "index.html", f"PatchCore report: {split.name}", sections)
    return out


def _overlap_section(model: Any, pred: Any, row: dict[str, Any], top: int = 10) -> str:
    """The overlap check's verdict and the good test images closest to one training image."""
    from ..evaluation.overlap import source_shares
    from .html import data_table

    best, share = source_shares(model, pred)
    labels = _true_labels(pred)
    goods = [i for i in np.argsort(-share, kind="stable") if labels[i] == 0][:top]
    text = (f"<p>A median {row['good_source_share']:.0%} of a good test image's patches match "
            f"one training image, against {row['anomalous_source_share']:.0%} for the anomalous "
            "test images: the good test images are probably other shots of training parts, and "
            "every metric in this report is optimistic. Split by part before trusting them.</p>")
    rows = [[str(pred.paths[i]), str(model.training_path(int(best[i]))),
             (f"{share[i]:.0%}", float(share[i]))] for i in goods]
    return text + data_table(["good test image", "closest training image", "patches from it"],
                             rows, "overlap")


def _safe(name: str) -> str:
    """A group name usable in a file name."""
    return name.replace("/", "_").replace("\\", "_")


def save_segmentation_images(
    model: Any, samples: Sequence[Any], pred: Any, folder: Path
) -> list[Path]:
    """image | ground-truth mask | heatmap overlay, side by side at the original resolution."""
    from ..data.images import load_image, load_mask
    from .thumbs import overlay_image

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, sample in enumerate(samples):
        image = load_image(pred.paths[i]).convert("RGB")
        w, h = image.size
        if getattr(sample, "mask", None) is not None:
            mask = load_mask(sample.mask, (w, h))
        else:
            mask = np.zeros((h, w), dtype=bool)
        mask_img = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).convert("RGB")
        canvas = Image.new("RGB", (3 * w, h))
        canvas.paste(image, (0, 0))
        canvas.paste(mask_img, (w, 0))
        canvas.paste(overlay_image(pred, i, model.calibration_), (2 * w, 0))
        group = pred.groups[i] if pred.groups else ""
        path = folder / f"{_safe(group)}_{Path(pred.paths[i]).stem}.png"
        canvas.save(path)
        written.append(path)
    return written


def save_anomaly_scores(pred: Any, path: Path) -> Path:
    """CSV with path, group, label and raw score of every image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "group", "label", "score"])
        labels = pred.true_labels if pred.true_labels is not None else [-1] * len(pred)
        for i in range(len(pred)):
            writer.writerow([str(pred.paths[i]), pred.groups[i] if pred.groups else "",
                             int(labels[i]), f"{float(pred.scores[i]):.6f}"])
    return path
