"""Hyperparameter search for PatchCore on verified, cached features, with resumable results.

Features depend on every hyperparameter outside `BANK_KEYS` (backbone, layers, sizes, ... and the
seed and hold-out that choose the training images). They are extracted once per such setting by
the engine's own fit path (`pipeline.extract_features`, `member_features`) and streamed into
OUT/cache/<id>/ as .npy files whose shape, dtype and sha256 are recorded in meta.json, written
last and atomically. A cache entry that does not verify is recomputed, with a warning. Every grid
point is then evaluated from the cache exactly as `PatchCore.fit` + `evaluate_split` would:
`build_bank`, `bank_index`, `pipeline.score_features` and `anomaly_maps`, with the features
read from the cache files in slices when they exceed `settings.max_memory_mb`.

Finished points are appended to OUT/tune_results.jsonl (flushed and fsynced) and skipped when the
search is re-run on the same data with the same settings; damaged lines are dropped with a
warning and their points recomputed.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io
import json
import logging
import math
import os
import time
import typing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import ParameterGrid, ParameterSampler
from tqdm.auto import tqdm

from .. import __version__
from ..config import PatchCoreConfig, RuntimeSettings, check_value
from ..data.layouts import DatasetSplit, Sample
from ..data.loader import batches
from ..engine import pipeline
from ..engine.bank import MemoryBank, bank_index, build_bank
from ..engine.calibration import holdout_split
from ..engine.features import resolve_device
from ..engine.memory import FeatureStore, read_npy_header
from ..engine.pipeline import Member, make_extractor, member_features, parse_members
from ..engine.scoring import image_scores_from_views
from ..errors import ConfigError, DataError
from . import metrics

log = logging.getLogger(__name__)

# Hyperparameters that only shape the memory bank and the scores: every other one (and the
# package version) decides the cached features.
BANK_KEYS = ("sampler", "percentage", "projection_dim", "num_starting_points",
             "anomaly_scorer_num_nn", "distance", "reweight", "reweight_neighbourhood",
             "blur_sigma", "index", "bank_dtype", "threshold_fpr", "threshold_percentile")
METRICS = ("image_auroc", "pixel_auroc", "pro")
RESULTS_FILE = "tune_results.jsonl"
CACHE_FORMAT = 3  # 3: views per image, image sizes, masks at original size
CACHE_FILES = ("train.npy", "test.npy", "labels.npy")
CHUNK_ROWS = 65536  # feature rows per write when streaming into the cache
HASH_BLOCK = 1 << 20
MAX_POINTS = 100_000

_HYPER = {f.name: f for f in dataclasses.fields(PatchCoreConfig)}
_HINTS = typing.get_type_hints(PatchCoreConfig)
_RUNTIME = {f.name: f for f in dataclasses.fields(RuntimeSettings)}
_TRUE, _FALSE, _NONE = ("true", "yes", "1"), ("false", "no", "0"), ("none", "null")


# -- grids -------------------------------------------------------------------------------------

def _runtime_option(name: str) -> str:
    return _RUNTIME[name].metadata.get("cli") or "--" + name.replace("_", "-")


def check_key(key: str) -> None:
    """ConfigError unless `key` names a PatchCoreConfig hyperparameter."""
    if key in _HYPER:
        return
    if key in _RUNTIME:
        raise ConfigError(f"{key} is a runtime setting, not a hyperparameter: give it as "
                          f"{_runtime_option(key)}, not in the grid")
    close = difflib.get_close_matches(key, [*_HYPER, *_RUNTIME], n=1)
    if close and close[0] in _RUNTIME:
        hint = (f" (did you mean {close[0]}? that is a runtime setting: give it as "
                f"{_runtime_option(close[0])}, not in the grid)")
    else:
        hint = f" (did you mean {close[0]}?)" if close else (
            "; grid keys are hyperparameters such as percentage or anomaly_scorer_num_nn")
    raise ConfigError(f"unknown hyperparameter {key!r} in the grid{hint}")


def check_grid_value(key: str, value: Any) -> Any:
    """`value` type- and range-checked like the PatchCoreConfig field (layers may be "a+b")."""
    checked = tuple(value.split("+")) if key == "layers" and isinstance(value, str) else value
    try:
        checked = check_value(key, checked, _HINTS[key], _HYPER[key].metadata)
    except ConfigError as exc:
        raise ConfigError(f"grid entry {key}={value}: {exc}") from None
    return value if key == "layers" else checked


def parse_value(key: str, text: str) -> Any:
    """One grid value from text, typed and range-checked like the PatchCoreConfig field."""
    check_key(key)
    raw = text.strip()
    if not raw:
        raise ConfigError(f"grid entry {key} has an empty value; write {key}=v1,v2")
    kinds = set(typing.get_args(_HINTS[key])) or {_HINTS[key]}
    low = raw.lower()
    if type(None) in kinds and low in _NONE:
        value: Any = None
    elif bool in kinds:
        if low not in _TRUE + _FALSE:
            raise ConfigError(f"grid entry {key}={raw}: {key} takes true or false")
        value = low in _TRUE
    elif int in kinds or float in kinds:
        try:
            value = int(raw) if int in kinds else float(raw)
        except ValueError:
            want = "a whole number" if int in kinds else "a number"
            raise ConfigError(f"grid entry {key}={raw}: {key} takes {want}, got {raw!r}"
                              ) from None
    else:
        value = raw
    return check_grid_value(key, value)


def check_grid(grid: dict[str, Sequence[Any]]) -> dict[str, list[Any]]:
    """The grid with every key and value checked: hyperparameters only, non-empty value lists
    without repeats, each value valid for its field. Raises a one-line ConfigError."""
    if not isinstance(grid, dict) or not grid:
        raise ConfigError("the grid is empty; give it as name=v1,v2;name=v1,v2")
    out: dict[str, list[Any]] = {}
    for key, values in grid.items():
        check_key(key)
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ConfigError(f"grid entry {key} needs a non-empty list of values")
        out[key] = [check_grid_value(key, v) for v in values]
        if len({json.dumps(v, default=str) for v in out[key]}) != len(out[key]):
            raise ConfigError(f"grid entry {key} lists a value twice; give each value once")
    size = len(ParameterGrid(out))
    if size > MAX_POINTS:
        raise ConfigError(f"the grid has {size} points (more than {MAX_POINTS}); narrow it or "
                          "evaluate a random subset (--random N)")
    return out


def parse_grid(text: str) -> dict[str, list[Any]]:
    """"percentage=0.01,0.1;anomaly_scorer_num_nn=1,3" -> {"percentage": [0.01, 0.1], ...}.

    Every malformed entry, unknown or runtime key and out-of-range value is a one-line
    ConfigError.
    """
    grid: dict[str, list[Any]] = {}
    for part in filter(None, (p.strip() for p in str(text).split(";"))):
        key, sep, values = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"grid entries look like name=v1,v2; got {part!r}")
        if key in grid:
            raise ConfigError(f"grid entry {key} is given twice; list all its values once: "
                              f"{key}=v1,v2")
        check_key(key)
        grid[key] = [parse_value(key, v) for v in values.split(",")]
    return check_grid(grid)


def grid_points(
    grid: dict[str, Sequence[Any]], random_n: int | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """Every combination of the grid (scikit-learn's ParameterGrid), or `random_n` of them drawn
    without replacement, the same ones for the same seed (ParameterSampler)."""
    full = ParameterGrid(grid)
    if random_n is not None and (isinstance(random_n, bool) or not isinstance(random_n, int)
                                 or random_n < 1):
        raise ConfigError(f"the number of random points must be a whole number >= 1, got "
                          f"{random_n!r}")
    if random_n is None or random_n >= len(full):
        return list(full)
    return list(ParameterSampler(grid, n_iter=random_n, random_state=seed))


def config_for(base: PatchCoreConfig, point: dict[str, Any]) -> PatchCoreConfig:
    """`base` with the point's hyperparameters (layers given as "a+b")."""
    changes = dict(point)
    if isinstance(changes.get("layers"), str):
        changes["layers"] = tuple(changes["layers"].split("+"))
    return base.replace(**changes)


def point_config(base: PatchCoreConfig, point: dict[str, Any]) -> PatchCoreConfig:
    """The validated config of one grid point (one backbone); a one-line ConfigError if not."""
    try:
        config = config_for(base, point)
        members = parse_members(config.backbone, config.layers)
    except ConfigError as exc:
        raise ConfigError(f"grid point {point_key(point)}: {exc}") from None
    if len(members) != 1:
        raise ConfigError(f"grid point {point_key(point)}: tuning takes one backbone; tune "
                          "ensemble members one at a time")
    return config


def point_key(point: dict[str, Any]) -> str:
    """Stable identity of a grid point."""
    return json.dumps(point, sort_keys=True, default=str)


def _canonical(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value, default=str))


