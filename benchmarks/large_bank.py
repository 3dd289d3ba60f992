"""Large banks (issue 16): all 752 magnetic_tile training images, exact vs approximate search and
smaller coresets, image/pixel AUROC and batch-1 predict latency, one process, 2 threads.

    python benchmarks/large_bank.py [--max-train 752] [--percentages 0.1 0.02]

Rows: each coreset percentage with the exact (flat) search, and for the first one the same bank
rows searched exactly with float32 products only (no bfloat16 shortlist, engine/shortlist.py)
and with faiss IVF (nprobe 16). Latency: median batch-1 `predict` over 40 test images after 3
warm-ups. Prints a table and writes benchmarks/out/large_bank.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"


def _evaluate(model, split, labels, row: str) -> dict:
    import numpy as np

    from patchcore import metrics

    pred = model.score(split.test, masks=True)
    maps = pred.original_maps()
    times = []
    for s in split.test[:43]:
        t0 = time.perf_counter()
        model.predict(s.path)
        times.append(time.perf_counter() - t0)
    r = {"row": row, "bank_rows": len(model.members_[0].bank),
         "dim": int(model.members_[0].bank.features.shape[1]),
         "image_auroc": round(metrics.image_auroc(labels, pred.scores), 4),
         "pixel_auroc": round(metrics.pixel_auroc(pred.masks, maps), 4),
         "predict_ms_b1": round(1000 * float(np.median(times[3:])), 1)}
    print(json.dumps(r), flush=True)
    return r


def main() -> None:
    import numpy as np
    import torch

    from patchcore import PatchCore, load_dataset
    from patchcore.engine.bank import bank_index

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-train", type=int, default=752)
    p.add_argument("--percentages", type=float, nargs="+", default=[0.1, 0.02])
    args = p.parse_args()
    torch.set_num_threads(2)
    split = load_dataset(SHARED / "magnetic_tile")
    labels = np.array([s.label for s in split.test])
    train = split.train[: args.max_train]
    rows = []
    for i, pct in enumerate(args.percentages):
        model = PatchCore(backbone="efficientnet_lite2", percentage=pct, progress=False)
        t0 = time.perf_counter()
        model.fit(train)
        fit_s = round(time.perf_counter() - t0, 1)
        rows.append({**_evaluate(model, split, labels, f"{pct:.0%} coreset, exact"),
                     "fit_s": fit_s})
        if i == 0:
            from patchcore.engine.index import ExactSearch

            ExactSearch.SHORTLIST = "off"
            for m in model.members_:
                m.index = bank_index(m.bank.features, model.config, model.device)
            rows.append(_evaluate(model, split, labels, f"{pct:.0%} coreset, exact fp32"))
            ExactSearch.SHORTLIST = "auto"
            model.config = model.config.replace(index="ivf")
            for m in model.members_:
                m.index = bank_index(m.bank.features, model.config, model.device)
            rows.append(_evaluate(model, split, labels, f"{pct:.0%} coreset, faiss IVF"))
    print(f"\n{'row':<28}{'rows':>8}{'img':>8}{'pix':>8}{'ms b1':>8}")
    for r in rows:
        print(f"{r['row']:<28}{r['bank_rows']:>8}{r['image_auroc']:>8.4f}{r['pixel_auroc']:>8.4f}"
              f"{r['predict_ms_b1']:>8.1f}")
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "large_bank.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
