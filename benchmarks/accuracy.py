"""Accuracy side by side: our preprocessing / aggregation / scoring modes against anomalib.

    python benchmarks/accuracy.py                       # every row not measured yet
    python benchmarks/accuracy.py --rows mt_square_native mt_anomalib_crop
    python benchmarks/accuracy.py --list                # row names
    python benchmarks/accuracy.py --redo ...            # measure again rows already in the JSON
    python benchmarks/accuracy.py --table               # print the table of the JSON only

efficientnet_lite2 (real ImageNet weights), 10% coreset, torch threads 2. magnetic_tile ("mt")
is fitted on its first 100 training images, hazelnut_toy ("hz") on all 28; every test image is
scored. Each row runs in a fresh process (ours: the library API, `PatchCore(...).fit(train)`
then `evaluate_split`; anomalib: benchmarks/peers/anomalib_runner.py in its own venv). Pixel
metrics for everyone are over every pixel of every whole test image at its original size,
computed by patchcore.evaluation.metrics (anomalib's maps are put back on the original image
the same way as ours: bilinear resize, crop border repeated). Results go to
benchmarks/out/accuracy.json as each row finishes, every row with its full settings.

Timings: `fit_s` is our whole fit (features, coreset, leave-one-image-out calibration) or
anomalib's features + coreset; `predict_ms` is our end-to-end `evaluate_split` time per test
image (decoding, batch 8, maps at original size) and anomalib's model forward per image at
batch 32 (decoding, preprocessing and maps at original size not timed), which flatters the peer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SHARED = HERE.parent.parent / "shared" / "data"
PEER_VENV = Path(os.environ.get("PEER_VENV", Path.home() / ".cache/patchcore-peers/anomalib"))
BACKBONE = "efficientnet_lite2"
CORESET = 0.1
THREADS = 2
DATA = {"mt": ("magnetic_tile", 100), "hz": ("hazelnut_toy", None)}
# Tiles in original pixels: magnetic_tile images are about 270 x 330 (shorter side 103-400),
# hazelnut_toy 512 x 512.
TILES = {"mt": (160, 96), "hz": (256, 128)}
REWEIGHT = dict(reweight=True, anomaly_scorer_num_nn=1, reweight_neighbourhood=9)


def _rows() -> dict[str, dict]:
    """Row name -> settings, in the order they are measured (most informative first)."""
    rows: dict[str, dict] = {}

    def ours(ds: str, pre: str, agg: str = "native", rw: bool = False, size: int = 224,
             std: bool = False, max_train: int | None = None, **extra) -> None:
        name = (f"{ds}{max_train or ''}_{pre}_{agg}" + ("_rw" if rw else "")
                + ("" if size == 224 else f"_{size}") + ("_std" if std else ""))
        hyper = dict(preprocess=pre, aggregation=agg, imagesize=size, standardize=std, **extra)
        if pre == "crop":
            hyper["resize"] = round(size * 256 / 224)
        if pre == "tile":
            hyper["tile_size"], hyper["tile_stride"] = TILES[ds]
        hyper.update(REWEIGHT if rw else dict(reweight=False, anomaly_scorer_num_nn=1))
        rows[name] = dict(impl="ours", data=ds, hyper=hyper,
                          **({"max_train": max_train} if max_train else {}))

    def peer(ds: str, pre: str, std: bool = False) -> None:
        rows[f"{ds}_anomalib_{pre}" + ("_std" if std else "")] = dict(
            impl="anomalib", data=ds,
            hyper=dict(preprocess=pre, resize=256 if pre == "crop" else 224, imagesize=224,
                       num_neighbors=9, normalisation="mean=std=0.5", standardize=std))

    # The defaults since standardize (each image shifted and scaled to a fixed mean and
    # contrast), anomalib on the same inputs, and the rows below without it, in one run.
    for ds in ("mt", "hz"):
        ours(ds, "square", std=True)
    ours("mt", "square", std=True, max_train=752)
    ours("mt", "square", max_train=752)
    peer("mt", "square", std=True)
    for ds in ("mt", "hz"):
        for pre in ("square", "aspect"):
            ours(ds, pre)
            ours(ds, pre, rw=True)
    for ds in ("hz", "mt"):
        peer(ds, "crop")
        peer(ds, "square")
    for ds in ("mt", "hz"):
        for pre in ("crop", "tile"):
            ours(ds, pre)
            ours(ds, pre, rw=True)
        for pre in ("square", "aspect", "crop", "tile"):
            ours(ds, pre, "reference")
            ours(ds, pre, "reference", rw=True)
    for ds in ("mt", "hz"):
        for pre in ("square", "aspect"):
            for rw in (False, True):
                ours(ds, pre, rw=rw, size=256)
        # magnetic_tile's images are about 270 x 330: 288 / 320 are close to their own scale.
        for size in (288, 320):
            ours(ds, "square", size=size)
    return rows


ROWS = _rows()


# ----------------------------------------------------------------------------- workers


def worker_ours(spec: dict) -> dict:
    """Fit on the row's training images and evaluate every test image (fresh process)."""
    import torch

    from patchcore import PatchCore, load_dataset
    from patchcore.evaluation.evaluate import evaluate_split

    torch.set_num_threads(THREADS)
    name, max_train = DATA[spec["data"]]
    max_train = spec.get("max_train", max_train)
    split = load_dataset(SHARED / name)
    train = split.train[:max_train] if max_train else split.train
    model = PatchCore(backbone=BACKBONE, percentage=CORESET, pretrained=True, device="cpu",
                      progress=False, max_memory_mb=spec.get("max_memory_mb"), **spec["hyper"])
    t0 = time.perf_counter()
    model.fit(list(train))
    fit_s = time.perf_counter() - t0
    member = model.fit_info_["members"][0]
    row, _ = evaluate_split(model, split)
    return {
        "image_auroc": row["image_auroc"], "pixel_auroc": row["pixel_auroc"], "pro": row["pro"],
        "f1_max": row["f1_max"], "fit_s": fit_s, "feature_s": member.get("feature_seconds"),
        "coreset_s": member.get("coreset_seconds"), "predict_ms": row["predict_ms_per_image"],
        "n_train": len(train), "n_test": row["n_test"],
        "bank": [member.get("bank_rows"), member.get("patches")],
        "config": model.config.to_dict(), "runtime": {
            "device": "cpu", "threads": THREADS, "batch_size": model.settings.batch_size,
            "max_memory_mb": model.settings.max_memory_mb},
        "threshold_rule": row.get("threshold_rule"),
    }


