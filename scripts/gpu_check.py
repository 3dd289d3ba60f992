"""The CUDA path, checked on a machine with a GPU (run by hand; CI has none).

    python scripts/gpu_check.py DATA [DATA ...] [--backbone efficientnet_lite0]

For each dataset (MVTec layout): fit on the GPU and on the CPU with the same settings, compare
image scores and AUROC, time fit and predict on both, check that the folded backbone gives the
same features on the GPU as the unfolded one, and run `patchcore fit/predict --device cuda`
from the shell. Prints one JSON line per check and exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from patchcore import PatchCore, load_dataset, metrics
from patchcore.engine.features import FeatureExtractor
from patchcore.engine.index import ExactSearch


def _fit_score(data: str, device: str, backbone: str) -> dict:
    split = load_dataset(data)
    model = PatchCore(backbone=backbone, device=device, percentage=0.1, progress=False)
    t0 = time.perf_counter()
    model.fit(split)
    fit_s = time.perf_counter() - t0
    paths = [s.path for s in split.test]
    model.predict(paths[:2])  # warm-up
    times = []
    scores = []
    for p in paths:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        scores.append(float(model.predict(p).scores[0]))
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    pred = model.score(split.test, masks=True)
    batch_s = time.perf_counter() - t0
    labels = np.array([s.label for s in split.test])
    return {"fit_s": round(fit_s, 2), "predict_ms_b1": round(1000 * float(np.median(times)), 2),
            "score_img_s": round(len(paths) / batch_s, 1), "scores": scores,
            "image_auroc": metrics.image_auroc(labels, np.array(scores)),
            "pixel_auroc": metrics.pixel_auroc(pred.masks, pred.original_maps()),
            "bank_rows": len(model.members_[0].bank)}


def _search_check() -> bool:
    """ExactSearch on the GPU against the CPU's (the bfloat16 shortlist where the CPU has it):
    the same nearest rows, values within float32 rounding, for euclidean and cosine."""
    ok = True
    for seed, (nq, nb, d) in enumerate([(784, 7840, 168), (784, 7840, 1536), (3000, 20000, 64)]):
        rng = np.random.default_rng(seed)
        bank = (rng.standard_normal((nb, d)) + 3).astype(np.float32)
        queries = (bank[rng.integers(0, nb, nq)] + 0.3 * rng.standard_normal((nq, d))
                   ).astype(np.float32)
        queries[:8] = bank[:8]  # exact matches
        for cosine in (False, True):
            gpu = ExactSearch(bank, cosine, "cuda")
            cpu = ExactSearch(bank, cosine, "cpu")
            t0 = time.perf_counter()
            gv, gi = gpu.search(queries, 1, None)
            torch.cuda.synchronize()
            g_ms = 1000 * (time.perf_counter() - t0)
            cv, ci = cpu.search(queries, 1, None)
            same = float((gi == ci).mean())
            err = float(np.abs(gv - cv).max() / max(np.abs(cv).max(), 1e-12))
            good = same >= 0.999 and err < 1e-5 and gpu.shortlist is None
            ok &= good
            print(json.dumps({"check": f"search {nq}x{nb}x{d} cosine={cosine}",
                              "same_rows": same, "max_rel_value_err": err, "gpu_ms": round(g_ms, 2),
                              "cpu_shortlist": cpu.shortlist is not None, "ok": good}), flush=True)
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="+")
    p.add_argument("--backbone", default="efficientnet_lite0")
    args = p.parse_args()
    ok = True
    print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                      "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                      else None}), flush=True)
    if not torch.cuda.is_available():
        print("no CUDA GPU here", file=sys.stderr)
        return 2
    x = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    folded = FeatureExtractor(args.backbone, device="cuda", aggregation="native")
    plain = FeatureExtractor(args.backbone, device="cuda", aggregation="native",
                             fold_norms=False)
    a, b = folded(x).cpu(), plain(x).cpu()
    err = float((a - b).abs().max() / b.abs().max())
    fold_ok = folded.folded_norms > 0 and err < 1e-3
    ok &= fold_ok
    print(json.dumps({"check": "fold on cuda", "folded": folded.folded_norms,
                      "max_rel_err": err, "ok": fold_ok}), flush=True)
    search_ok = _search_check()
    ok &= search_ok
    for data in args.data:
        gpu = _fit_score(data, "cuda", args.backbone)
        cpu = _fit_score(data, "cpu", args.backbone)
        corr = float(np.corrcoef(gpu["scores"], cpu["scores"])[0, 1])
        same = (abs(gpu["image_auroc"] - cpu["image_auroc"]) <= 0.02 and corr > 0.99)
        ok &= same
        for r in (gpu, cpu):
            r.pop("scores")
        print(json.dumps({"check": f"fit+predict {Path(data).name}", "cuda": gpu, "cpu": cpu,
                          "score_correlation": corr, "ok": same}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cli = [sys.executable, "-m", "patchcore.cli", "-q"]
        data = args.data[0]
        r1 = subprocess.run([*cli, "fit", data, "-o", f"{tmp}/res", "-b", args.backbone,
                             "--device", "cuda"], capture_output=True, text=True)
        model_dir = next(Path(tmp, "res", "models").iterdir(), None) if r1.returncode == 0 \
            else None
        r2 = subprocess.run([*cli, "predict", str(model_dir), f"{data}/test", "-o",
                             f"{tmp}/pred", "--device", "cuda"], capture_output=True, text=True
                            ) if model_dir else r1
        cli_ok = r1.returncode == 0 and r2.returncode == 0
        ok &= cli_ok
        print(json.dumps({"check": "cli --device cuda", "ok": cli_ok,
                          "stderr": (r1.stderr + r2.stderr)[-600:]}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
