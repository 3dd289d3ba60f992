"""patchcore: PatchCore visual anomaly detection (Roth et al., "Towards Total Recall")."""

from __future__ import annotations

__version__ = "0.1.0"

import os as _os  # noqa: E402

# torch and faiss each bring an OpenMP runtime whose idle threads spin-wait by default; on a
# machine with few cores they starve each other: feature extraction measured 3-7x slower in the
# main thread (2 cores, efficientnet_lite2, 32 images: 5.6 s vs 0.8 s). Passive waiting costs
# nothing measurable here. It takes effect when set before torch and faiss start their thread
# pools, i.e. when patchcore is imported first; set OMP_WAIT_POLICY yourself to override.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .backbones import get_backbone  # noqa: E402
from .config import PatchCoreConfig  # noqa: E402
from .data.layouts import MVTEC_CATEGORIES, load_dataset  # noqa: E402
from .errors import (  # noqa: E402
    BackboneError,
    ConfigError,
    DataError,
    ModelFileError,
    NotFittedError,
    PatchCoreError,
    WeightsNotFoundError,
)
from .evaluation import metrics  # noqa: E402
from .model import PatchCore, Prediction  # noqa: E402


def load(path: str, device: str | None = None) -> PatchCore:
    """Load a saved model folder."""
    return PatchCore.load(path, device=device)


def list_backbones() -> list[dict[str, object]]:
    """Registered backbones with their source, default layers and local weight availability."""
    from .backbones import backbone_names

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
    return list(MVTEC_CATEGORIES)


__all__ = [
    "BackboneError", "ConfigError", "DataError", "ModelFileError", "NotFittedError", "PatchCore",
    "PatchCoreConfig", "PatchCoreError", "Prediction", "WeightsNotFoundError", "__version__",
    "list_backbones", "list_mvtec_categories", "load", "load_dataset", "metrics",
]
