"""Our side of the side-by-side benchmark: fit and predict phases, each in its own process.

Mirrors benchmarks/peers/anomalib_runner.py field for field so that benchmarks/run.py can put
both in one table. Fit: feature extraction seconds (image decoding included), coreset seconds,
memory-bank size, peak RSS of the fit process. Predict (fresh process, model loaded from disk):
latency per image at batch 1 (model only: preprocessing outside the timed region, 2 warm-up
images), throughput at batch 32, peak RSS, image and pixel AUROC on the test set, and the floor:
the bare backbone forward to the last needed layer at batch 1 over the same images.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 32


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def augmented_train(data: Path, count: int, folder: Path) -> list[Path]:
    """`count` training images: the originals, then flipped / rotated copies written to disk."""
    from PIL import Image

    from patchcore.data.layouts import list_images

    originals = list_images(data / "train" / "good")
    out: list[Path] = []
    ops = [None, Image.FLIP_LEFT_RIGHT, Image.FLIP_TOP_BOTTOM, Image.ROTATE_180,
           Image.TRANSPOSE, Image.ROTATE_90, Image.ROTATE_270, Image.TRANSVERSE]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        src = originals[i % len(originals)]
        op = ops[(i // len(originals)) % len(ops)]
        if op is None:
            out.append(src)
            continue
        dst = folder / f"{i:06d}.png"
        if not dst.exists():
            Image.open(src).transpose(op).save(dst)
        out.append(dst)
    return out


def fit_phase(args: argparse.Namespace) -> dict:
    import torch

    from patchcore import PatchCore, load_dataset

    torch.set_num_threads(args.threads)
    split = load_dataset(args.data)
    if args.augment_to:
        train = augmented_train(Path(args.data), args.augment_to, Path(args.scratch) / "aug")
    else:
        train = [s.path for s in split.train[: args.max_train]]
    model = PatchCore(
        backbone=args.backbone, layers=tuple(args.layers) if args.layers else None,
        pretrained=not args.random_weights, percentage=args.coreset, resize=args.resize,
        imagesize=args.imagesize, batch_size=args.batch_size, device=args.device,
        calibration_holdout=0.0, max_memory_mb=args.max_memory, bank_dtype=args.bank_dtype,
        index=args.index, seed=args.seed,
    )
    model.progress = False
    t0 = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - t0
    model.save(args.model_dir)
    member = model.fit_info_["members"][0]
    dim = int(model.members_[0].bank.features.shape[1])
    return {"n_train": len(train), "feature_extraction_s": member["feature_seconds"],
            "coreset_s": member["coreset_seconds"], "fit_s": fit_s,
            "embeddings_before_coreset": [member["patches"], dim],
            "memory_bank": [member["bank_rows"], dim],
            "features_on_disk": member["features_on_disk"], "fit_peak_rss_mb": peak_rss_mb()}


def predict_phase(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from patchcore import PatchCore, load_dataset, metrics
    from patchcore.data.images import load_image, load_mask
    from patchcore.engine import pipeline

    torch.set_num_threads(args.threads)
    model = PatchCore.load(args.model_dir, device=args.device)
    model.progress = False
    split = load_dataset(args.data)
    test = split.test
    pre = model.preprocessor
    if pre.mode not in ("square", "crop"):
        raise SystemExit("ours_runner times one view per image: use preprocess square or crop "
                         "(benchmarks/accuracy.py measures every mode)")
    images = [load_image(s.path) for s in test]
    tensors = [pre.image(im) for im in images]
    sizes = [im.size for im in images]
    del images
    labels = np.array([s.label for s in test])
    side = model.config.imagesize
    scratch = np.lib.format.open_memmap(Path(args.scratch) / "maps.npy", mode="w+",
                                        dtype=np.float32, shape=(len(test), side, side))
    members = model._ready()  # noqa: SLF001 - members with their extractors built

    def score(views):
        """Scores and S x S maps of raw [0, 1] views: features, NN search, maps, blur."""
        return pipeline.score_batch(members, views, model.config)

    scores, times = [], []
    for i, t in enumerate(tensors):
        t0 = time.perf_counter()
        s, maps, _, _ = score(t[None])  # the model alone is timed
        times.append(time.perf_counter() - t0)
        scores.append(float(s[0]))
        scratch[i] = maps[0]
    times = times[2:] or times
    rss_b1 = peak_rss_mb()
    batch = torch.stack([tensors[i % len(tensors)] for i in range(BATCH)])
    score(batch)  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.throughput_batches):
        score(batch)
    throughput = args.throughput_batches * BATCH / (time.perf_counter() - t0)
    # The floor: the backbone as built (batch norms not folded), to the last needed layer.
    from patchcore.engine.features import FeatureExtractor

    ours = members[0].extractor
    torch.manual_seed(model.config.seed)
    extractor = FeatureExtractor(ours.spec, ours.layers, pretrained=model.config.pretrained,
                                 imagesize=model.config.imagesize,
                                 aggregation=model.config.aggregation, fold_norms=False)
    floor = []
    with torch.inference_mode():
        for t in tensors:
            t0 = time.perf_counter()
            extractor.backbone_grids(t[None])
            floor.append(time.perf_counter() - t0)
    floor = floor[2:] or floor
    # Pixel AUROC over every pixel of every whole image at its original size.
    full_maps = [pre.to_original(scratch[i], sizes[i]) for i in range(len(test))]
    full_masks = [load_mask(s.mask, sizes[i]) if s.mask else
                  np.zeros((sizes[i][1], sizes[i][0]), bool) for i, s in enumerate(test)]
    return {
        "n_test": len(test), "predict_latency_ms": 1000 * float(np.mean(times)),
        "predict_latency_ms_median": 1000 * float(np.median(times)),
        "throughput_img_s": throughput, "predict_peak_rss_mb_batch1": rss_b1,
        "predict_peak_rss_mb": peak_rss_mb(),
        "backbone_forward_ms": 1000 * float(np.mean(floor)),
        "image_auroc": metrics.image_auroc(labels, np.array(scores)),
        "pixel_auroc": metrics.pixel_auroc(full_masks, full_maps),
        "pixel_metrics": "whole image at original size",
        "preprocess": f"{model.config.preprocess} (imagesize {side})",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--backbone", default="wide_resnet50_2")
    p.add_argument("--layers", nargs="+", default=None)
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--augment-to", type=int, default=None, help="scaling: N augmented images")
    p.add_argument("--coreset", type=float, default=0.1)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--imagesize", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--throughput-batches", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-memory", type=float, default=None)
    p.add_argument("--bank-dtype", default="float32")
    p.add_argument("--index", default="flat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-predict", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--phase", choices=["fit", "predict"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        result = fit_phase(args) if args.phase == "fit" else predict_phase(args)
        Path(args.out).write_text(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="patchcore-bench-") as tmp:
        base = [sys.executable, __file__, *sys.argv[1:], "--model-dir", f"{tmp}/model",
                "--scratch", tmp]
        report: dict = {"peer": "patchcore (ours)", "data": str(Path(args.data).resolve()),
                        "backbone": args.backbone, "coreset_ratio": args.coreset,
                        "threads": args.threads}
        phases = ["fit"] if args.skip_predict else ["fit", "predict"]
        for phase in phases:
            out = f"{tmp}/{phase}.json"
            subprocess.run([*base, "--phase", phase, "--out", out], check=True,
                           env={**os.environ, "PATCHCORE_OFFLINE": "1"})
            report.update(json.loads(Path(out).read_text()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, list)}))


if __name__ == "__main__":
    main()
