"""Hyperparameter search for PatchCore with cached features and resumable results.

Features depend only on a few hyperparameters (backbone, layers, patch size/stride, image size,
resize, embedding dimensions, weights); they are extracted once per such setting and cached as
.npy files under OUT/cache/<hash>/. Every other hyperparameter (sampler, percentage, k,
distance, reweighting, blur) is evaluated from the cache: a memory bank is sampled, indexed and
the test features scored exactly as `PatchCore.fit` + `evaluation.evaluate_split` would.

Finished points are appended to OUT/tune_results.jsonl and skipped when the search is re-run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import PatchCoreConfig, RuntimeSettings
from ..data.layouts import DatasetSplit, Sample
from ..data.loader import batches
from ..engine.bank import MemoryBank, bank_index, build_bank
from ..engine.calibration import holdout_split
from ..engine.features import resolve_device
from ..engine.pipeline import (
    make_extractor,
    member_features,
    parse_members,
    preprocessor,
)
from ..engine.pipeline import (
    score_features as score_member,
)
from ..engine.scoring import anomaly_maps
from ..errors import ConfigError
from ..model import PatchCore
from . import metrics

log = logging.getLogger(__name__)

FEATURE_KEYS = ("backbone", "layers", "pretrained", "weights", "pretrain_embed_dimension",
                "target_embed_dimension", "patchsize", "patchstride", "imagesize", "resize")
METRICS = ("image_auroc", "pixel_auroc", "pro")
RESULTS_FILE = "tune_results.jsonl"


# -- grids -------------------------------------------------------------------------------------

def _convert(key: str, text: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(PatchCoreConfig)}
    if key not in fields or key == "extra":
        raise ConfigError(f"unknown hyperparameter {key!r} in the grid")
    default = getattr(PatchCoreConfig(), key)
    text = text.strip()
    if key == "layers":
        return text  # "layer2+layer3", converted when building the config
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{key} takes true/false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text


def parse_grid(text: str) -> dict[str, list[Any]]:
    """"percentage=0.01,0.1;anomaly_scorer_num_nn=1,3" -> {"percentage": [0.01, 0.1], ...}."""
    grid: dict[str, list[Any]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, values = part.partition("=")
        if not sep or not values.strip():
            raise ConfigError(f"grid entries look like name=v1,v2; got {part!r}")
        grid[key.strip()] = [_convert(key.strip(), v) for v in values.split(",") if v.strip()]
    if not grid:
        raise ConfigError("the grid is empty")
    return grid


def grid_points(
    grid: dict[str, list[Any]], random_n: int | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """All combinations of the grid, or `random_n` of them drawn without replacement."""
    keys = list(grid)
    points = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]
    if random_n is not None and random_n < len(points):
        points = random.Random(seed).sample(points, random_n)
    return points


def config_for(base: PatchCoreConfig, point: dict[str, Any]) -> PatchCoreConfig:
    """`base` with the point's hyperparameters (layers given as "a+b")."""
    changes = dict(point)
    if isinstance(changes.get("layers"), str):
        changes["layers"] = tuple(changes["layers"].split("+"))
    return base.replace(**changes)


def point_key(point: dict[str, Any]) -> str:
    """Stable identity of a grid point (for resuming)."""
    return json.dumps(point, sort_keys=True, default=str)


# -- features ----------------------------------------------------------------------------------

def training_samples(split: DatasetSplit, config: PatchCoreConfig) -> list[Sample]:
    """The images `PatchCore.fit(split)` builds its memory bank from (after any holdout)."""
    if split.val:
        return list(split.train)
    return holdout_split(list(split.train), config.calibration_holdout, config.seed)[0]


@dataclass
class FeatureCache:
    """Train and test patch features of one feature setting (arrays may be memory-mapped)."""

    train: np.ndarray  # N x h x w x D
    test: np.ndarray  # T x h x w x D
    labels: np.ndarray  # T
    masks: np.ndarray | None  # T x S x S bool
    train_paths: list[str]
    grid: tuple[int, int]


