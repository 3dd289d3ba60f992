"""Exported models against the PyTorch path: equality, speed and peak memory (issue 13).

    python benchmarks/export_bench.py                   # magnetic_tile, efficientnet_lite0
    python benchmarks/export_bench.py --max-train 50 --max-test 100 --repeats 10   # quicker

1. Fits efficientnet_lite0 (real weights, reference aggregation, 1024-dim bank rows) on
   magnetic_tile train images, saves it, exports it (ONNX, and OpenVINO IR).
2. Equality: every test image scored by torch, onnxruntime, OpenVINO f32 (and OpenVINO bf16,
   precision hint only): max relative error of image scores and maps vs torch, image AUROC.
3. Speed: latency at batch 1 (median over single-image predicts) and throughput at batch 32
   (images/s), all runtimes in one process, interleaved image by image.
4. Memory: scoring with a 50,000-row bank (the fitted rows tiled with noise), per runtime in a
   fresh process: VmHWM.

Every phase runs in its own process (`--worker`). Prints tables, writes
benchmarks/out/export_bench.json. Timings depend on the machine and on other load on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
WORK = OUT / "export_bench"
SHARED = HERE.parent.parent / "shared" / "data"
RUNTIMES = ["torch", "onnxruntime", "openvino", "openvino_bf16"]


def vm_hwm_mb() -> float:
    """Peak resident memory of this process (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def predictor(runtime: str, batch: int, threads: int, suffix: str = ""):
    """An object with .predict(files) for the runtime (suffix "_50k": the 50,000-row bank)."""
    if runtime == "torch":
        from patchcore import PatchCore

        return PatchCore.load(WORK / f"model{suffix}", device="cpu", batch_size=batch,
                              progress=False)
    from patchcore.inference import Inferencer

    name, _, precision = runtime.partition("_")
    folder = WORK / (f"export{suffix}" if name == "onnxruntime" else f"export_ov{suffix}")
    return Inferencer(folder, runtime=name, batch_size=batch, threads=threads,
                      precision=precision or "f32")


# -- workers (fresh processes) --------------------------------------------------------------

def work_fit(args: argparse.Namespace) -> dict:
    from patchcore import PatchCore, load_dataset
    from patchcore.export import export_model

    split = load_dataset(SHARED / "magnetic_tile")
    train = [s.path for s in split.train[: args.max_train]]
    model = PatchCore(backbone=args.backbone, aggregation="reference", imagesize=args.imagesize,
                      resize=args.imagesize, progress=False, batch_size=32)
    t0 = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - t0
    model.save(WORK / "model")
    out = {"fit_s": round(fit_s, 1), "n_train": len(train),
           "bank": list(model.members_[0].bank.features.shape)}
    for fmt, folder in (("onnx", "export"), ("openvino", "export_ov")):
        t0 = time.perf_counter()
        export_model(model, WORK / folder, format=fmt, overwrite=True)
        out[f"export_{fmt}_s"] = round(time.perf_counter() - t0, 1)
    return out


def test_files(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    from patchcore import load_dataset

    split = load_dataset(SHARED / "magnetic_tile")
    tests = split.test
    if args.max_test and args.max_test < len(tests):  # evenly spread: good and defective
        step = len(tests) / args.max_test
        tests = [tests[int(i * step)] for i in range(args.max_test)]
    return [str(s.path) for s in tests], [int(s.label) for s in tests]


def work_scores(args: argparse.Namespace) -> dict:
    import numpy as np

    files, _ = test_files(args)
    pred = predictor(args.runtime, 32, args.threads).predict(files)
    np.savez(WORK / f"scores_{args.runtime}.npz", scores=pred.scores, maps=pred.maps)
    return {"images": len(files)}


def work_speed(args: argparse.Namespace) -> dict:
    """All runtimes in one process, interleaved image by image (rotating the order), so that a
    busy spell on a shared CPU slows every runtime alike."""
    files, _ = test_files(args)
    b1 = {rt: predictor(rt, 1, args.threads) for rt in RUNTIMES}
    b32 = {rt: predictor(rt, 32, args.threads) for rt in RUNTIMES}
    for rt in RUNTIMES:  # warm-up
        b1[rt].predict(files[:2])
        b32[rt].predict(files[:32])
    lat: dict[str, list[float]] = {rt: [] for rt in RUNTIMES}
    for i, f in enumerate(files[2 : 2 + args.repeats]):
        for rt in RUNTIMES[i % 4 :] + RUNTIMES[: i % 4]:
            t0 = time.perf_counter()
            b1[rt].predict([f])
            lat[rt].append(time.perf_counter() - t0)
    thr: dict[str, list[float]] = {rt: [] for rt in RUNTIMES}
    batch = (files * 2)[:32]
    for r in range(args.rounds):
        for rt in RUNTIMES[r % 4 :] + RUNTIMES[: r % 4]:
            t0 = time.perf_counter()
            b32[rt].predict(batch)
            thr[rt].append(len(batch) / (time.perf_counter() - t0))
    return {rt: {"latency_ms": round(1000 * statistics.median(lat[rt]), 1),
                 "latency_p90_ms": round(1000 * sorted(lat[rt])[int(0.9 * len(lat[rt]))], 1),
                 "throughput_img_s": round(statistics.median(thr[rt]), 1)} for rt in RUNTIMES}


def bank_50k(args: argparse.Namespace) -> None:
    """Export and model folders whose bank has args.bank_rows rows (fitted rows + noise)."""
    import dataclasses
    import shutil

    import numpy as np
    from safetensors.numpy import save_file

    from patchcore.inference.manifest import read_manifest, write_manifest
    from patchcore.storage import load_state, save_state

    state = load_state(WORK / "model")
    rows = state.banks[0].features.astype(np.float32)
    rng = np.random.default_rng(0)
    reps = -(-args.bank_rows // len(rows))
    big = np.tile(rows, (reps, 1))[: args.bank_rows]
    big = big + rng.normal(scale=0.05 * float(rows.std()), size=big.shape).astype(np.float32)
    n = len(big)
    bank = dataclasses.replace(state.banks[0], features=big,
                               image_index=np.zeros(n, dtype=np.int32),
                               position=np.zeros((n, 2), dtype=np.int16))
    save_state(dataclasses.replace(state, banks=[bank]), WORK / "model_50k")
    for name in ("export", "export_ov"):
        dst = WORK / f"{name}_50k"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(WORK / name, dst)
        save_file({"rows": big}, str(dst / "bank_0.safetensors"))
        m = read_manifest(dst)
        entry = dataclasses.replace(m.members[0], rows=n)
        write_manifest(dataclasses.replace(m, members=(entry,)))


def work_memory(args: argparse.Namespace) -> dict:
    files, _ = test_files(args)
    p = predictor(args.runtime, 32, args.threads, "_50k")
    t0 = time.perf_counter()
    p.predict(files[:32])
    return {"seconds_32": round(time.perf_counter() - t0, 2), "peak_mb": round(vm_hwm_mb())}


WORKERS = {"fit": work_fit, "scores": work_scores, "speed": work_speed, "memory": work_memory}


def spawn(phase: str, args: argparse.Namespace, runtime: str = "torch") -> dict:
    cmd = [sys.executable, __file__, "--worker", phase, "--runtime", runtime,
           "--max-train", str(args.max_train), "--max-test", str(args.max_test),
           "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--imagesize", str(args.imagesize), "--backbone", args.backbone,
           "--bank-rows", str(args.bank_rows)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{phase} [{runtime}] failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(title: str, rows: list[dict], cols: list[str]) -> None:
    print(f"\n{title}")
    print("  ".join(f"{c:>16s}" for c in cols))
    for r in rows:
        print("  ".join(f"{str(r.get(c, '-')):>16s}" for c in cols))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--runtime", default="torch", choices=RUNTIMES)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--imagesize", type=int, default=224)
    parser.add_argument("--max-train", type=int, default=100)
    parser.add_argument("--max-test", type=int, default=0, help="0: all test images")
    parser.add_argument("--repeats", type=int, default=30, help="batch-1 predicts timed")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--bank-rows", type=int, default=50_000)
    parser.add_argument("--skip-fit", action="store_true", help="reuse the fitted model")
    parser.add_argument("--phases", default="equality,speed,memory",
                        help="comma-separated subset of equality,speed,memory")
    parser.add_argument("--rounds", type=int, default=5, help="speed: timed batches of 32")
    args = parser.parse_args()
    if args.worker:
        if args.runtime == "torch":  # the exported runtimes never import torch
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(WORKERS[args.worker](args)))
        return
    import numpy as np
    from sklearn.metrics import roc_auc_score

    WORK.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": {"cpu": platform.processor() or platform.machine(),
                                "cores": os.cpu_count(), "threads": args.threads},
                    "settings": vars(args)}
    if not args.skip_fit:
        result["fit"] = spawn("fit", args)
        print("fit + export:", result["fit"])
    phases = set(args.phases.split(","))
    _, labels = test_files(args)
    ref = None
    equality, speed, memory = [], [], []
    for rt in RUNTIMES if "equality" in phases else []:
        spawn("scores", args, rt)
        data = np.load(WORK / f"scores_{rt}.npz")
        if ref is None:
            ref = data
        err_s = float(np.abs(data["scores"] - ref["scores"]).max() / np.abs(ref["scores"]).max())
        err_m = float(np.abs(data["maps"] - ref["maps"]).max() / np.abs(ref["maps"]).max())
        equality.append({"runtime": rt, "images": len(labels),
                         "score_rel_err": f"{err_s:.1e}", "map_rel_err": f"{err_m:.1e}",
                         "image_auroc": round(float(roc_auc_score(labels, data["scores"])), 4)})
    if equality:
        table("equality vs torch (magnetic_tile test set)", equality,
              ["runtime", "images", "score_rel_err", "map_rel_err", "image_auroc"])
    if "speed" in phases:
        measured = spawn("speed", args)
        speed = [{"runtime": rt, **measured[rt]} for rt in RUNTIMES]
        torch_ms = speed[0]["latency_ms"]
        for row in speed:
            row["speedup_b1"] = round(torch_ms / row["latency_ms"], 2)
        table(f"speed ({args.threads} threads, one process, interleaved; shared CPU)", speed,
              ["runtime", "latency_ms", "latency_p90_ms", "speedup_b1", "throughput_img_s"])
    if "memory" in phases:
        bank_50k(args)
        memory = [{"runtime": rt, **spawn("memory", args, rt)} for rt in RUNTIMES]
        table(f"scoring 32 images with a {args.bank_rows:,}-row bank", memory,
              ["runtime", "seconds_32", "peak_mb"])
    # Phases not run this time keep their last results (e.g. --skip-fit --phases speed).
    previous = json.loads((OUT / "export_bench.json").read_text()) if (
        OUT / "export_bench.json").is_file() else {}
    for key, rows in (("fit", result.get("fit")), ("equality", equality), ("speed", speed),
                      ("memory", memory)):
        result[key] = rows or previous.get(key)
    result["loadavg_after"] = os.getloadavg()
    (OUT / "export_bench.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {OUT / 'export_bench.json'}")


if __name__ == "__main__":
    main()
