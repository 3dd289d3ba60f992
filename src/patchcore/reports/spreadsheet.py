"""`Bad_predictions.xlsx`: the misclassified test images with scores and embedded thumbnails."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from openpyxl import Workbook
from openpyxl.drawing.image import Image as XLImage
from openpyxl.styles import Font

from .thumbs import image_thumbnail, overlay_image, png_bytes, thumbnail

HEADER = ("path", "group", "true label", "raw score", "calibrated score", "predicted label",
          "image", "overlay")
THUMB = 96


if TYPE_CHECKING:
    from ..engine.calibration import Calibration


def misclassified(pred: Any) -> list[int]:
    """Indices of images whose predicted label differs from the true label (labelled only)."""
    if pred.true_labels is None:
        return []
    true = np.asarray(pred.true_labels)
    return [i for i in range(len(pred)) if true[i] >= 0 and pred.labels[i] >= 0
            and int(pred.labels[i]) != int(true[i])]


def _name(label: int) -> str:
    return "anomalous" if label == 1 else "good"


def write_bad_predictions(
    pred: Any, calibration: Calibration, path: Path, thumbnails: bool = True
) -> Path:
    """One row per misclassified image: path, labels, raw and calibrated scores, thumbnails."""
    wb = Workbook()
    ws = wb.active
    ws.title = "bad predictions"
    ws.append(list(HEADER))
    for cell in ws[1]:
        cell.font = Font(bold=True)
    ws.column_dimensions["A"].width = 60
    ws.column_dimensions["G"].width = 14
    ws.column_dimensions["H"].width = 14
    for r, i in enumerate(misclassified(pred), start=2):
        ws.append([
            str(pred.paths[i]), pred.groups[i] if pred.groups else "",
            _name(int(pred.true_labels[i])), float(pred.scores[i]),
            None if np.isnan(pred.calibrated[i]) else float(pred.calibrated[i]),
            pred.label_names[i],
        ])
        if thumbnails:
            ws.row_dimensions[r].height = THUMB * 0.78
            for col, img in (("G", image_thumbnail(pred.paths[i], THUMB)),
                             ("H", thumbnail(overlay_image(pred, i, calibration), THUMB))):
                xl = XLImage(io.BytesIO(png_bytes(img)))
                ws.add_image(xl, f"{col}{r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    wb.save(path)
    return path