def _feature_hash(config: PatchCoreConfig, split: DatasetSplit, train: list[Sample]) -> str:
    meta = {k: getattr(config, k) for k in FEATURE_KEYS}
    meta["layers"] = list(config.layers) if config.layers else None
    meta["train"] = [str(s.path) for s in train]
    meta["test"] = [str(s.path) for s in split.test]
    meta["seed"] = config.seed
    return hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def extract_features(
    config: PatchCoreConfig, split: DatasetSplit, cache_root: Path,
    settings: RuntimeSettings | None = None,
) -> tuple[FeatureCache, bool]:
    """Cached features of `split` for `config`; returns (cache, True when freshly extracted)."""
    settings = settings or RuntimeSettings(progress=False)
    train = training_samples(split, config)
    folder = cache_root / _feature_hash(config, split, train)
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        masks = np.load(folder / "masks.npy", mmap_mode="r") if meta["masks"] else None
        return FeatureCache(np.load(folder / "train.npy", mmap_mode="r"),
                            np.load(folder / "test.npy", mmap_mode="r"),
                            np.load(folder / "labels.npy"),
                            None if masks is None else np.asarray(masks, dtype=bool),
                            meta["train_paths"], tuple(meta["grid"])), False
    torch.manual_seed(config.seed)
    members = parse_members(config.backbone, config.layers)
    if len(members) != 1:
        raise ConfigError("tuning supports one backbone (no ensembles)")
    member = members[0]
    extractor = make_extractor(member, config, resolve_device(settings.device))
    pre = preprocessor(config)
    folder.mkdir(parents=True, exist_ok=True)
    with_masks = split.has_masks

    def run(samples: list[Sample], masks: bool) -> tuple[np.ndarray, list, list]:
        feats, labels, mask_parts = [], [], []
        for batch in batches(samples, pre, settings.batch_size, masks=masks,
                             num_workers=settings.num_workers):
            feats.append(member_features(member, batch.images))
            labels += batch.labels
            if masks:
                mask_parts.append(batch.masks.numpy())
        return np.concatenate(feats), labels, mask_parts

    train_feats, _, _ = run(train, False)
    test_feats, labels, mask_parts = run(split.test, with_masks)
    np.save(folder / "train.npy", train_feats)
    np.save(folder / "test.npy", test_feats)
    np.save(folder / "labels.npy", np.array(labels))
    masks = np.concatenate(mask_parts) if with_masks else None
    if masks is not None:
        np.save(folder / "masks.npy", masks)
    meta = {"masks": masks is not None, "train_paths": [str(s.path) for s in train],
            "grid": list(extractor.feature_grid),
            "config": {k: getattr(config, k) for k in FEATURE_KEYS}}
    meta_path.write_text(json.dumps(meta, indent=2, default=str))
    return FeatureCache(train_feats, test_feats, np.array(labels), masks,
                        meta["train_paths"], tuple(extractor.feature_grid)), True


# -- models from cached features ----------------------------------------------------------------

def model_from_features(config: PatchCoreConfig, cache: FeatureCache) -> PatchCore:
    """A fitted PatchCore (no calibration) whose memory bank is sampled from cached features.

    Mirrors `PatchCore._fit_member`: same sampler, count, seed, bank dtype and index.
    """
    model = PatchCore(config, progress=False)
    member = parse_members(config.backbone, config.layers)[0]
    # A writable copy: the cache may be a read-only memory map.
    flat = np.array(cache.train, dtype=np.float32).reshape(-1, cache.train.shape[-1])
    rows, image_index, position, _ = build_bank(flat, cache.grid, config, config.seed,
                                                model.device)
    member.bank = MemoryBank(member.backbone, member.layers, rows, image_index, position)
    member.index = bank_index(rows, config, model.device)
    model.members_ = [member]
    model.train_paths_ = list(cache.train_paths)
    model.feature_grid_ = cache.grid
    model.fit_info_ = {"train_images": len(cache.train_paths)}
    return model


