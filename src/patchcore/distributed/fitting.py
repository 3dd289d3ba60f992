"""Sharded fit on Ray: per-shard features and coresets on the workers, the final greedy coreset
over their union on one node, then the usual bank, calibration and model folder.

The training images are cut into contiguous shards. A Ray task per shard (and per ensemble
member) extracts the shard's patch features with the engine's own `extract_features` (bounded by
`max_memory_mb`, spilling to disk past it, as on one machine) and keeps `oversample` times its
share of the bank with the configured sampler (`build_bank`). One more task takes the union of
the shard coresets and runs the same sampler on it for the final bank size
(`percentage` x all patches). Greedy k-center coresets compose: every training patch lies
within its shard's coreset radius of a union row, and the final greedy pick covers the union
within twice the best radius of the union, so the final radius is at most the shard radius
plus twice the optimum (<= 4x the optimal k-center radius; docs/scaling.md has the measured
ratio). Shards are contiguous and each keeps its rows in feature order, so the bank stays in
global feature order with the provenance (image/view, grid position) of a local fit, and the
leave-one-image-out calibration runs on the driver exactly as `PatchCore.fit` runs it.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from ..config import PatchCoreConfig, RuntimeSettings
from ..data.layouts import DatasetSplit, Sample
from ..errors import ConfigError
from .cluster import cluster_cpus, session

log = logging.getLogger(__name__)

__all__ = ["categories_runner", "final_coreset", "fit", "fit_categories", "shard_coreset"]


def shard_coreset(
    config: PatchCoreConfig, settings: RuntimeSettings, backbone: str, layers: tuple[str, ...],
    samples: list[Sample], percentage: float, seed: int, threads: int = 1,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Features and coreset of one shard (a Ray task with two returns, so that the driver
    fetches only the small first): (view count, image sizes, grid, timings) and the bank rows
    (float32, feature order) with their shard-local view index and grid position."""
    import torch

    from ..engine import pipeline
    from ..engine.bank import build_bank
    from ..engine.features import resolve_device

    torch.set_num_threads(max(1, threads))
    device = resolve_device(settings.device)
    member = pipeline.Member(backbone, layers)
    extractor = pipeline.make_extractor(member, config, device)
    sizes: list[tuple[int, int]] = []
    t0 = time.perf_counter()
    store = pipeline.extract_features(member, samples, pipeline.preprocessor(config),
                                      settings.replace(progress=False), sizes=sizes)
    try:
        t1 = time.perf_counter()
        h, w = extractor.feature_grid
        views = len(store) // (h * w)
        shard_config = config.replace(percentage=percentage, bank_dtype="float32")
        rows, view_index, position, info = build_bank(store, (h, w), shard_config, seed, device)
    finally:
        store.close()
    meta = {"num_views": views, "sizes": [(int(a), int(b)) for a, b in sizes], "grid": (h, w),
            "patches": info["patches"], "rows": int(len(rows)),
            "feature_seconds": round(t1 - t0, 3), "coreset_seconds": info["coreset_seconds"]}
    return meta, {"rows": rows, "views": view_index, "position": position}


def final_coreset(config: PatchCoreConfig, seed: int, n: int, device: str,
                  view_counts: list[int], *shards: dict[str, np.ndarray]) -> dict[str, Any]:
    """The final greedy coreset of `n` rows over the union of shard coresets (a Ray task):
    rows in global feature order with global view index and grid position."""
    from ..engine.features import resolve_device
    from ..engine.sampling import get_sampler

    offsets = np.cumsum([0] + list(view_counts[:-1]))
    union = np.concatenate([s["rows"] for s in shards])
    views = np.concatenate([s["views"].astype(np.int64) + o
                            for s, o in zip(shards, offsets, strict=True)])
    position = np.concatenate([s["position"] for s in shards])
    t0 = time.perf_counter()
    if config.sampler == "identity" or n >= len(union):
        idx = np.arange(len(union), dtype=np.int64)
    else:
        sampler = get_sampler(config.sampler, config.projection_dim, config.num_starting_points,
                              resolve_device(device), False)
        idx = np.sort(np.asarray(sampler.select(union, n, seed), dtype=np.int64))
    rows = union[idx]
    if config.bank_dtype == "float16":
        rows = rows.astype(np.float16)
    return {"rows": rows, "views": views[idx].astype(np.int32), "position": position[idx],
            "union_rows": int(len(union)), "coreset_seconds": round(time.perf_counter() - t0, 3)}