def run_peer(spec: dict) -> dict:
    """anomalib in its own venv; its maps scored here with patchcore's metrics."""
    import numpy as np

    from patchcore.data.images import load_mask
    from patchcore.evaluation import metrics

    py = PEER_VENV / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"no peer venv at {PEER_VENV}: run benchmarks/setup_peers.sh")
    name, max_train = DATA[spec["data"]]
    h = spec["hyper"]
    with tempfile.TemporaryDirectory(prefix="accuracy_peer_") as tmp:
        out, maps = Path(tmp) / "peer.json", Path(tmp) / "maps.npz"
        cmd = [str(py), str(HERE / "peers" / "anomalib_runner.py"), "--data", str(SHARED / name),
               "--backbone", BACKBONE, "--coreset", str(CORESET), "--threads", str(THREADS),
               "--preprocess", h["preprocess"], "--resize", str(h["resize"]),
               "--imagesize", str(h["imagesize"]), "--num-neighbors", str(h["num_neighbors"]),
               "--throughput-batches", "2", "--out", str(out), "--save-maps", str(maps)]
        if max_train:
            cmd += ["--max-train", str(max_train)]
        if "seed" in h:  # anomalib's coreset seed (its default is 0)
            cmd += ["--seed", str(h["seed"])]
        if h.get("standardize"):
            cmd += ["--standardize"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
        report = json.loads(out.read_text())
        saved = np.load(maps)
        frame, side = int(saved["frame"]), int(saved["imagesize"])
        full_maps, full_masks = [], []
        for m, mask, size in zip(saved["maps"], saved["masks"], saved["sizes"], strict=True):
            w, hh = int(size[0]), int(size[1])
            full_maps.append(map_to_original(m, (w, hh), frame, side))
            full_masks.append(load_mask(mask, (w, hh)) if mask else np.zeros((hh, w), bool))
        result = metrics.evaluate(saved["labels"], saved["scores"], full_masks, full_maps)
    return {
        "image_auroc": result["image_auroc"], "pixel_auroc": result["pixel_auroc"],
        "pro": result["pro"], "f1_max": result["f1_max"],
        "pixel_auroc_runner": report["pixel_auroc"],
        "pixel_auroc_input_only": report["pixel_auroc_input"],
        "fit_s": report["fit_s"], "feature_s": report["feature_extraction_s"],
        "coreset_s": report["coreset_s"], "predict_ms": 1000.0 / report["throughput_img_s"],
        "throughput_img_s": report["throughput_img_s"],
        "latency_b1_ms": report["predict_latency_ms"], "n_train": report["n_train"],
        "n_test": report["n_test"], "bank": report["memory_bank"],
        "config": {k: report[k] for k in (
            "backbone", "layers", "coreset_ratio", "num_neighbors", "preprocess_mode", "resize",
            "imagesize", "normalisation", "preprocess", "threads", "train_batch_size")},
        "standardize": bool(h.get("standardize")),
        "versions": report["versions"],
    }


def map_to_original(amap, size: tuple[int, int], frame: int, imagesize: int):
    """anomalib's S x S map on the whole W x H image (crop border repeated), as ours does."""
    import numpy as np
    import torch
    import torch.nn.functional as F  # noqa: N812

    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    if frame != imagesize:
        off = int(round((frame - imagesize) / 2.0))
        rest = frame - imagesize - off
        t = F.pad(t, (off, rest, off, rest), mode="replicate")
    w, h = size
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()


# ----------------------------------------------------------------------------- driver


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "torch_threads": THREADS, "gpu": None}