def score_features(
    model: PatchCore, feats: np.ndarray, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores and anomaly maps of cached test features (as `PatchCore._score_batch`)."""
    c = model.config
    member = model.members_[0]
    scores, maps = [], []
    for start in range(0, len(feats), batch_size):
        f = np.ascontiguousarray(feats[start : start + batch_size], dtype=np.float32)
        ps, _, img = score_member(member, f, c)
        scores.append(img)
        maps.append(anomaly_maps(ps, c.imagesize, c.blur_sigma))
    return np.concatenate(scores), np.concatenate(maps)


def evaluate_point(config: PatchCoreConfig, cache: FeatureCache) -> dict[str, float]:
    """image_auroc, pixel_auroc and pro of one setting from cached features."""
    model = model_from_features(config, cache)
    scores, maps = score_features(model, cache.test)
    result = metrics.evaluate(cache.labels, scores, cache.masks,
                              maps if cache.masks is not None else None)
    return {k: float(result.get(k, math.nan)) for k in METRICS}


# -- the search --------------------------------------------------------------------------------

@dataclass
class TuneResult:
    """All evaluated points (old and new), the best one and what this run did."""

    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    evaluated: int = 0
    skipped: int = 0
    extracted: int = 0
    files: dict[str, Path] = field(default_factory=dict)


def _rank(row: dict[str, Any]) -> tuple[float, float]:
    def v(k: str) -> float:
        x = row.get(k)
        return -math.inf if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)

    return v("image_auroc"), v("pixel_auroc")


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row with the highest image_auroc, ties broken by pixel_auroc (first wins)."""
    best = None
    for row in rows:
        if best is None or _rank(row) > _rank(best):
            best = row
    return best


def load_finished(path: Path) -> dict[str, dict[str, Any]]:
    """Finished points from a results .jsonl, by point key."""
    done: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[point_key(row["params"])] = row
    return done


def tune(
    split: DatasetSplit, output: Path, grid: dict[str, list[Any]],
    base: PatchCoreConfig | None = None, random_n: int | None = None,
    settings: RuntimeSettings | None = None, tracker: Any = None,
) -> TuneResult:
    """Evaluate the grid on `split`, resuming from OUT/tune_results.jsonl; write tables/plots."""
    base = base or PatchCoreConfig()
    output.mkdir(parents=True, exist_ok=True)
    points = grid_points(grid, random_n, base.seed)
    results_path = output / RESULTS_FILE
    done = load_finished(results_path)
    result = TuneResult(rows=[], best=None)
    groups: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        feat = {k: v for k, v in point.items() if k in FEATURE_KEYS}
        groups.setdefault(point_key(feat), []).append(point)
    rows_by_key: dict[str, dict[str, Any]] = {}
    for members in groups.values():
        todo = [p for p in members if point_key(p) not in done]
        for p in members:
            if point_key(p) in done:
                rows_by_key[point_key(p)] = done[point_key(p)]
                result.skipped += 1
                log.info("tune: skipping finished point %s", point_key(p))
        if not todo:
            continue
        config0 = config_for(base, todo[0])
        t0 = time.perf_counter()
        cache, fresh = extract_features(config0, split, output / "cache", settings)
        feature_s = time.perf_counter() - t0
        result.extracted += int(fresh)
        for point in todo:
            t1 = time.perf_counter()
            found = evaluate_point(config_for(base, point), cache)
            row = {"params": point, **found,
                   "seconds": round(time.perf_counter() - t1, 3),
                   "feature_seconds": round(feature_s if fresh else 0.0, 3)}
            fresh = False
            with open(results_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row, default=str) + "\n")
            rows_by_key[point_key(point)] = row
            result.evaluated += 1
            log.info("tune: %s -> %s", point_key(point),
                     ", ".join(f"{k} {found[k]:.4f}" for k in METRICS))
            if tracker is not None:
                tracker.log_metrics({**found, "point": result.evaluated})
    result.rows = [rows_by_key[point_key(p)] for p in points]
    result.best = best_row(result.rows)
    result.files = write_tune_outputs(result.rows, result.best, grid, output)
    log.info("tune: evaluated %d points, skipped %d finished, extracted features %d times",
             result.evaluated, result.skipped, result.extracted)
    return result


