"""Model folders: config.json + memory_bank.safetensors <-> a plain `ModelState`.

Writes are atomic; reads validate every entry before anything is built. No model code here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import PatchCoreConfig
from .engine.bank import MemoryBank
from .engine.calibration import Calibration
from .errors import ConfigError, ModelFileError

log = logging.getLogger(__name__)

FORMAT = "patchcore-model"
FORMAT_VERSION = 2  # 2: train_root, runtime settings no longer saved; 1 still loads
CONFIG_FILE = "config.json"
BANK_FILE = "memory_bank.safetensors"
MAX_CONFIG_BYTES = 64 * 2**20


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class ModelState:
    """Everything a model folder holds, as plain data: no extractor, no index, no torch."""

    config: PatchCoreConfig
    banks: list[MemoryBank]
    feature_grid: tuple[int, int]
    calibration: Calibration
    train_paths: list[str]
    train_root: str | None = None
    fit_info: dict[str, Any] = field(default_factory=dict)


def state_document(state: ModelState) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """config.json content and the safetensors tensors of a state."""
    tensors: dict[str, np.ndarray] = {}
    members = []
    for i, b in enumerate(state.banks):
        tensors[f"member{i}.bank"] = np.ascontiguousarray(b.features)
        tensors[f"member{i}.image_index"] = np.ascontiguousarray(b.image_index, dtype=np.int32)
        tensors[f"member{i}.position"] = np.ascontiguousarray(b.position, dtype=np.int16)
        members.append({"backbone": b.backbone, "layers": list(b.layers),
                        "bank_shape": list(b.features.shape), "bank_dtype": str(b.features.dtype),
                        "norm": list(b.norm)})
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "config": state.config.to_dict(),
        "members": members,
        "feature_grid": list(state.feature_grid),
        "calibration": state.calibration.to_dict(),
        "train_root": state.train_root,
        "train_paths": list(state.train_paths),
        "fit_info": state.fit_info,
    }
    return document, tensors


def save_state(state: ModelState, path: Path) -> Path:
    """Write a model folder: to a sibling temporary folder, fsync, then swap it in."""
    from safetensors.numpy import save_file

    path = Path(path)
    document, tensors = state_document(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(tensors, str(tmp / BANK_FILE), metadata={"format": FORMAT})
        with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as fh:
            json.dump(document, fh, indent=2, default=_json_default)
            fh.flush()
            os.fsync(fh.fileno())
        with open(tmp / BANK_FILE, "rb") as fh:
            os.fsync(fh.fileno())
        old = None
        if path.exists():
            if not path.is_dir():
                raise ModelFileError(f"{path} exists and is not a model folder")
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved model to %s", path)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_document(path: Path) -> dict[str, Any]:
    """The validated config.json of a model folder."""
    cfg = path / CONFIG_FILE
    if not path.is_dir():
        raise ModelFileError(f"model folder {path} does not exist (expected a folder written by "
                             "`patchcore fit` or PatchCore.save)")
    if not cfg.is_file():
        raise ModelFileError(f"{path} is not a patchcore model folder: {CONFIG_FILE} is missing")
    if cfg.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelFileError(f"{cfg} is implausibly large; not a patchcore model file")
    try:
        document = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{cfg} is corrupt or not JSON: {exc}") from None
    except RecursionError:
        raise ModelFileError(f"{cfg} is nested implausibly deep; not a patchcore model file"
                             ) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ModelFileError(f"{cfg} is not a patchcore model file (format field missing)")
    version = document.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ModelFileError(
            f"{cfg} has model format version {version!r}; this patchcore {__version__} reads "
            f"version {FORMAT_VERSION}. Upgrade patchcore or refit the model."
        )
    for key in ("config", "members", "feature_grid", "calibration"):
        if key not in document:
            raise ModelFileError(f"{cfg} lacks the {key!r} entry; the file is damaged")
    return document


def _check(ok: bool, cfg: Path, message: str) -> None:
    if not ok:
        raise ModelFileError(f"{cfg}: {message}; the file is damaged or not ours")


def load_state(path: Path) -> ModelState:
    """Read and validate a model folder: every tensor's name, dtype and shape, every value."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    document = read_document(path)
    cfg = path / CONFIG_FILE
    bank_file = path / BANK_FILE
    if not bank_file.is_file():
        raise ModelFileError(f"{bank_file} is missing; the model folder is incomplete")
    try:
        config = PatchCoreConfig.from_dict(document["config"])
    except ConfigError as exc:
        raise ModelFileError(f"{cfg} has an invalid config: {exc}") from None
    grid = document["feature_grid"]
    _check(isinstance(grid, list) and len(grid) == 2 and all(
        isinstance(g, int) and not isinstance(g, bool) and 1 <= g <= 4096 for g in grid), cfg,
        f"feature_grid must be two integers in 1..4096, got {str(grid)[:80]}")
    train_paths = document.get("train_paths", [])
    _check(isinstance(train_paths, list) and all(isinstance(p, str) for p in train_paths), cfg,
           "train_paths must be a list of paths")
    train_root = document.get("train_root")
    _check(train_root is None or isinstance(train_root, str), cfg, "train_root must be a path")
    fit_info = document.get("fit_info", {})
    _check(isinstance(fit_info, dict), cfg, "fit_info must be an object")
    entries = document["members"]
    _check(isinstance(entries, list) and 1 <= len(entries) <= 16, cfg,
           "members must be a list of 1 to 16 entries")
    try:
        calibration = Calibration.from_dict(document["calibration"])
    except ModelFileError as exc:
        raise ModelFileError(f"{cfg}: {exc}") from None
    try:
        tensors = load_file(str(bank_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{bank_file} is corrupt or not a safetensors file: {exc}") from None
    expected = set()
    banks = []
    for i, entry in enumerate(entries):
        _check(isinstance(entry, dict) and isinstance(entry.get("backbone"), str)
               and isinstance(entry.get("layers"), list)
               and all(isinstance(x, str) for x in entry["layers"])
               and isinstance(entry.get("bank_shape"), list), cfg,
               f"member {i} needs backbone, layers and bank_shape")
        norm = entry.get("norm", [0.0, 1.0])
        _check(isinstance(norm, list) and len(norm) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
            for v in norm) and norm[1] > 0, cfg, f"member {i} norm must be [mean, std > 0]")
        names = {k: f"member{i}.{k}" for k in ("bank", "image_index", "position")}
        expected.update(names.values())
        missing = [n for n in names.values() if n not in tensors]
        if missing:
            raise ModelFileError(f"{bank_file} lacks tensors {missing}; file does not match config")
        bank, image_index, position = (tensors[names[k]] for k in ("bank", "image_index",
                                                                     "position"))
        if list(bank.shape) != list(entry["bank_shape"]) or bank.ndim != 2:
            raise ModelFileError(
                f"{bank_file}: bank of member {i} has shape {list(bank.shape)}, config.json says "
                f"{entry['bank_shape']}; the files do not belong together"
            )
        if bank.dtype not in (np.float32, np.float16) or not np.isfinite(bank).all():
            raise ModelFileError(f"{bank_file}: bank of member {i} is not finite float data")
        if bank.shape[0] < 1:
            raise ModelFileError(f"{bank_file}: bank of member {i} is empty")
        if image_index.shape != (bank.shape[0],) or position.shape != (bank.shape[0], 2):
            raise ModelFileError(f"{bank_file}: provenance of member {i} does not match the bank")
        if image_index.dtype != np.int32 or position.dtype != np.int16:
            raise ModelFileError(f"{bank_file}: provenance of member {i} has the wrong dtype")
        if (image_index.min() < 0 or (train_paths and image_index.max() >= len(train_paths))
                or position.min() < 0 or (i == 0 and (position[:, 0].max() >= grid[0]
                                                      or position[:, 1].max() >= grid[1]))):
            raise ModelFileError(f"{bank_file}: provenance of member {i} points outside the "
                                 "training images or the feature grid")
        if bank.shape[1] != config.target_embed_dimension:
            raise ModelFileError(
                f"{bank_file}: bank rows have {bank.shape[1]} values, config says "
                f"target_embed_dimension={config.target_embed_dimension}"
            )
        if config.anomaly_scorer_num_nn > bank.shape[0]:
            raise ModelFileError(
                f"{cfg}: anomaly_scorer_num_nn={config.anomaly_scorer_num_nn} is larger than "
                f"the memory bank of member {i} ({bank.shape[0]} rows)")
        banks.append(MemoryBank(entry["backbone"], tuple(entry["layers"]), bank, image_index,
                                position, (float(norm[0]), float(norm[1]))))
    if len(banks) != len(config.backbones):
        raise ModelFileError(f"{cfg}: {len(banks)} members but {len(config.backbones)} backbones")
    extra = set(tensors) - expected
    if extra:
        raise ModelFileError(f"{bank_file} holds unexpected tensors {sorted(extra)}")
    return ModelState(config, banks, (grid[0], grid[1]), calibration, list(train_paths),
                      train_root, fit_info)
