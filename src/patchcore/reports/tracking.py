"""Experiment tracking: OUT/<project>/<group> folders and optional MLflow / W&B logging.

MLflow and Weights & Biases are optional: they are imported only when asked for, log to local
stores (``OUT/mlruns``; W&B in offline mode under ``OUT/wandb``), and a missing package gives a
clear error instead of an ImportError.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError

TRACKERS = ("mlflow", "wandb")


def run_folder(output: Path, project: str | None, group: str | None) -> Path:
    """OUT/P/G (like patchcore-inspection's --log_project / --log_group), or OUT unchanged."""
    if group and not project:
        project = "project"
    if project:
        return output / project / (group or "group")
    return output


class Tracker:
    """Logs params and metrics to MLflow or W&B when `kind` is given; otherwise does nothing."""

    def __init__(self, kind: str | None, output: Path, project: str | None = None,
                 group: str | None = None, run_name: str | None = None) -> None:
        self.kind = kind
        self._run: Any = None
        if kind is None:
            return
        if kind not in TRACKERS:
            raise ConfigError(f"--tracker must be one of {', '.join(TRACKERS)}, got {kind!r}")
        project = project or "patchcore"
        try:
            if kind == "mlflow":
                import mlflow  # type: ignore[import-not-found]

                mlflow.set_tracking_uri((output / "mlruns").resolve().as_uri())
                mlflow.set_experiment(project)
                self._run = mlflow.start_run(run_name=run_name or group)
                self._mod = mlflow
            else:
                import wandb  # type: ignore[import-not-found]

                os.environ.setdefault("WANDB_MODE", "offline")
                self._run = wandb.init(project=project, group=group, name=run_name,
                                       dir=str(output), mode="offline")
                self._mod = wandb
        except ImportError:
            raise ConfigError(
                f"--tracker {kind} needs the {kind} package, which is not installed; "
                f"install it (pip install {kind}) or leave --tracker out"
            ) from None

    def log_params(self, params: dict[str, Any]) -> None:
        """Hyperparameters of the run."""
        if self._run is None:
            return
        flat = {k: str(v) if isinstance(v, (list, tuple, dict)) or v is None else v
                for k, v in params.items()}
        if self.kind == "mlflow":
            self._mod.log_params(flat)
        else:
            self._run.config.update(flat, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, Any], prefix: str = "") -> None:
        """Numeric metrics (non-numbers and NaN skipped)."""
        if self._run is None:
            return
        clean = {f"{prefix}{k}": float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and not math.isnan(float(v))}
        if self.kind == "mlflow":
            self._mod.log_metrics(clean)
        else:
            self._run.log(clean)

    def finish(self) -> None:
        """End the run."""
        if self._run is None:
            return
        if self.kind == "mlflow":
            self._mod.end_run()
        else:
            self._run.finish()
        self._run = None
