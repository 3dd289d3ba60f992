"""The demo behind `patchcore demo`: generate a small textured dataset with defects, fit
PatchCore, evaluate it with a report, and write predictions, all through the library."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import PatchCoreConfig, RuntimeSettings

log = logging.getLogger(__name__)

CATEGORY = "carpet"


@dataclass
class DemoResult:
    """Where the demo wrote everything, its metrics and how long it took."""

    data: Path
    model: Path
    results: Path
    report: Path
    predictions: Path
    metrics: dict[str, Any]
    seconds: float


def run_demo(
    output: str | Path = "patchcore_demo",
    config: PatchCoreConfig | None = None,
    settings: RuntimeSettings | None = None,
    n_train: int = 24,
    size: int = 256,
    say: Callable[[str], None] = log.info,
) -> DemoResult:
    """Generate OUTPUT/data (carpet with scratches and spots, masks included), fit a model
    (`config`, default hyperparameters when None) into OUTPUT/results/models/carpet, evaluate
    it with a report under OUTPUT/results/reports/carpet, and write the test images' maps,
    overlays and predictions.csv to OUTPUT/predictions (replacing an earlier demo's)."""
    from .data.layouts import load_dataset
    from .data.synthetic import make_synthetic_dataset
    from .evaluation.evaluate import evaluate_split, write_results
    from .model import PatchCore
    from .reports import write_category_report
    from .reports.predictions import PredictionWriter, check_output_folder

    t0 = time.perf_counter()
    output = Path(output)
    check_output_folder(output)
    data = make_synthetic_dataset(output / "data", categories=(CATEGORY,), n_train=n_train,
                                  n_test_good=6, n_test_defect=8, size=size, seed=0)
    say(f"generated a dataset with scratches and spots: {data}")
    split = load_dataset(data / CATEGORY, layout="mvtec")
    model = PatchCore(config, settings).fit(split)
    results = output / "results"
    model_dir = model.save(results / "models" / split.name)
    say(f"fitted on {len(split.train)} images -> {model_dir}")
    row, pred = evaluate_split(model, split)
    write_results([row], results)
    report = write_category_report(model, split, pred, row, results / "reports" / split.name)
    predictions = output / "predictions"
    with PredictionWriter(predictions, pred.paths, overwrite=True) as writer:
        writer.write(pred, model.calibration_)
    return DemoResult(data=data, model=model_dir, results=results / "results.csv",
                      report=report["index"], predictions=predictions, metrics=row,
                      seconds=time.perf_counter() - t0)