def fit(
    train: DatasetSplit | str | Path | Iterable[str | Path | Sample],
    output: str | os.PathLike | None = None,
    *,
    val: Iterable[str | Path | Sample] | None = None,
    config: PatchCoreConfig | None = None,
    settings: RuntimeSettings | None = None,
    address: str | None = None,
    shards: int | None = None,
    oversample: float = 2.0,
    cpus_per_task: float = 1.0,
    **overrides: Any,
) -> Any:
    """Fit a PatchCore model on Ray with sharded features and coresets; returns the fitted
    `PatchCore` (saved to `output` when given, a folder `PatchCore.load` reads).

    `train`, `val`, `config`, `settings` and keyword overrides are as for `PatchCore(...).fit`.
    `shards`: image shards (default: the cluster's CPUs / `cpus_per_task`, at most one per
    image); each keeps `oversample` x its share of the bank before the final coreset.
    """
    from ..engine import pipeline
    from ..engine.bank import MemoryBank, bank_rows
    from ..engine.calibration import Calibration
    from ..model import PatchCore, relative_paths, training_samples
    from ..storage import ModelState

    if oversample < 1 or cpus_per_task <= 0:
        raise ConfigError(f"oversample must be >= 1 and cpus_per_task > 0 (got {oversample}, "
                          f"{cpus_per_task})")
    blank = PatchCore(config, settings, **overrides)
    c, s = pipeline.with_fitted_tiles(blank.config), blank.settings
    samples, val_samples = training_samples(train, val, c)
    members = pipeline.parse_members(c.backbone, c.layers)
    t0 = time.perf_counter()
    with session(address, s.progress) as ray:
        k = max(1, min(len(samples), shards or int(cluster_cpus(ray) // cpus_per_task)))
        bounds = np.linspace(0, len(samples), k + 1).round().astype(int)
        parts = [samples[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        task = ray.remote(num_cpus=cpus_per_task, max_retries=3, num_returns=2)(shard_coreset)
        share = min(1.0, c.percentage * oversample)
        refs = [[task.remote(c, s, m.backbone, m.layers, part, share, c.seed + i,
                             round(cpus_per_task)) for part in parts]
                for i, m in enumerate(members)]
        results = [ray.get([meta for meta, _ in r]) for r in refs]  # small: no bank rows
        finals = []
        for i, shard_results in enumerate(results):
            n = bank_rows(sum(r["patches"] for r in shard_results), c)
            finals.append(ray.remote(num_cpus=cpus_per_task, max_retries=3)(
                final_coreset).remote(c, c.seed + i, n, s.device,
                                      [r["num_views"] for r in shard_results],
                                      *[data for _, data in refs[i]]))
        finals = ray.get(finals)
    seconds = time.perf_counter() - t0
    banks, info_members = [], []
    for m, shard_results, final in zip(members, results, finals, strict=True):
        banks.append(MemoryBank(m.backbone, m.layers, np.array(final["rows"]),  # writable
                                np.array(final["views"]), np.array(final["position"])))
        info_members.append({
            "backbone": m.backbone, "layers": list(m.layers),
            "patches": int(sum(r["patches"] for r in shard_results)),
            "bank_rows": int(len(final["rows"])),
            "coreset_seconds": final["coreset_seconds"],
            "feature_seconds": round(max(r["feature_seconds"] for r in shard_results), 3),
            "features_on_disk": False,
            "shards": [{"images": len(p), "patches": r["patches"], "rows": r["rows"],
                        "feature_seconds": r["feature_seconds"],
                        "coreset_seconds": r["coreset_seconds"]}
                       for p, r in zip(parts, shard_results, strict=True)],
            "union_rows": final["union_rows"]})
    root, paths = relative_paths(samples)
    info = {"train_images": len(samples), "calibration_images": len(val_samples),
            "members": info_members,
            "ray": {"shards": len(parts), "oversample": oversample, "seconds": round(seconds, 3)}}
    sizes = [tuple(x) for r in results[0] for x in r["sizes"]]
    state = ModelState(c, banks, tuple(results[0][0]["grid"]), Calibration(), paths, root, info,
                       sizes)
    model = PatchCore.from_state(state, s)
    pipeline.set_ensemble_norms(model.members_, c.seed)
    model.calibrate_from(samples, val_samples)
    if output is not None:
        model.save(Path(output))
    return model


def fit_categories(
    folders: Iterable[Path], load: Callable[[Path], DatasetSplit], config: PatchCoreConfig,
    settings: RuntimeSettings, out: Path, *, address: str | None = None, evaluate: bool = True,
    request: Any = None, normal: str = "good", tracker: Any = None, writing: Any = nullcontext,
    on_saved: Callable[[Path], Any] | None = None, say: Callable[[str], None] = log.info,
) -> list[dict[str, Any]]:
    """`evaluation.runs.fit_categories` with the sharded fit on Ray (evaluation stays local)."""
    from ..evaluation.runs import evaluate_category

    rows: list[dict[str, Any]] = []
    with session(address, settings.progress):
        for folder in folders:
            split = load(folder)
            t0 = time.perf_counter()
            model = fit(split, config=config, settings=settings)
            fit_s = time.perf_counter() - t0
            path = model.save(out / "models" / split.name)
            if on_saved is not None:
                on_saved(path)
            say(f"{split.name}: fitted on Ray in {fit_s:.1f}s on {len(split.train)} images "
                f"-> {path}")
            if evaluate and split.test:
                row, _ = evaluate_category(model, split, out, request, normal, tracker, writing,
                                           say)
                row["fit_seconds"] = round(fit_s, 2)
                rows.append(row)
    return rows


def categories_runner(address: str | None) -> Callable[..., list[dict[str, Any]]]:
    """`fit_categories` bound to a Ray address ("" or None: local instance / $RAY_ADDRESS)."""
    return functools.partial(fit_categories, address=address or None)
