"""What scoring returns: per-image scores, labels and anomaly maps, in input order."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data.preprocess import Preprocessor
from .engine.calibration import Calibration, normalise

LABEL_NAMES = {1: "anomalous", 0: "good", -1: "uncalibrated"}


@dataclass
class Prediction:
    """Scores and maps of a batch of images, in input order.

    `labels` is 1 (anomalous), 0 (good) or -1 (uncalibrated: the model has no threshold, and
    `calibrated` is NaN).
    """

    paths: list[Path | None]
    scores: np.ndarray  # raw image scores
    calibrated: np.ndarray  # 0-1, 0.5 at the image threshold; NaN when uncalibrated
    labels: np.ndarray  # 1 anomalous, 0 good, -1 uncalibrated
    maps: np.ndarray  # V x S x S anomaly maps of every view, at the model's input size
    sizes: list[tuple[int, int]]  # original (W, H)
    patch_scores: np.ndarray  # V x h x w patch scores (first member's grid)
    nearest: np.ndarray  # V x h x w index of the nearest bank row (first member)
    true_labels: np.ndarray | None = None
    masks: list[np.ndarray] | None = None  # N ground truths at original size, when requested
    groups: list[str] = field(default_factory=list)
    preprocessor: Preprocessor | None = None
    view_image: np.ndarray | None = None  # V: the image of each view (None: one view each)

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def label_names(self) -> list[str]:
        """"anomalous", "good" or "uncalibrated" per image."""
        return [LABEL_NAMES[int(v)] for v in self.labels]

    def view_maps(self, i: int) -> np.ndarray:
        """The maps (V_i x S x S) of image i's views."""
        if self.view_image is None:
            return self.maps[i : i + 1]
        return self.maps[self.view_image == i]

    def original_map(self, i: int) -> np.ndarray:
        """Anomaly map of image i at its original size (H x W)."""
        assert self.preprocessor is not None
        return self.preprocessor.to_original(self.view_maps(i), self.sizes[i],
                                             name=self.paths[i])

    def original_maps(self) -> list[np.ndarray]:
        """Every image's anomaly map at its original size."""
        return [self.original_map(i) for i in range(len(self))]

    def calibrated_map(self, i: int, calibration: Calibration) -> np.ndarray:
        """Map of image i at original size, scaled to 0-1 with 0.5 at the pixel threshold."""
        return normalise(self.original_map(i), calibration, "pixel")
