"""patchcore: PatchCore visual anomaly detection (Roth et al., "Towards Total Recall")."""

from __future__ import annotations

__version__ = "0.1.0"

import importlib as _importlib
from typing import TYPE_CHECKING, Any

# OpenMP waits are left at the runtime's default (threads spin briefly between operations).
# Earlier versions set OMP_WAIT_POLICY=PASSIVE here, when faiss ran the exact search beside torch
# and their two pools starved each other; with the search in torch it only cost time: every small
# operation of a batch-1 forward paid a thread wake-up (efficientnet_lite2 predict at batch 1,
# 2 cores: 47 -> 29 ms, bare backbone forward 32 -> 15 ms). Ray workers still wait passively
# (distributed/cluster.py), since several of them share a node's cores.
from .errors import (
    BackboneError,
    ConfigError,
    DataError,
    ModelFileError,
    NotFittedError,
    PatchCoreError,
    WeightsNotFoundError,
)

# Public names resolved on first use, so that `import patchcore` (and the torch-free parts such
# as `patchcore.inference`) starts without importing torch, faiss or the backbone zoo.
_LAZY: dict[str, tuple[str, str | None]] = {
    "PatchCore": (".model", "PatchCore"),
    "Prediction": (".prediction", "Prediction"),
    "PatchCoreConfig": (".config", "PatchCoreConfig"),
    "RuntimeSettings": (".config", "RuntimeSettings"),
    "get_backbone": (".backbones", "get_backbone"),
    "load_dataset": (".data.layouts", "load_dataset"),
    "MVTEC_CATEGORIES": (".data.layouts", "MVTEC_CATEGORIES"),
    "metrics": (".evaluation.metrics", None),
    "benchmark": (".evaluation.benchmark", "benchmark"),
    "list_categories": (".evaluation.benchmark", "list_categories"),
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .backbones import get_backbone
    from .config import PatchCoreConfig, RuntimeSettings
    from .data.layouts import MVTEC_CATEGORIES, load_dataset
    from .evaluation import metrics
    from .evaluation.benchmark import benchmark, list_categories
    from .model import PatchCore
    from .prediction import Prediction


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = _importlib.import_module(module_name, __name__)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'patchcore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def load(path: str, device: str | None = None) -> PatchCore:
    """Load a saved model folder."""
    from .model import PatchCore

    return PatchCore.load(path, device=device)


def list_backbones() -> list[dict[str, object]]:
    """Registered backbones with their source, default layers and local weight availability."""
    from .backbones import backbone_names, get_backbone

    rows = []
    for name in backbone_names():
        spec = get_backbone(name)
        try:
            available = bool(spec.weights_available(spec))
        except Exception:  # noqa: BLE001 - availability is best effort
            available = False
        rows.append({"name": name, "source": spec.source, "layers": list(spec.default_layers),
                     "input_size": spec.input_size, "weights_available": available,
                     "weights": spec.weights_hint, "description": spec.description})
    return rows


def list_mvtec_categories() -> list[str]:
    """The 15 MVTec AD categories."""
    from .data.layouts import MVTEC_CATEGORIES

    return list(MVTEC_CATEGORIES)


__all__ = [
    "MVTEC_CATEGORIES", "BackboneError", "ConfigError", "DataError", "ModelFileError",
    "NotFittedError", "PatchCore", "PatchCoreConfig", "PatchCoreError", "Prediction",
    "RuntimeSettings", "WeightsNotFoundError", "__version__", "get_backbone", "list_backbones",
    "list_mvtec_categories", "load", "load_dataset", "metrics",
    "benchmark", "list_categories",
]
