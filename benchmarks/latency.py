"""Where predict's time goes: a per-stage latency breakdown at batch 1 and batch 32, and the
process's cold start, measured separately.

    python benchmarks/latency.py                                  # efficientnet_lite2, 100 images
    python benchmarks/latency.py --backbone wide_resnet50_2 --random-weights \\
        --layers layer2 layer3
    python benchmarks/latency.py --max-train 752                  # a large bank

Stages, per image (a batch's time divided by its size): decode, preprocess (views), backbone
forward (batch norms folded, as predict runs it), patch features (the layer grids -> embeddings
step), nearest-neighbour search, image score, maps (upsampling + blur), whole-image map (back to
the original size), writing outputs (map .npy/.png and overlay, as `patchcore predict` does).
Beside them: end-to-end `PatchCore.predict` on paths, and the bare backbone forward (the
backbone as built, batch norms not folded, to the last needed layer) that issue 16 compares
against. Medians and p95 over every image of every repeat. Cold start runs in fresh processes:
`import patchcore` + model load + first prediction (split into their parts), and the wall time
of `patchcore predict MODEL IMAGE` from the shell. Prints a table, writes
benchmarks/out/latency[_<name>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SHARED = HERE.parent.parent / "shared" / "data"

STAGES = ["decode", "preprocess", "backbone", "patch_features", "search", "image_score", "maps",
          "to_original", "write"]


def _fit(args: argparse.Namespace, model_dir: Path) -> dict:
    from patchcore import PatchCore, load_dataset

    split = load_dataset(args.data)
    train = [s.path for s in split.train[: args.max_train]]
    model = PatchCore(backbone=args.backbone, layers=tuple(args.layers) if args.layers else None,
                      pretrained=not args.random_weights, percentage=args.coreset,
                      index=args.index, progress=False)
    t0 = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - t0
    model.save(model_dir)
    return {"n_train": len(train), "fit_s": round(fit_s, 2),
            "bank": list(model.members_[0].bank.features.shape)}


def _stats(values: list[float]) -> dict:
    ms = sorted(1000 * v for v in values)
    p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
    return {"median_ms": round(statistics.median(ms), 3), "p95_ms": round(p95, 3)}


def _breakdown(args: argparse.Namespace, model_dir: Path, batch: int) -> dict:
    import torch

    from patchcore import PatchCore, load_dataset
    from patchcore.data.images import load_image
    from patchcore.engine.features import FeatureExtractor
    from patchcore.engine.scoring import anomaly_maps, image_scores, patch_scores
    from patchcore.reports.predictions import PredictionWriter

    torch.set_num_threads(args.threads)
    model = PatchCore.load(model_dir, device="cpu", progress=False, batch_size=batch)
    members = model._ready()  # noqa: SLF001 - members with extractors and indexes built
    if len(members) != 1:
        raise SystemExit("the breakdown times one backbone; use a single-member model")
    member, cfg, pre = members[0], model.config, model.preprocessor
    ext, index = member.extractor, member.index
    torch.manual_seed(cfg.seed)
    bare = FeatureExtractor(ext.spec, ext.layers, pretrained=cfg.pretrained,
                            imagesize=cfg.imagesize, aggregation=cfg.aggregation,
                            fold_norms=False)
    mean = torch.tensor(ext.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(ext.spec.std).view(1, -1, 1, 1)
    paths = [s.path for s in load_dataset(args.data).test][: args.images]
    times: dict[str, list[float]] = {k: [] for k in [*STAGES, "sum", "predict", "bare_forward"]}
    k = cfg.anomaly_scorer_num_nn
    reweight = cfg.reweight_neighbourhood if cfg.reweight else 0
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats + 1):  # the first pass warms up and is not counted
            for start in range(0, len(paths), batch):
                chunk = paths[start : start + batch]
                t = [time.perf_counter()]
                images = [load_image(p) for p in chunk]
                t.append(time.perf_counter())
                views = torch.cat([pre.views(im) for im in images])
                t.append(time.perf_counter())
                grids = ext.backbone_grids((views - mean) / std)
                t.append(time.perf_counter())
                feats = ext.project(grids).cpu().numpy()
                t.append(time.perf_counter())
                ps, nearest = patch_scores(index, feats, k)
                t.append(time.perf_counter())
                image_scores(ps, feats, nearest, member.bank.features, index, reweight)
                t.append(time.perf_counter())
                maps = anomaly_maps(ps, cfg.imagesize, cfg.blur_sigma)
                t.append(time.perf_counter())
                for i, im in enumerate(images):
                    pre.to_original(maps[i : i + 1], im.size)
                t.append(time.perf_counter())
                pred = model.predict(chunk)
                t_pred = time.perf_counter()
                with PredictionWriter(Path(tmp) / f"r{repeat}", chunk, overwrite=True) as w:
                    w.write(pred, model.calibration_)
                t_write = time.perf_counter()
                with torch.inference_mode():
                    bare.backbone_grids((views - mean) / std)
                t_bare = time.perf_counter()
                if repeat == 0:
                    continue
                n = len(chunk)
                for j, stage in enumerate(STAGES[:-1]):
                    times[stage].append((t[j + 1] - t[j]) / n)
                times["write"].append((t_write - t_pred) / n)
                times["predict"].append((t_pred - t[-1]) / n)
                times["bare_forward"].append((t_bare - t_write) / n)
                times["sum"].append((t[-1] - t[0] + t_write - t_pred) / n)
    out = {k: _stats(v) for k, v in times.items()}
    out["ratio_predict_to_bare_forward"] = round(
        out["predict"]["median_ms"] / out["bare_forward"]["median_ms"], 3)
    out["folded_norms"] = int(ext.folded_norms)
    out["samples"] = len(times["predict"])
    return out


_COLD = """
import os, time, sys, json
t0 = time.perf_counter()
import patchcore
t1 = time.perf_counter()
model = patchcore.PatchCore.load(sys.argv[1], device="cpu", progress=False)
t2 = time.perf_counter()
model._ready()
t3 = time.perf_counter()
model.predict(sys.argv[2])
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "extractor_and_index_s": t3 - t2,
                  "first_predict_s": t4 - t3}))
