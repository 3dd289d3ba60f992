"""Ray: distributed scoring throughput and sharded-fit quality on magnetic_tile (issue 14).

    python benchmarks/ray_bench.py                          # 100 train, 200 test images
    python benchmarks/ray_bench.py --train 752 --test 592   # the whole set (slow on 2 cores)

1. Fits efficientnet_lite0 (real ImageNet weights) locally on `--train` magnetic_tile training
   images and saves it.
2. Throughput: `--test` test images (half good, half defective, seeded) scored by the local
   batch predict (torch threads = all cores), then by `patchcore.distributed.predict` with 1
   and 2 workers (1 CPU and 1 torch thread each) on a local Ray instance with all cores.
   Reported: whole-run images/s (reading, actor start-up and model build included) and
   steady-state images/s ((N - N/2) / (t(N) - t(N/2)): runs of N/2 and N images, so that the
   fixed start-up cancels), and their share of the local batch throughput (warm model); also
   the whole local run from the model folder (load + predict) and Ray's share of it.
3. Sharded fit: `patchcore.distributed.fit` with 2 and 4 shards (oversample 1 and 2), against
   the local fit on the same images: bank rows, coverage radius (max over all training patch
   features of the distance to the nearest bank row; the features are extracted once here and
   bank rows located through their provenance), its ratio to the local coreset's, and image
   AUROC on the test images. A random subset of the same size is a reference point.
4. Per-image costs for the scaling estimate in docs/scaling.md: feature extraction and kNN
   search per image, bank bytes (what the object store ships to each node once).

Prints tables and writes benchmarks/out/ray_bench.json. The CPU may be shared with other work
(timings are wall clock); rerun when the machine is idle for figures to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
WORK = OUT / "ray_bench"
SHARED = HERE.parent.parent / "shared" / "data"


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of `rows`."""
    cells = [[c for c in columns]] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True))
                     for row in cells)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return "-" if v is None else str(v)


