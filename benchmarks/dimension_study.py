"""Bank dimension study (issue 16): image/pixel AUROC, PRO and predict latency per embedding.

    python benchmarks/dimension_study.py [--max-train 100] [--datasets magnetic_tile hazelnut_toy]

Rows: the native-width concatenation (the default; 168-d for efficientnet_lite2) and the
reference pipeline (adaptive pooling to 1024, then to the target dimension) at 1024, 512, 384
and 256. Every row fits on the same training images with the same seed and 10% coreset, and
scores every test image whole (pixel metrics at original size). Latency: median of batch-1
`predict` over 40 test images after 3 warm-up images, same process, 2 threads. Prints a table
and writes benchmarks/out/dimension_study.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
ROWS = [("native", {"aggregation": "native"})] + [
    (f"reference {d}", {"aggregation": "reference", "target_embed_dimension": d})
    for d in (1024, 512, 384, 256)]


def main() -> None:
    import numpy as np
    import torch

    from patchcore import PatchCore, load_dataset, metrics

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["magnetic_tile", "hazelnut_toy"])
    p.add_argument("--max-train", type=int, default=100)
    p.add_argument("--backbone", default="efficientnet_lite2")
    args = p.parse_args()
    torch.set_num_threads(2)
    results = []
    for name in args.datasets:
        split = load_dataset(SHARED / name)
        train = split.train[: args.max_train]
        labels = np.array([s.label for s in split.test])
        for row, extra in ROWS:
            model = PatchCore(backbone=args.backbone, percentage=0.1, progress=False, **extra)
            t0 = time.perf_counter()
            model.fit(train)
            fit_s = time.perf_counter() - t0
            pred = model.score(split.test, masks=True)
            maps = pred.original_maps()
            paths = [s.path for s in split.test[:43]]
            times = []
            for path in paths:
                t0 = time.perf_counter()
                model.predict(path)
                times.append(time.perf_counter() - t0)
            r = {"dataset": name, "row": row, "dim": int(model.members_[0].bank.features.shape[1]),
                 "bank_rows": len(model.members_[0].bank), "fit_s": round(fit_s, 1),
                 "image_auroc": round(metrics.image_auroc(labels, pred.scores), 4),
                 "pixel_auroc": round(metrics.pixel_auroc(pred.masks, maps), 4),
                 "pro": round(metrics.pro_score(pred.masks, maps), 4),
                 "predict_ms_b1": round(1000 * float(np.median(times[3:])), 1)}
            results.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{'dataset':<15}{'row':<16}{'dim':>5}{'img':>8}{'pix':>8}{'PRO':>8}{'ms b1':>8}")
    for r in results:
        print(f"{r['dataset']:<15}{r['row']:<16}{r['dim']:>5}{r['image_auroc']:>8.4f}"
              f"{r['pixel_auroc']:>8.4f}{r['pro']:>8.4f}{r['predict_ms_b1']:>8.1f}")
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "dimension_study.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
