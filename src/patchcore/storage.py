"""Model folders: config.json + memory_bank.safetensors, validated on load, written atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .config import PatchCoreConfig
from .errors import ConfigError, ModelFileError

if TYPE_CHECKING:
    from .model import PatchCore

log = logging.getLogger(__name__)

FORMAT = "patchcore-model"
FORMAT_VERSION = 1
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


def save_model(model: PatchCore, path: Path) -> Path:
    """Write to a sibling temporary folder, fsync, then swap it in with renames."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    members = []
    for i, m in enumerate(model.members_):
        tensors[f"member{i}.bank"] = np.ascontiguousarray(m.bank)
        tensors[f"member{i}.image_index"] = np.ascontiguousarray(m.image_index, dtype=np.int32)
        tensors[f"member{i}.position"] = np.ascontiguousarray(m.position, dtype=np.int16)
        members.append({"backbone": m.backbone, "layers": list(m.layers),
                        "bank_shape": list(m.bank.shape), "bank_dtype": str(m.bank.dtype),
                        "norm": list(m.norm)})
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "config": model.config.to_dict(),
        "members": members,
        "feature_grid": list(model.feature_grid_),
        "calibration": model.calibration_,
        "train_paths": model.train_paths_,
        "fit_info": model.fit_info_,
    }
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


def load_model(path: Path, device: str | None = None) -> PatchCore:
    """Rebuild a PatchCore from its folder, checking every tensor's name, dtype and shape."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from .model import Member, PatchCore

    document = read_document(path)
    bank_file = path / BANK_FILE
    if not bank_file.is_file():
        raise ModelFileError(f"{bank_file} is missing; the model folder is incomplete")
    try:
        tensors = load_file(str(bank_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{bank_file} is corrupt or not a safetensors file: {exc}") from None
    try:
        config = PatchCoreConfig.from_dict(document["config"])
    except (ConfigError, TypeError) as exc:
        raise ModelFileError(f"{path / CONFIG_FILE} has an invalid config: {exc}") from None
    if device is not None:
        config = config.replace(device=device)
    model = PatchCore(config)
    expected = set()
    members = []
    for i, entry in enumerate(document["members"]):
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
        if image_index.shape != (bank.shape[0],) or position.shape != (bank.shape[0], 2):
            raise ModelFileError(f"{bank_file}: provenance of member {i} does not match the bank")
        if bank.shape[1] != config.target_embed_dimension:
            raise ModelFileError(
                f"{bank_file}: bank rows have {bank.shape[1]} values, config says "
                f"target_embed_dimension={config.target_embed_dimension}"
            )
        members.append(Member(entry["backbone"], tuple(entry["layers"]), bank, image_index,
                              position, tuple(entry.get("norm", (0.0, 1.0)))))
    extra = set(tensors) - expected
    if extra:
        raise ModelFileError(f"{bank_file} holds unexpected tensors {sorted(extra)}")
    model.members_ = members
    for m in members:
        m.index = model._build_index(m.bank)  # noqa: SLF001 - same package
    model.feature_grid_ = tuple(document["feature_grid"])
    model.calibration_ = document["calibration"]
    model.train_paths_ = list(document.get("train_paths", []))
    model.fit_info_ = document.get("fit_info", {})
    return model