def load(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"rows": {}}


def save(path: Path, report: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(path)


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(report: dict) -> str:
    head = (f"{'row':30s} {'impl':8s} {'pre':7s} {'std':3s} {'agg':9s} {'rw':3s} {'size':>4s} "
            f"{'img AUROC':>9s} {'pix AUROC':>9s} {'PRO':>6s} {'fit s':>7s} {'ms/img':>7s}")
    lines = [head]
    for name, r in report["rows"].items():
        if "error" in r:
            lines.append(f"{name:30s} ERROR {r['error'][:80]}")
            continue
        c = r["config"]
        ours = r["impl"] == "ours"
        pre = c["preprocess"] if ours else c["preprocess_mode"]
        agg = c["aggregation"] if ours else "anomalib"
        rw = ("9" if c["reweight"] else "-") if ours else str(c["num_neighbors"])
        std = "yes" if _standardized(r) else "-"
        lines.append(
            f"{name:30s} {r['impl']:8s} {pre:7s} {std:3s} {agg:9s} {rw:3s} {c['imagesize']:4d} "
            f"{fmt(r['image_auroc']):>9s} {fmt(r['pixel_auroc']):>9s} {fmt(r['pro']):>6s} "
            f"{fmt(r['fit_s'], 1):>7s} {fmt(r['predict_ms'], 1):>7s}")
    return "\n".join(lines)


def _standardized(row: dict) -> bool:
    """Whether a row's inputs were standardized (rows measured before the option: no)."""
    if row["impl"] == "ours":
        return bool(row["config"].get("standardize", False))
    return bool(row.get("standardize", False))


def _is_default(config: dict) -> bool:
    """Whether a row of ours ran with the package's default hyperparameters."""
    from patchcore.config import PatchCoreConfig

    default = PatchCoreConfig().to_dict()
    keys = ("preprocess", "aggregation", "imagesize", "reweight", "anomaly_scorer_num_nn")
    return (all(config.get(k) == default[k] for k in keys)
            and config.get("standardize", False) == default["standardize"])


def markdown(report: dict) -> str:
    """The rows as a README table, grouped by data set, best image AUROC first."""
    lines = ["| data | impl | preprocess | standardize | aggregation | Eq. 7 | size | img AUROC "
             "| pix AUROC | PRO | fit s | ms/img |", "|" + "---|" * 12]
    rows = [(n, r) for n, r in report["rows"].items() if "error" not in r]
    rows.sort(key=lambda nr: (nr[1]["data"], nr[1]["n_train"], -nr[1]["image_auroc"]))
    for _, r in rows:
        c = r["config"]
        ours = r["impl"] == "ours"
        pre = c["preprocess"] if ours else c["preprocess_mode"]
        if pre == "crop":
            pre = f"crop {c['resize']}"
        if ours and pre == "tile":
            pre = f"tile {c['tile_size']}/{c['tile_stride']}"
        lines.append(" | ".join([
            "", f"{r['data']} ({r['n_train']})",
            ("**ours (default)**" if _is_default(c) else "**ours**") if ours else "anomalib", pre,
            "yes" if _standardized(r) else "no", c["aggregation"] if ours else "anomalib",
            ("b=9" if c["reweight"] else "off") if ours else f"b={c['num_neighbors']}",
            str(c["imagesize"]), fmt(r["image_auroc"]), fmt(r["pixel_auroc"]), fmt(r["pro"]),
            fmt(r["fit_s"], 0), fmt(r["predict_ms"], 0), ""]).strip())
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=None, choices=sorted(ROWS), metavar="ROW")
    p.add_argument("--redo", action="store_true", help="measure rows already in the JSON again")
    p.add_argument("--list", action="store_true")
    p.add_argument("--table", action="store_true")
    p.add_argument("--markdown", action="store_true", help="print the JSON as a README table")
    p.add_argument("--out", default=str(OUT / "accuracy.json"))
    p.add_argument("--extra", default=None,
                   help="one extra row of ours, as JSON: {\"name\": ..., \"data\": \"mt\", "
                   "\"hyper\": {...}, \"max_train\": 752, \"max_memory_mb\": 1024}")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:  # child: one row of ours
        spec = json.loads(args.worker)
        print(json.dumps(worker_ours(spec)))
        return
    if args.list:
        for name, spec in ROWS.items():
            print(name, json.dumps(spec))
        return
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = load(path)
    if args.table or args.markdown:
        print(markdown(report) if args.markdown else table(report))
        return
    rows = dict(ROWS)
    if args.extra:
        extra = json.loads(args.extra)
        rows = {extra["name"]: {"impl": "ours", **extra}}
        todo = [extra["name"]]
    else:
        todo = args.rows or list(ROWS)
    for name in todo:
        if name in report["rows"] and "error" not in report["rows"][name] and not args.redo:
            continue
        spec = rows[name]
        print(f"=== {name}: {json.dumps(spec)}", flush=True)
        started = datetime.datetime.now(datetime.timezone.utc)
        load_before = os.getloadavg()
        try:
            if spec["impl"] == "ours":
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", json.dumps(spec)], check=True,
                    capture_output=True, text=True,
                    env={**os.environ, "PATCHCORE_OFFLINE": "1",
                         "OMP_NUM_THREADS": str(THREADS)})
                result = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                result = run_peer(spec)
        except subprocess.CalledProcessError as exc:
            result = {"error": (exc.stderr or str(exc))[-2000:]}
        except Exception as exc:  # noqa: BLE001 - keep the other rows going
            result = {"error": f"{type(exc).__name__}: {exc}"}
        report["rows"][name] = {"impl": spec["impl"], "data": DATA[spec["data"]][0],
                                "spec": spec, **result, "started": started.isoformat(
                                    timespec="seconds"),
                                "loadavg_before": [round(x, 2) for x in load_before],
                                "wall_s": round((datetime.datetime.now(datetime.timezone.utc)
                                                 - started).total_seconds(), 1)}
        report.update({"machine": machine(), "backbone": BACKBONE, "coreset": CORESET,
                       "notes": __doc__.split("\n\n", 2)[2]})
        save(path, report)
        print(table({"rows": {name: report["rows"][name]}}).splitlines()[-1], flush=True)
    print(table(report))


if __name__ == "__main__":
    main()