"""


def _cold_start(args: argparse.Namespace, model_dir: Path) -> dict:
    from patchcore import load_dataset

    if args.cold_repeats < 1:
        return {}
    image = str(load_dataset(args.data).test[0].path)
    parts = []
    shell = []
    exe = Path(sys.executable).with_name("patchcore")
    for _ in range(args.cold_repeats):
        r = subprocess.run([sys.executable, "-c", _COLD, str(model_dir), image],
                           capture_output=True, text=True, check=True)
        parts.append(json.loads(r.stdout.strip().splitlines()[-1]))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            subprocess.run([str(exe), "-q", "predict", str(model_dir), image, "-o", tmp,
                            "--overwrite"], check=True, capture_output=True)
            shell.append(time.perf_counter() - t0)
    out = {k: round(statistics.median(p[k] for p in parts), 3) for k in parts[0]}
    out["patchcore_predict_wall_s"] = round(statistics.median(shell), 3)
    return out


def _table(result: dict) -> str:
    rows = [f"{'stage':<16}{'b1 median':>11}{'b1 p95':>9}{'b32 median':>12}{'b32 p95':>9}"]
    for stage in [*STAGES, "sum", "predict", "bare_forward"]:
        b1, b32 = result["batch1"][stage], result["batch32"][stage]
        rows.append(f"{stage:<16}{b1['median_ms']:>11.2f}{b1['p95_ms']:>9.2f}"
                    f"{b32['median_ms']:>12.2f}{b32['p95_ms']:>9.2f}")
    ratio = "ratio_predict_to_bare_forward"
    rows.append(f"predict / bare forward: batch 1 {result['batch1'][ratio]}, "
                f"batch 32 {result['batch32'][ratio]}")
    rows.append("cold start (s): " + ", ".join(f"{k} {v}" for k, v in result["cold"].items()))
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED / "magnetic_tile"))
    p.add_argument("--backbone", default="efficientnet_lite2")
    p.add_argument("--layers", nargs="+")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--max-train", type=int, default=100)
    p.add_argument("--coreset", type=float, default=0.1)
    p.add_argument("--index", default="flat")
    p.add_argument("--images", type=int, default=100, help="test images timed per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cold-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model-dir", help="reuse a saved model instead of fitting one")
    p.add_argument("--name", default="")
    p.add_argument("--shortlist", choices=["auto", "off", "both"], default="auto",
                   help="the exact search's bfloat16 shortlist (engine/shortlist.py): as predict "
                        "runs it, off (float32 products), or both in one run")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else Path(tmp) / "model"
        result: dict = {"config": vars(args), "machine": {
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}}
        if not args.model_dir:
            result["fit"] = _fit(args, model_dir)
        from patchcore.engine.index import ExactSearch
        from patchcore.engine.shortlist import bf16_is_fast

        result["machine"]["bf16_shortlist_used"] = bf16_is_fast()
        for mode in ["off", "auto"] if args.shortlist == "both" else [args.shortlist]:
            ExactSearch.SHORTLIST = mode
            part = {} if mode == "off" and args.shortlist == "both" else result
            part["batch1"] = _breakdown(args, model_dir, 1)
            part["batch32"] = _breakdown(args, model_dir, 32)
            if part is not result:
                part["cold"] = {}
                print("float32 search (shortlist off):")
                print(_table(part))
                result["float32_search"] = part
        result["cold"] = _cold_start(args, model_dir)
    print(_table(result))
    OUT.mkdir(exist_ok=True)
    path = OUT / f"latency{'_' + args.name if args.name else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
