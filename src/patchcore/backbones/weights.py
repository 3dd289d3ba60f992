"""Where pretrained weights come from: a user path, a weights folder, caches, packages, the hub."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import PatchCoreError, WeightsNotFoundError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def offline() -> bool:
    """True when the user asked for no downloads (PATCHCORE_OFFLINE or HF_HUB_OFFLINE)."""
    names = ("PATCHCORE_OFFLINE", "HF_HUB_OFFLINE")
    return any(os.environ.get(v, "") not in ("", "0") for v in names)


def weights_dir() -> Path | None:
    """The user's weights folder setting (PATCHCORE_WEIGHTS_DIR), if any."""
    value = os.environ.get("PATCHCORE_WEIGHTS_DIR")
    return Path(value).expanduser() if value else None


def torch_cache_dir() -> Path:
    """torch.hub's checkpoint folder, honouring TORCH_HOME."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from safetensors or a torch file without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # weights_only=True: a restricted unpickler that refuses code objects.
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - reported with the file name
        raise WeightsNotFoundError(f"cannot read weights file {path}: {exc}") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsNotFoundError(f"weights file {path} does not hold a state dict of tensors")
    return state


def find_in_folder(folder: Path, name: str) -> Path | None:
    """A weights file for backbone `name` inside `folder` (`<name>.<suffix>`), if present."""
    for suffix in WEIGHT_SUFFIXES:
        candidate = folder / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    files = [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES] if folder.is_dir() else []
    return files[0] if len(files) == 1 else None


def user_weights(name: str, weights: str | None, looked: list[str]) -> Path | None:
    """Resolve the user's --weights path or weights folder for backbone `name`."""
    if weights:
        path = Path(weights).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            found = find_in_folder(path, name)
            if found is not None:
                return found
            looked.append(f"{path}/{name}.{{safetensors,pth,pt,bin}}")
        else:
            raise WeightsNotFoundError(f"--weights {path}: no such file or folder")
    folder = weights_dir()
    if folder is not None:
        found = find_in_folder(folder, name) if folder.is_dir() else None
        if found is not None:
            return found
        looked.append(f"PATCHCORE_WEIGHTS_DIR={folder}/{name}.*")
    return None


def missing(name: str, looked: list[str], how: str) -> WeightsNotFoundError:
    """The error for absent weights: the backbone, every place looked, and how to fix it."""
    places = "; ".join(looked) if looked else "nowhere"
    return WeightsNotFoundError(
        f"no pretrained weights for backbone {name!r} on this machine (looked in: {places}). "
        f"Fix: {how}; or pass --weights FILE_OR_FOLDER, or set PATCHCORE_WEIGHTS_DIR to a folder "
        f"holding {name}.safetensors or {name}.pth. For speed tests only, --random-weights."
    )


def remap_by_order(
    source: dict[str, torch.Tensor], target_keys: dict[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """Map a state dict onto a model whose keys differ in name but not in order or shape."""
    src = list(source.items())
    dst = list(target_keys.items())
    if len(src) != len(dst):
        raise WeightsNotFoundError(f"{what}: {len(src)} tensors, the model expects {len(dst)}")
    out = {}
    for (skey, sval), (dkey, dval) in zip(src, dst, strict=True):
        if tuple(sval.shape) != tuple(dval.shape):
            raise WeightsNotFoundError(
                f"{what}: tensor {skey} has shape {tuple(sval.shape)}, model's {dkey} has "
                f"{tuple(dval.shape)}"
            )
        out[dkey] = sval
    return out


def resolve_state_dict(
    name: str,
    weights: str | None,
    *,
    cached: Callable[[list[str]], Path | str | None],
    download: Callable[[], dict[str, torch.Tensor]] | None,
    download_what: str,
    how: str,
) -> dict[str, torch.Tensor]:
    """Weights of backbone `name`, from the first place that has them.

    Order: the user's --weights path, PATCHCORE_WEIGHTS_DIR, `cached(looked)` (the backbone's own
    cache or package, appending what it searched to `looked`), then `download()` unless offline.
    Otherwise a WeightsNotFoundError naming every place looked and the fix `how`.
    """
    looked: list[str] = []
    path = user_weights(name, weights, looked) or cached(looked)
    if path is not None:
        log.info("loading %s weights from %s", name, path)
        return read_state_dict(Path(path))
    if download is not None and not offline():
        try:
            log.info("downloading %s weights (%s)", name, download_what)
            return download()
        except PatchCoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - offline machines end up here
            looked.append(f"{download_what} ({type(exc).__name__})")
    raise missing(name, looked, how)
