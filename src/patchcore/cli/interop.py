"""`patchcore import-pci`: convert a patchcore-inspection model folder (interop/pci.py)."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import RuntimeSettings
from .options import PATH, runtime_options
from .shell import app, current_run, say


@app.command("import-pci")
@click.argument("folder", type=PATH)
@click.option("-o", "--output", type=PATH, required=True, help="Model folder to write.")
@click.option("--member", type=click.IntRange(1, 64),
              help="Which model of an ensemble folder (Ensemble-<i>-<n>_ files) to import.")
@click.option("--backbone", help="Our backbone entry for an unknown patchcore-inspection "
              "backbone name (same architecture and weights).")
@click.option("--resize", type=click.IntRange(16, 4096), help="Shorter side before the centre "
              "crop, not saved by patchcore-inspection [default: 256 for 224-pixel inputs].")
@click.option("--pretrained/--random-weights", default=True,
              help="Backbone weights (random: tests only).")
@click.option("--weights", help="Local weights file or folder (offline use).")
@click.option("--calibrate", "calibration_data", type=PATH, help="Category folder whose val/ "
              "(else test/) images set the thresholds; default: uncalibrated.")
@click.option("--threshold-fpr", type=click.FloatRange(0, 1),
              help="With --calibrate: image threshold at this false-positive rate.")
@runtime_options
def import_pci(folder: Path, output: Path, member: int | None, backbone: str | None,
               resize: int | None, pretrained: bool, weights: str | None,
               calibration_data: Path | None, threshold_fpr: float | None,
               settings: RuntimeSettings) -> None:
    """Convert the patchcore-inspection model FOLDER (nnscorer_search_index.faiss +
    patchcore_params.pkl) into our model folder OUTPUT; nothing in it is executed."""
    from ..data.layouts import load_dataset
    from ..interop import import_pci as convert_folder

    samples = None
    if calibration_data is not None:
        split = load_dataset(calibration_data)
        samples = split.val or split.test
    path = convert_folder(folder, output, member=member, backbone=backbone, resize=resize,
                          pretrained=pretrained, weights=weights, calibrate=samples,
                          threshold_fpr=threshold_fpr, settings=settings)
    current_run().kept.append(path)
    say(f"{folder} -> {path} ({'calibrated' if samples else 'uncalibrated: labels are -1'})")