def pick_test(split, n: int, seed: int = 0) -> list:
    """Up to n test samples, half good and half defective (seeded)."""
    rng = np.random.default_rng(seed)
    good = [s for s in split.test if s.label == 0]
    bad = [s for s in split.test if s.label == 1]
    take = [good[i] for i in sorted(rng.choice(len(good), min(len(good), n // 2), False))]
    take += [bad[i] for i in sorted(rng.choice(len(bad), min(len(bad), n - len(take)), False))]
    return take


def global_rows(model) -> np.ndarray:
    """Bank rows as indices into the image-major training feature matrix (one view each)."""
    bank = model.members_[0].bank
    h, w = model.feature_grid_
    return (bank.image_index.astype(np.int64) * h * w + bank.position[:, 0].astype(np.int64) * w
            + bank.position[:, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "magnetic_tile")
    ap.add_argument("--train", type=int, default=100)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--imagesize", type=int, default=224)
    ap.add_argument("--percentage", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--skip-fit", action="store_true", help="throughput only")
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data} is not here (../shared/data/magnetic_tile)")

    import ray

    from patchcore import PatchCore, RuntimeSettings, distributed, load_dataset
    from patchcore.data.images import load_image
    from patchcore.engine import pipeline
    from patchcore.engine.sampling import coverage_radius
    from patchcore.evaluation.metrics import image_auroc

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    split = load_dataset(args.data)
    rng = np.random.default_rng(0)
    train = [split.train[i] for i in sorted(rng.choice(len(split.train),
                                                       min(args.train, len(split.train)), False))]
    test = pick_test(split, args.test)
    files = [s.path for s in test]
    labels = np.array([s.label for s in test])
    config = dict(backbone="efficientnet_lite0", imagesize=args.imagesize,
                  percentage=args.percentage, device="cpu", progress=False,
                  batch_size=args.batch_size)
    t0 = time.perf_counter()
    local_model = PatchCore(**config).fit(train)
    local_fit_s = time.perf_counter() - t0
    model_dir = local_model.save(WORK / "model")
    result: dict = {"machine": platform.processor() or platform.machine(), "cores": cores,
                    "train_images": len(train), "test_images": len(test),
                    "imagesize": args.imagesize, "percentage": args.percentage,
                    "batch_size": args.batch_size, "local_fit_seconds": round(local_fit_s, 2)}

    # -- throughput ---------------------------------------------------------------------------
    # A whole local run from the model folder (load, extractor build, predict), the counterpart
    # of a whole Ray run (actor start-up, model build, predict); torch is imported already here.
    t0 = time.perf_counter()
    PatchCore.load(model_dir, progress=False, batch_size=args.batch_size).predict(files)
    local_cold_s = time.perf_counter() - t0
    loaded = PatchCore.load(model_dir, progress=False, batch_size=args.batch_size)
    loaded.predict(files[: args.batch_size])  # warm-up (backbone built, first forward)
    t0 = time.perf_counter()
    local_pred = loaded.predict(files)
    local_s = time.perf_counter() - t0
    local_ips = len(files) / local_s
    rows = [{"run": f"local batch predict ({cores} threads)", "workers": "-",
             "seconds": local_s, "img_per_s": local_ips, "steady_img_per_s": local_ips,
             "share_of_local": 1.0, "steady_share": 1.0},
            {"run": "local load + predict (whole run)", "workers": "-", "seconds": local_cold_s,
             "img_per_s": len(files) / local_cold_s, "share_of_local": local_s / local_cold_s}]
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    settings = RuntimeSettings(device="cpu", batch_size=args.batch_size, progress=False)
    exact = None
    half = files[: len(files) // 2]
    for workers in (1, 2):
        # Marginal throughput: (N - N/2) images / (t(N) - t(N/2)) cancels the fixed start-up
        # (actors import torch and build the model: seconds, once per run and node).
        times = {}
        for part in (half, files):
            t0 = time.perf_counter()
            r = distributed.predict(model_dir, part, WORK / f"out_{workers}_{len(part)}",
                                    settings=settings, workers=workers, cpus_per_worker=1.0)
            times[len(part)] = time.perf_counter() - t0
        total = times[len(files)]
        steady = (len(files) - len(half)) / max(total - times[len(half)], 1e-9)
        scores = np.array(r.table.column("score").to_pylist(), np.float32)
        diff = float(np.abs(scores - local_pred.scores).max())
        exact = diff if exact is None else max(exact, diff)
        rows.append({"run": f"ray predict, {workers} x 1 CPU", "workers": workers,
                     "seconds": total, "img_per_s": len(files) / total,
                     "steady_img_per_s": steady, "share_of_local": len(files) / total / local_ips,
                     "steady_share": steady / local_ips, "share_of_local_whole_run":
                     local_cold_s / total})
    result["throughput"] = rows
    result["max_abs_score_difference_vs_local"] = exact
    print(f"\nScoring {len(files)} magnetic_tile images ({args.imagesize} px, batch "
          f"{args.batch_size}, {cores} cores; CPU possibly shared with other work)")
    print(table(rows, ["run", "seconds", "img_per_s", "steady_img_per_s", "share_of_local",
                       "steady_share", "share_of_local_whole_run"]))
    print(f"max |score - local score| = {exact:.3g} (1 vs {cores} torch threads: float rounding)")

    # -- per-image costs for the scaling estimate ---------------------------------------------
    member = loaded.members_[0]
    views = loaded.preprocessor.views(load_image(files[0]))
    batch = torch.cat([views] * args.batch_size)
    t0 = time.perf_counter()
    feats = pipeline.member_features(member, batch)
    feat_s = (time.perf_counter() - t0) / len(batch)
    q = feats.reshape(-1, feats.shape[-1])
    t0 = time.perf_counter()
    member.index.search(q, 1)
    search_s = (time.perf_counter() - t0) / len(batch)
    bank = member.bank
    result["per_image"] = {"features_ms": feat_s * 1e3, "search_ms": search_s * 1e3,
                           "bank_rows": len(bank), "bank_dim": int(bank.features.shape[1]),
                           "bank_mb": bank.features.nbytes / 2**20,
                           "patches_per_image": int(q.shape[0] // len(batch))}
    print(f"\nper image: features {feat_s * 1e3:.1f} ms, kNN search {search_s * 1e3:.2f} ms "
          f"({len(bank)} x {bank.features.shape[1]} bank, {bank.features.nbytes / 2**20:.1f} MB)")

    if not args.skip_fit:
        # -- sharded fit quality --------------------------------------------------------------
        store = pipeline.extract_features(member, train, loaded.preprocessor, settings)
        features = store.gather(np.arange(len(store)))
        store.close()
        local_radius = coverage_radius(features, global_rows(local_model))
        local_auroc = image_auroc(labels, local_pred.scores)
        n = len(bank)
        random_rows = np.sort(np.random.default_rng(0).choice(len(features), n, False))
        fits = [{"fit": "local (one machine)", "seconds": local_fit_s, "bank_rows": n,
                 "radius": local_radius, "radius_ratio": 1.0, "auroc": local_auroc},
                {"fit": "random subset (reference)", "bank_rows": n,
                 "radius": coverage_radius(features, random_rows),
                 "radius_ratio": coverage_radius(features, random_rows) / local_radius}]
        for shards, oversample in ((2, 1.0), (2, 2.0), (4, 2.0)):
            t0 = time.perf_counter()
            m = distributed.fit(train, shards=shards, oversample=oversample, **config)
            fit_s = time.perf_counter() - t0
            radius = coverage_radius(features, global_rows(m))
            fits.append({"fit": f"ray, {shards} shards, oversample {oversample:g}",
                         "seconds": fit_s, "bank_rows": len(m.members_[0].bank),
                         "radius": radius, "radius_ratio": radius / local_radius,
                         "auroc": image_auroc(labels, m.predict(files).scores)})
        result["fit"] = fits
        print(f"\nSharded fit on {len(train)} training images ({len(features)} patches), "
              f"AUROC on {len(files)} test images")
        print(table(fits, ["fit", "seconds", "bank_rows", "radius", "radius_ratio", "auroc"]))
    ray.shutdown()
    OUT.mkdir(exist_ok=True)
    earlier = OUT / "ray_bench.json"
    if args.skip_fit and earlier.is_file():  # keep the fit figures of an earlier full run
        result.setdefault("fit", json.loads(earlier.read_text()).get("fit"))
    (OUT / "ray_bench.json").write_text(json.dumps(result, indent=2, default=float))
    print(f"\n-> {OUT / 'ray_bench.json'}")


if __name__ == "__main__":
    main()
