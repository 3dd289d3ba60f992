"""magnetic_tile's split and what it does to the metrics: the same tile in train and test.

    python benchmarks/tile_split.py [--max-train 100 752]

The magnetic tile data set photographs each tile under up to six lightings (files
exp1_num_N ... exp6_num_N with N rising by 10-50 within a tile, and gaps of more than 100
between tiles). The shared split puts 195 of the 200 good test images beside a shot of the
same tile in train/good, and almost no defective one (their tiles are not in train/good). A good
test image therefore finds its own tile in the memory bank; a defective image's normal surface
does not. This script fits efficientnet_lite2 (defaults, 10% coreset; with and without
`standardize`) on the first N training images and evaluates every test image twice:

* as split: `evaluate_split` (with the train/test overlap check's shares);
* own tile left out: each test image's patches searched exactly (float32, torch.cdist) in the
  bank without the rows of training shots of its own tile, i.e. as an unseen tile is scored.
  Maps, metrics and the square preprocessing are the library's.

Prints a table and writes benchmarks/out/tile_split.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
OUT = HERE / "out"
GAP = 100  # largest num step within one tile's run of shots


def tile_groups(root: Path) -> dict[Path, int]:
    """Every image of the data set -> its tile (a run of shots exp1..6 with close nums)."""
    shots = []
    for path in root.glob("t*/*/*.jpg"):
        match = re.match(r"exp(\d)_num_(\d+)", path.name)
        if match:
            shots.append((int(match[2]), int(match[1]), path.resolve()))
    shots.sort()
    tile, prev_num, prev_exp, out = -1, None, 99, {}
    for num, exp, path in shots:
        if prev_num is None or num - prev_num > GAP or exp <= prev_exp:
            tile += 1
        out[path] = tile
        prev_num, prev_exp = num, exp
    return out


def own_tile_left_out(model, pred, tiles: dict[Path, int]) -> dict:
    """Metrics of the test images of `pred` (scored with masks), each scored again against
    the bank minus the rows of its own tile's training shots."""
    import numpy as np
    import torch

    from patchcore import metrics
    from patchcore.engine.scoring import anomaly_maps

    member = model.members_[0]
    bank = torch.from_numpy(np.asarray(member.bank.features, dtype=np.float32))
    row_image = model.training_images(member.bank.image_index)
    train_tile = np.array([tiles[model.training_path(i).resolve()]
                           for i in range(len(model.train_paths_))])
    row_tile = train_tile[row_image]
    scores, maps, left_out = [], [], []
    for path, size in zip(pred.paths, pred.sizes, strict=True):
        feats = model.view_features(path)  # V x h x w x D
        keep = torch.from_numpy(row_tile != tiles[Path(path).resolve()])
        left_out.append(int((~keep).sum()))
        d = torch.cdist(torch.from_numpy(feats.reshape(-1, feats.shape[-1])), bank[keep])
        grid = d.min(dim=1).values.reshape(feats.shape[:3]).numpy()
        scores.append(float(grid.max()))
        view_maps = anomaly_maps(grid, model.config.imagesize, model.config.blur_sigma)
        maps.append(model.preprocessor.to_original(view_maps, size))
    result = metrics.evaluate(pred.true_labels, np.array(scores), pred.masks, maps)
    result["rows_left_out_median"] = float(np.median(left_out))
    return {k: result[k] for k in ("image_auroc", "pixel_auroc", "pro", "rows_left_out_median")}


def main() -> None:
    import torch

    from patchcore import PatchCore, load_dataset
    from patchcore.evaluation.evaluate import evaluate_split

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-train", type=int, nargs="+", default=[100, 752])
    p.add_argument("--standardize", choices=["on", "off", "both"], default="both")
    args = p.parse_args()
    settings = {"on": [True], "off": [False], "both": [True, False]}[args.standardize]
    torch.set_num_threads(2)
    root = SHARED / "magnetic_tile"
    split = load_dataset(root)
    tiles = tile_groups(root)
    train_tiles = {tiles[s.path.resolve()] for s in split.train}
    siblings = collections.Counter(
        s.group for s in split.test if tiles[s.path.resolve()] in train_tiles)
    print("test images with a shot of their tile in train/good:", dict(siblings))
    rows = []
    for n in args.max_train:
        for standardize in settings:
            model = PatchCore(backbone="efficientnet_lite2", standardize=standardize,
                              progress=False)
            t0 = time.perf_counter()
            model.fit(split.train[:n])
            fit_s = round(time.perf_counter() - t0, 1)
            row, pred = evaluate_split(model, split)
            keep = ("image_auroc", "pixel_auroc", "pro", "good_source_share",
                    "anomalous_source_share", "train_test_overlap")
            common = {"train": n, "standardize": standardize}
            rows.append({**common, "scoring": "as split", "fit_s": fit_s,
                         **{k: row[k] for k in keep}})
            rows.append({**common, "scoring": "own tile left out",
                         **own_tile_left_out(model, pred, tiles)})
            print(json.dumps(rows[-2]), json.dumps(rows[-1]), sep="\n", flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "tile_split.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "siblings_in_train": dict(siblings), "rows": rows}, indent=2))
    print(f"\n{'train':>6} {'standardize':>12} {'scoring':<20}{'img':>8}{'pix':>8}{'PRO':>8}")
    for r in rows:
        print(f"{r['train']:>6} {str(r['standardize']):>12} {r['scoring']:<20}"
              f"{r['image_auroc']:>8.4f}{r['pixel_auroc']:>8.4f}{r['pro']:>8.3f}")


if __name__ == "__main__":
    main()
