"""PatchCore past one machine, on Ray (extra `patchcore[ray]`).

- `predict(model_dir, inputs, output, address=...)`: batch scoring with Ray Data and a pool of
  actors that each hold the model once (the bank is placed in the object store once).
- `fit(train, output, address=...)`: sharded fit (per-shard features and coresets on the
  workers, the final coreset over their union on one node), the same model folder as
  `PatchCore.fit` + `save`.

Ray is imported when one of them runs, not by `import patchcore.distributed`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .fitting import categories_runner, fit, fit_categories
    from .scoring import DistributedPrediction, predict

_LAZY = {"predict": ".scoring", "DistributedPrediction": ".scoring", "fit": ".fitting",
         "fit_categories": ".fitting", "categories_runner": ".fitting"}

__all__ = ["DistributedPrediction", "categories_runner", "fit", "fit_categories", "predict"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'patchcore.distributed' has no attribute {name!r}")
