"""Side-by-side benchmark: patchcore (ours) against anomalib, same machine, same run.

    python benchmarks/run.py                 # both configurations + the scaling run
    python benchmarks/run.py --only lite2    # one configuration
    python benchmarks/run.py --no-peer       # ours only (no anomalib venv)

Configurations (issue 6): the paper's (wide_resnet50_2 layer2+layer3, random weights: speed and
memory only) on magnetic_tile with 100 training images, and efficientnet_lite2 with real
weights on magnetic_tile (100) and hazelnut_toy (all). anomalib 2.7.0 runs in its own venv
(benchmarks/setup_peers.sh) through benchmarks/peers/anomalib_runner.py. Every phase runs in
a fresh process. Prints a table with ratios (peer / ours) and writes benchmarks/out/*.json;
the scaling run writes benchmarks/out/scaling.json and scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SHARED = HERE.parent.parent / "shared" / "data"
PEER_VENV = Path(os.environ.get("PEER_VENV", Path.home() / ".cache/patchcore-peers/anomalib"))

CONFIGS = {
    "wr50": dict(data="magnetic_tile", backbone="wide_resnet50_2", random=True, max_train=100),
    "lite2": dict(data="magnetic_tile", backbone="efficientnet_lite2", random=False,
                  max_train=100),
    "lite2_hazelnut": dict(data="hazelnut_toy", backbone="efficientnet_lite2", random=False,
                           max_train=None),
    # Ours only: approximate faiss IVF search instead of the exact flat index.
    "lite2_ivf": dict(data="magnetic_tile", backbone="efficientnet_lite2", random=False,
                      max_train=100, index="ivf", peer=False),
    "wr50_ivf": dict(data="magnetic_tile", backbone="wide_resnet50_2", random=True,
                     max_train=100, index="ivf", peer=False),
}
COLUMNS = [("image_auroc", "img AUROC"), ("pixel_auroc", "pix AUROC"),
           ("feature_extraction_s", "features s"), ("coreset_s", "coreset s"),
           ("fit_s", "fit s"), ("predict_latency_ms", "ms/img b1"),
           ("throughput_img_s", "img/s b32"), ("fit_peak_rss_mb", "fit RSS MB"),
           ("predict_peak_rss_mb", "pred RSS MB"), ("backbone_forward_ms", "bare fwd ms")]


def run(cmd: list[str], env: dict | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})


def measure(name: str, cfg: dict, peer: bool, threads: int) -> dict:
    data = str(SHARED / cfg["data"])
    common = ["--data", data, "--backbone", cfg["backbone"], "--coreset", "0.1",
              "--threads", str(threads)]
    if cfg["random"]:
        common.append("--random-weights")
    if cfg["max_train"]:
        common += ["--max-train", str(cfg["max_train"])]
    rows = {}
    ours_out = OUT / f"{name}_ours.json"
    index = ["--index", cfg["index"]] if "index" in cfg else []
    run([sys.executable, str(HERE / "ours_runner.py"), *common, *index, "--out", str(ours_out)])
    rows["ours"] = json.loads(ours_out.read_text())
    peer = peer and cfg.get("peer", True)
    peer_py = PEER_VENV / "bin" / "python"
    if peer and peer_py.exists():
        peer_out = OUT / f"{name}_anomalib.json"
        run([str(peer_py), str(HERE / "peers" / "anomalib_runner.py"), *common,
             "--out", str(peer_out)])
        rows["anomalib"] = json.loads(peer_out.read_text())
    elif peer:
        print(f"(no peer venv at {PEER_VENV}: run benchmarks/setup_peers.sh)")
    return rows


def table(results: dict) -> str:
    lines = []
    head = f"{'config':16s} {'impl':9s} " + " ".join(f"{h:>11s}" for _, h in COLUMNS)
    lines.append(head)
    for name, rows in results.items():
        for impl, row in rows.items():
            cells = []
            for key, _ in COLUMNS:
                v = row.get(key)
                cells.append(f"{v:11.3f}" if isinstance(v, float) else f"{str(v or '-'):>11s}")
            lines.append(f"{name:16s} {impl:9s} " + " ".join(cells))
        if "anomalib" in rows:
            ours, peer = rows["ours"], rows["anomalib"]
            cells = []
            for key, _ in COLUMNS:
                a, b = peer.get(key), ours.get(key)
                if key in ("image_auroc", "pixel_auroc", "backbone_forward_ms") or not a or not b:
                    cells.append(f"{'':>11s}")
                elif key == "throughput_img_s":
                    cells.append(f"{b / a:10.2f}x")
                else:
                    cells.append(f"{a / b:10.2f}x")
            lines.append(f"{name:16s} {'ratio':9s} " + " ".join(cells))
    return "\n".join(lines)


def scaling(sizes: list[int], threads: int, max_memory: float, reuse: bool = False) -> dict:
    points = []
    for n in sizes:
        out = OUT / f"scaling_{n}.json"
        if not (reuse and out.exists()):
            run([sys.executable, str(HERE / "ours_runner.py"), "--data",
                 str(SHARED / "magnetic_tile"), "--backbone", "efficientnet_lite2",
                 "--augment-to", str(n), "--coreset", "0.1", "--threads", str(threads),
                 "--max-memory", str(max_memory), "--skip-predict", "--out", str(out)])
        r = json.loads(out.read_text())
        points.append({k: r[k] for k in ("n_train", "feature_extraction_s", "coreset_s",
                                         "fit_s", "fit_peak_rss_mb", "features_on_disk")})
        print(points[-1], flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    n = [p["n_train"] for p in points]
    a1.plot(n, [p["fit_s"] for p in points], "o-", label="fit")
    a1.plot(n, [p["feature_extraction_s"] for p in points], "s--", label="features")
    a1.plot(n, [p["coreset_s"] for p in points], "^--", label="coreset")
    a1.set_xlabel("training images")
    a1.set_ylabel("seconds")
    a1.legend()
    a2.plot(n, [p["fit_peak_rss_mb"] for p in points], "o-")
    a2.axhline(max_memory, color="grey", ls=":", label="--max-memory")
    a2.set_xlabel("training images")
    a2.set_ylabel("peak RSS of fit (MB)")
    a2.legend()
    fig.suptitle("efficientnet_lite2, 10% coreset, magnetic_tile (+ flips/rotations)")
    fig.tight_layout()
    fig.savefig(OUT / "scaling.png", dpi=100)
    return {"max_memory_mb": max_memory, "points": points}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=sorted(CONFIGS), default=None)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scaling", nargs="*", type=int, default=None,
                   help="training-set sizes for the scaling run (e.g. 250 500 1000 2000 4000)")
    p.add_argument("--max-memory", type=float, default=1024.0)
    p.add_argument("--reuse", action="store_true", help="scaling: keep points already measured")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.only or ([] if args.scaling is not None else list(CONFIGS)):
        results[name] = measure(name, CONFIGS[name], not args.no_peer, args.threads)
    report = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "processor": platform.processor()}, "results": results}
    if args.scaling:
        report["scaling"] = scaling(args.scaling, args.threads, args.max_memory, args.reuse)
    if results:
        text = table(results)
        print("\n" + text)
        report["table"] = text
    name = "scaling" if args.scaling and not results else "results"
    if args.only:
        name += "_" + "_".join(args.only)
    (OUT / f"{name}.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {OUT / (name + '.json')}")


if __name__ == "__main__":
    main()
