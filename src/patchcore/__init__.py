"""patchcore: PatchCore visual anomaly detection (Roth et al., "Towards Total Recall")."""

from __future__ import annotations

__version__ = "0.1.0"

import importlib as _importlib
import os as _os
from typing import TYPE_CHECKING, Any

# torch and faiss each bring an OpenMP runtime whose idle threads spin-wait by default; on a
# machine with few cores they starve each other: feature extraction measured 3-7x slower in the
# main thread (2 cores, efficientnet_lite2, 32 images: 5.6 s vs 0.8 s). Passive waiting costs
# nothing measurable here. It takes effect when set before torch and faiss start their thread
# pools, i.e. when patchcore is imported first; set OMP_WAIT_POLICY yourself to override.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import (  # noqa: E402
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