# -- outputs -----------------------------------------------------------------------------------

def _flat(row: dict[str, Any]) -> dict[str, Any]:
    return {**row["params"], **{k: v for k, v in row.items() if k != "params"}}


def write_tune_outputs(
    rows: list[dict[str, Any]], best: dict[str, Any] | None, grid: dict[str, list[Any]],
    output: Path,
) -> dict[str, Path]:
    """tune_results.csv/json, best.json, metric-vs-parameter plots and 2-parameter heatmaps."""
    import csv

    files: dict[str, Path] = {}
    flat = [_flat(r) for r in rows]
    columns = list(grid) + [*METRICS, "seconds", "feature_seconds"]
    files["csv"] = output / "tune_results.csv"
    with open(files["csv"], "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(flat)
    files["json"] = output / "tune_results.json"
    files["json"].write_text(json.dumps(flat, indent=2, default=str))
    files["best"] = output / "best.json"
    files["best"].write_text(json.dumps(best, indent=2, default=str))
    files.update(plot_tuning(flat, grid, output / "plots"))
    return files


def plot_tuning(
    flat: list[dict[str, Any]], grid: dict[str, list[Any]], folder: Path
) -> dict[str, Path]:
    """Each metric against each hyperparameter (points and the per-value mean); heatmaps of the
    mean metric when exactly two hyperparameters vary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    varied = [k for k, v in grid.items() if len(v) > 1] or list(grid)
    for metric in METRICS:
        values = [r.get(metric) for r in flat]
        if all(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
            continue
        for key in varied:
            levels = list(dict.fromkeys(r[key] for r in flat))
            fig, ax = plt.subplots(figsize=(5, 3.6))
            xs = [levels.index(r[key]) for r in flat]
            ax.scatter(xs, values, alpha=0.6, label="grid points")
            means = [np.nanmean([r[metric] for r in flat if r[key] == lv]) for lv in levels]
            ax.plot(range(len(levels)), means, color="black", marker="o", label="mean")
            ax.set_xticks(range(len(levels)))
            ax.set_xticklabels([str(lv) for lv in levels])
            ax.set_xlabel(key)
            ax.set_ylabel(metric)
            ax.legend(fontsize=8)
            path = folder / f"{metric}_vs_{key}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            files[f"{metric}_vs_{key}"] = path
        if len(varied) == 2:
            a, b = varied
            la = list(dict.fromkeys(r[a] for r in flat))
            lb = list(dict.fromkeys(r[b] for r in flat))
            table = np.full((len(la), len(lb)), np.nan)
            for i, va in enumerate(la):
                for j, vb in enumerate(lb):
                    cell = [r[metric] for r in flat if r[a] == va and r[b] == vb]
                    if cell:
                        table[i, j] = np.nanmean(cell)
            fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(lb), 1.2 + 0.9 * len(la)))
            im = ax.imshow(table, cmap="viridis")
            for i in range(len(la)):
                for j in range(len(lb)):
                    ax.text(j, i, f"{table[i, j]:.4f}", ha="center", va="center", color="white")
            ax.set_xticks(range(len(lb)))
            ax.set_xticklabels([str(v) for v in lb])
            ax.set_yticks(range(len(la)))
            ax.set_yticklabels([str(v) for v in la])
            ax.set_xlabel(b)
            ax.set_ylabel(a)
            ax.set_title(metric)
            fig.colorbar(im, ax=ax)
            path = folder / f"heatmap_{metric}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            files[f"heatmap_{metric}"] = path
    return files