# -- cached features ---------------------------------------------------------------------------

def training_samples(split: DatasetSplit, config: PatchCoreConfig) -> list[Sample]:
    """The images `PatchCore.fit(split)` builds its memory bank from (after any holdout)."""
    if split.val:
        return list(split.train)
    return holdout_split(list(split.train), config.calibration_holdout, config.seed)[0]


def _file_state(path: Path | str) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), None, None]
    return [str(path), st.st_size, st.st_mtime_ns]


def feature_key(config: PatchCoreConfig, split: DatasetSplit, train: Sequence[Sample]
                ) -> dict[str, Any]:
    """What cached features depend on: the feature hyperparameters, the package version and the
    exact train and test files (path, size, modification time), test labels and masks."""
    return _canonical({
        "format": CACHE_FORMAT, "version": __version__,
        "config": {k: v for k, v in config.to_dict().items() if k not in BANK_KEYS},
        "train": [_file_state(s.path) for s in train],
        "test": [[*_file_state(s.path), s.label, None if s.mask is None else _file_state(s.mask)]
                 for s in split.test],
    })


def entry_id(key: dict[str, Any]) -> str:
    """The cache folder name of a feature key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class FeatureCache:
    """Verified cached features of one feature setting.

    `train` and `test` are stores over the cache files (views*h*w x D rows, view-major): in RAM
    within the memory budget, read slice by slice past it. Test images have `view_counts`
    views and their own `sizes`; their masks are kept at that size.
    """

    folder: Path
    train: FeatureStore
    test: FeatureStore
    labels: np.ndarray  # T
    masks: list[np.ndarray] | None  # T masks, H x W bool at each image's own size
    grid: tuple[int, int]
    train_paths: list[str]
    view_counts: list[int] = field(default_factory=list)  # views of each test image
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (W, H) of each test image

    def close(self) -> None:
        """Release the stores (the cache files stay)."""
        self.train.close()
        self.test.close()


def _write_npy(path: Path, shape: tuple[int, ...], dtype: Any, chunks: Iterable[np.ndarray]
               ) -> dict[str, Any]:
    """Stream `chunks` (C order, `shape` in total) into a .npy file and fsync it; returns the
    file's shape, dtype and sha256 (hashed while writing)."""
    dtype = np.dtype(dtype)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {
        "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
        "shape": tuple(int(n) for n in shape)})
    digest = hashlib.sha256(header.getvalue())
    written = 0
    with open(path, "wb") as fh:
        fh.write(header.getvalue())
        for chunk in chunks:
            part = np.ascontiguousarray(chunk, dtype=dtype)
            data = memoryview(part).cast("B")
            digest.update(data)
            fh.write(data)
            written += part.size
        fh.flush()
        os.fsync(fh.fileno())
    if written != math.prod(shape):
        raise DataError(f"{path}: wrote {written} values where {math.prod(shape)} were expected "
                        "(did the images change during the run?); run tune again")
    return {"shape": [int(n) for n in shape], "dtype": dtype.str, "sha256": digest.hexdigest()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary file and os.replace (never half-written)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _verify_entry(folder: Path, meta: Any, key: dict[str, Any]) -> None:
    """DataError naming the first way the cache entry differs from its meta.json and `key`."""
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise DataError("meta.json is not a tune cache description of this version")
    if meta.get("key") != key:
        raise DataError("it was made for other feature settings or other image files")
    h, w = (int(n) for n in meta["grid"])
    files = meta["files"]
    names = [*CACHE_FILES, *(["masks.npy"] if meta["masks"] else [])]
    counts, sizes = meta["train_views"], meta["test_views"]
    n_test = len(key["test"])
    if len(counts) != len(key["train"]) or len(sizes) != n_test or len(meta["sizes"]) != n_test:
        raise DataError("meta.json lists views or sizes for another number of images")
    expected = {"train.npy": sum(counts) * h * w, "test.npy": sum(sizes) * h * w,
                "labels.npy": n_test,
                "masks.npy": sum(int(wi) * int(hi) for wi, hi in meta["sizes"])}
    for name in names:
        spec = files[name]
        shape, dtype, _ = read_npy_header(folder / name)
        if list(shape) != spec["shape"] or dtype.str != spec["dtype"]:
            raise DataError(f"{name} holds {dtype.str} {list(shape)} but meta.json recorded "
                            f"{spec['dtype']} {spec['shape']}")
        if not shape or shape[0] != expected[name]:
            raise DataError(f"{name} has {shape[0] if shape else 0} rows, the setting needs "
                            f"{expected[name]}")
        if _sha256(folder / name) != spec["sha256"]:
            raise DataError(f"{name} does not match its sha256 checksum")
    if files["train.npy"]["shape"][1:] != files["test.npy"]["shape"][1:]:
        raise DataError("train and test features differ in dimension")


def open_cache(folder: Path, key: dict[str, Any], max_memory_mb: float | None = None
               ) -> FeatureCache | None:
    """The cache entry in `folder`, verified against `key` and its meta.json (shape and dtype
    from each array header, sha256 of each file), or None with a warning saying why not."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        if folder.is_dir() and any(folder.iterdir()):
            log.warning("tune cache %s has no meta.json (an interrupted extraction): "
                        "recomputing its features", folder)
        return None
    stores: list[FeatureStore] = []
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        _verify_entry(folder, meta, key)
        stores.append(FeatureStore.open_npy(folder / "train.npy", max_memory_mb))
        train = stores[0]
        # The test rows get what the training rows left of the budget.
        left = None if max_memory_mb is None else max(
            0.0, max_memory_mb - (0 if train.on_disk else train.rows * train.dim * 4 / 2**20))
        stores.append(FeatureStore.open_npy(folder / "test.npy", left))
        labels = np.load(folder / "labels.npy")
        sizes = [(int(a), int(b)) for a, b in meta["sizes"]]
        masks = None
        if meta["masks"]:
            flat = np.load(folder / "masks.npy").astype(bool)
            ends = np.cumsum([wi * hi for wi, hi in sizes])
            masks = [part.reshape(hi, wi) for part, (wi, hi)
                     in zip(np.split(flat, ends[:-1]), sizes, strict=True)]
        grid = (int(meta["grid"][0]), int(meta["grid"][1]))
        paths = [str(p) for p in meta["train_paths"]]
        counts = [int(c) for c in meta["test_views"]]
    except (OSError, ValueError, KeyError, TypeError, IndexError, DataError) as exc:
        for store in stores:
            store.close()
        log.warning("tune cache %s is not usable (%s): recomputing its features", folder,
                    str(exc)[:200])
        return None
    return FeatureCache(folder, stores[0], stores[1], labels, masks, grid, paths, counts, sizes)


def extract_features(
    config: PatchCoreConfig, split: DatasetSplit, train: Sequence[Sample], folder: Path,
    key: dict[str, Any], settings: RuntimeSettings,
) -> FeatureCache:
    """Extract the train and test features of one feature setting into `folder` (streamed, in
    batches) and open them as a verified FeatureCache."""
    if not train:
        raise DataError(f"category {split.name} has no training images left for the memory "
                        "bank; add normal images or lower calibration_holdout")
    (folder / "meta.json").unlink(missing_ok=True)  # invalid until meta.json is written again
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    member = parse_members(config.backbone, config.layers)[0]
    extractor = make_extractor(member, config, resolve_device(settings.device))
    pre = pipeline.preprocessor(config)
    h, w = extractor.feature_grid
    files: dict[str, dict[str, Any]] = {}
    train_counts = pipeline.view_counts(train, pre)
    with pipeline.extract_features(member, train, pre, settings, "tune features") as store:
        files["train.npy"] = _write_npy(folder / "train.npy", store.shape, np.float32, (
            store[a : a + CHUNK_ROWS] for a in range(0, len(store), CHUNK_ROWS)))
    with_masks = split.has_masks
    labels: list[int] = []
    sizes: list[tuple[int, int]] = []
    test_counts = pipeline.view_counts(split.test, pre)
    mask_parts: list[np.ndarray] = []

    def test_rows() -> Iterator[np.ndarray]:
        for batch in tqdm(
            batches(split.test, pre, settings.batch_size, masks=with_masks,
                    num_workers=settings.num_workers),
            total=-(-len(split.test) // settings.batch_size), desc=f"tune test [{split.name}]",
            unit="batch", disable=not settings.progress, leave=False,
        ):
            if batch.view_counts != test_counts[len(labels) : len(labels) + len(batch.paths)]:
                raise DataError(f"image {batch.paths[0]} or its batch changed size while being "
                                "read; rerun when the folder is not being written to")
            feats = member_features(member, batch.images, settings.batch_size)
            labels.extend(batch.labels)
            sizes.extend(batch.sizes)
            if with_masks:
                mask_parts.extend(np.asarray(m, dtype=bool).ravel() for m in batch.masks)
            yield feats.reshape(-1, feats.shape[-1])

    files["test.npy"] = _write_npy(folder / "test.npy",
                                   (sum(test_counts) * h * w, extractor.feature_dim),
                                   np.float32, test_rows())
    files["labels.npy"] = _write_npy(folder / "labels.npy", (len(labels),), np.int64,
                                     [np.asarray(labels, dtype=np.int64)])
    if with_masks:
        masks = np.concatenate(mask_parts)
        files["masks.npy"] = _write_npy(folder / "masks.npy", masks.shape, bool, [masks])
    meta = {"format": CACHE_FORMAT, "key": key, "grid": [h, w], "masks": with_masks,
            "files": files, "train_paths": [str(s.path) for s in train],
            "train_views": train_counts, "test_views": test_counts,
            "sizes": [list(s) for s in sizes]}
    _write_atomic(folder / "meta.json", json.dumps(meta, indent=1))
    cache = open_cache(folder, key, settings.max_memory_mb)
    if cache is None:
        raise DataError(f"the features just written to {folder} do not read back; check the "
                        "disk (free space, permissions) and run tune again")
    return cache


def cached_features(
    config: PatchCoreConfig, split: DatasetSplit, cache_root: Path,
    settings: RuntimeSettings | None = None,
) -> tuple[FeatureCache, bool]:
    """Verified cached features of `split` for `config`; (cache, True when freshly extracted)."""
    settings = settings or RuntimeSettings(progress=False)
    train = training_samples(split, config)
    key = feature_key(config, split, train)
    folder = cache_root / entry_id(key)
    cache = open_cache(folder, key, settings.max_memory_mb)
    if cache is not None:
        return cache, False
    return extract_features(config, split, train, folder, key, settings), True


# -- evaluation from cached features ------------------------------------------------------------

def fit_cached(config: PatchCoreConfig, cache: FeatureCache, settings: RuntimeSettings
               ) -> Member:
    """The fitted member `PatchCore.fit` would build from these training features."""
    device = resolve_device(settings.device)
    member = parse_members(config.backbone, config.layers)[0]
    rows, image_index, position, _ = build_bank(cache.train, cache.grid, config, config.seed,
                                                device, settings.progress)
    member.bank = MemoryBank(member.backbone, member.layers, rows, image_index, position)
    member.index = bank_index(rows, config, device)
    return member


def score_cached(
    member: Member, cache: FeatureCache, config: PatchCoreConfig, batch_size: int = 64,
    maps: bool = True,
) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """Image scores and whole-image anomaly maps (when `maps`) of the cached test features,
    as `PatchCore.score` gives them: the max over each image's views, maps at its own size."""
    h, w = cache.grid
    per = h * w
    pre = pipeline.preprocessor(config)
    counts = cache.view_counts
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    scores: list[np.ndarray] = []
    out: list[np.ndarray] = []
    for first in range(0, len(counts), batch_size):
        last = min(len(counts), first + batch_size)
        a, b = int(starts[first]), int(starts[last])
        feats = cache.test[a * per : b * per].reshape(b - a, h, w, -1)
        view_scores, view_maps, _, _ = pipeline.score_view_features([member], [feats], config)
        scores.append(image_scores_from_views(view_scores, counts[first:last]))
        if maps:
            for i in range(first, last):
                views = view_maps[int(starts[i]) - a : int(starts[i + 1]) - a]
                out.append(pre.to_original(views, cache.sizes[i]))
    return np.concatenate(scores), out if maps else None


def evaluate_point(config: PatchCoreConfig, cache: FeatureCache,
                   settings: RuntimeSettings | None = None) -> dict[str, float]:
    """image_auroc, pixel_auroc and pro of one setting from cached features."""
    settings = settings or RuntimeSettings(progress=False)
    member = fit_cached(config, cache, settings)
    with_masks = cache.masks is not None
    scores, maps = score_cached(member, cache, config, settings.batch_size, with_masks)
    result = metrics.evaluate(cache.labels, scores, cache.masks, maps)
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


def _row_id(params: Any, config: Any, features: Any) -> str:
    """Identity of a result: the grid point, the full config and the feature cache entry."""
    return json.dumps([params, config, features], sort_keys=True, default=str)


def _valid_row(row: Any) -> bool:
    return (isinstance(row, dict) and isinstance(row.get("params"), dict)
            and all(k in row and (row[k] is None or (isinstance(row[k], (int, float))
                                                     and not isinstance(row[k], bool)))
                    for k in METRICS))


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """Finished rows of a results .jsonl by result identity (the last one wins).

    Damaged lines (an interrupted write) are skipped with a warning and dropped from the file,
    which is rewritten atomically, so that their points are recomputed and later appends start
    on a line of their own.
    """
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    rows: dict[str, dict[str, Any]] = {}
    kept: list[str] = []
    bad: list[int] = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not _valid_row(row):
            bad.append(number)
            continue
        rows[_row_id(row["params"], row.get("config"), row.get("features"))] = row
        kept.append(line)
    if bad:
        log.warning("%s: skipped %d damaged line(s) (line %s; an interrupted run?): their points "
                    "are recomputed", path, len(bad), ", ".join(map(str, bad[:5])))
    if bad or not raw.endswith(b"\n"):
        _write_atomic(path, "".join(line + "\n" for line in kept))
    return rows


def _append_line(path: Path, line: str) -> None:
    """Append one line and flush it to disk (a crash leaves at most this line half-written)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


@dataclass
class _Plan:
    point: dict[str, Any]
    config: PatchCoreConfig
    features: str  # cache entry id
    row_id: str


def tune(
    split: DatasetSplit, output: Path, grid: dict[str, Sequence[Any]],
    base: PatchCoreConfig | None = None, random_n: int | None = None,
    settings: RuntimeSettings | None = None, tracker: Any = None,
) -> TuneResult:
    """Evaluate the grid on `split`, resuming from OUT/tune_results.jsonl; write tables/plots.

    Every point's config is built and checked before any feature extraction.
    """
    base = base or PatchCoreConfig()
    settings = settings or RuntimeSettings(progress=False)
    grid = check_grid(grid)
    points = grid_points(grid, random_n, base.seed)
    configs = [point_config(base, p) for p in points]
    if not split.test:
        raise DataError(f"category {split.name} has no test images to tune on; add a test "
                        "folder")
    output.mkdir(parents=True, exist_ok=True)
    results_path = output / RESULTS_FILE
    done = read_results(results_path)
    ids: dict[str, str] = {}  # feature config -> cache entry id
    plans: list[_Plan] = []
    for point, config in zip(points, configs, strict=True):
        fconf = json.dumps({k: v for k, v in config.to_dict().items() if k not in BANK_KEYS},
                           sort_keys=True)
        if fconf not in ids:
            ids[fconf] = entry_id(feature_key(config, split, training_samples(split, config)))
        fid = ids[fconf]
        plans.append(_Plan(point, config, fid,
                           _row_id(_canonical(point), _canonical(config.to_dict()), fid)))
    result = TuneResult(rows=[], best=None)
    rows: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[_Plan]] = {}
    for plan in plans:
        if plan.row_id in done:
            rows[plan.row_id] = done[plan.row_id]
            result.skipped += 1
            log.info("tune: skipping finished point %s", point_key(plan.point))
        else:
            groups.setdefault(plan.features, []).append(plan)
    for todo in groups.values():
        t0 = time.perf_counter()
        cache, fresh = cached_features(todo[0].config, split, output / "cache", settings)
        feature_s = time.perf_counter() - t0
        result.extracted += int(fresh)
        try:
            for plan in todo:
                t1 = time.perf_counter()
                found = evaluate_point(plan.config, cache, settings)
                row = {"params": plan.point, **found,
                       "seconds": round(time.perf_counter() - t1, 3),
                       "feature_seconds": round(feature_s if fresh else 0.0, 3),
                       "features": plan.features, "config": plan.config.to_dict()}
                fresh = False
                _append_line(results_path, json.dumps(row, default=str))
                rows[plan.row_id] = row
                result.evaluated += 1
                log.info("tune: %s -> %s", point_key(plan.point),
                         ", ".join(f"{k} {found[k]:.4f}" for k in METRICS))
                if tracker is not None:
                    tracker.log_metrics({**found, "point": result.evaluated})
        finally:
            cache.close()
    result.rows = [rows[plan.row_id] for plan in plans]
    result.best = best_row(result.rows)
    result.files = write_tune_outputs(result.rows, result.best, grid, output)
    log.info("tune: evaluated %d points, skipped %d finished, extracted features %d times",
             result.evaluated, result.skipped, result.extracted)
    return result


# -- outputs -----------------------------------------------------------------------------------

def _flat(row: dict[str, Any]) -> dict[str, Any]:
    return {**row["params"], **{k: v for k, v in row.items() if k not in ("params", "config")}}


def write_tune_outputs(
    rows: list[dict[str, Any]], best: dict[str, Any] | None, grid: dict[str, list[Any]],
    output: Path,
) -> dict[str, Path]:
    """tune_results.csv/json, best.json, metric-vs-parameter plots and 2-parameter heatmaps."""
    files: dict[str, Path] = {}
    flat = [_flat(r) for r in rows]
    columns = list(grid) + [*METRICS, "seconds", "feature_seconds"]
    files["csv"] = output / "tune_results.csv"
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(flat)
    _write_atomic(files["csv"], text.getvalue())
    files["json"] = output / "tune_results.json"
    _write_atomic(files["json"], json.dumps(flat, indent=2, default=str))
    files["best"] = output / "best.json"
    _write_atomic(files["best"], json.dumps(best, indent=2, default=str))
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
