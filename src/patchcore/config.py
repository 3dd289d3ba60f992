"""Every hyperparameter of a PatchCore model in one dataclass, serialisable to JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

SAMPLERS = ("approx_greedy_coreset", "greedy_coreset", "random", "identity")
DISTANCES = ("euclidean", "cosine")
DEVICES = ("auto", "cpu", "cuda")
INDEX_TYPES = ("flat", "ivf", "hnsw")
BACKBONE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class PatchCoreConfig:
    """Hyperparameters of PatchCore; names follow amazon-science/patchcore-inspection."""

    backbone: str = "efficientnet_lite2"
    layers: tuple[str, ...] | None = None  # None: the backbone's default layers
    weights: str | None = None  # local weights file or folder; None: registry default
    pretrained: bool = True  # False: random weights (tests and speed measurements only)
    pretrain_embed_dimension: int = 1024
    target_embed_dimension: int = 1024
    patchsize: int = 3
    patchstride: int = 1
    resize: int = 256
    imagesize: int = 224
    sampler: str = "approx_greedy_coreset"
    percentage: float = 0.1
    projection_dim: int = 128  # random projection used by approx_greedy_coreset
    num_starting_points: int = 10
    anomaly_scorer_num_nn: int = 1
    distance: str = "euclidean"
    reweight: bool = False  # Eq. 7 of the paper
    reweight_neighbourhood: int = 3  # b in Eq. 7
    blur_sigma: float = 4.0
    index: str = "flat"  # faiss index: flat (exact), ivf or hnsw (approximate)
    bank_dtype: str = "float32"  # float32 or float16 storage of the memory bank
    # Backbone precision: float32, or float16 / bfloat16 for large models (GPU). On CPU use
    # bfloat16: many CPU float16 kernels (convolutions) are missing or slow.
    backbone_dtype: str = "float32"
    calibration_holdout: float = 0.1  # share of train images held out when no validation set
    threshold_fpr: float | None = None  # image threshold at this FPR of normal scores
    threshold_percentile: float | None = None  # ... or at this percentile of normal scores
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    num_workers: int = 0
    max_memory_mb: float | None = None  # spill features to disk past this budget
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(self.layers)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid hyperparameter."""
        checks = [
            (self.sampler in SAMPLERS, f"sampler must be one of {SAMPLERS}, got {self.sampler!r}"),
            (self.distance in DISTANCES, f"distance must be one of {DISTANCES}"),
            (self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}"),
            (self.index in INDEX_TYPES, f"index must be one of {INDEX_TYPES}"),
            (self.bank_dtype in ("float32", "float16"), "bank_dtype must be float32 or float16"),
            (self.backbone_dtype in BACKBONE_DTYPES,
             f"backbone_dtype must be one of {BACKBONE_DTYPES}, got {self.backbone_dtype!r}"),
            (0.0 < self.percentage <= 1.0, f"percentage must be in (0, 1], got {self.percentage}"),
            (self.patchsize >= 1 and self.patchsize % 2 == 1, "patchsize must be a positive odd"),
            (self.patchstride >= 1, "patchstride must be >= 1"),
            (self.anomaly_scorer_num_nn >= 1, "anomaly_scorer_num_nn must be >= 1"),
            (self.imagesize >= 16, "imagesize must be >= 16"),
            (self.resize >= self.imagesize, "resize must be >= imagesize (center crop)"),
            (self.pretrain_embed_dimension >= 1, "pretrain_embed_dimension must be >= 1"),
            (self.target_embed_dimension >= 1, "target_embed_dimension must be >= 1"),
            (0.0 <= self.calibration_holdout < 1.0, "calibration_holdout must be in [0, 1)"),
            (self.blur_sigma >= 0, "blur_sigma must be >= 0"),
            (self.threshold_fpr is None or 0 <= self.threshold_fpr <= 1,
             "threshold_fpr must be in [0, 1]"),
            (self.threshold_percentile is None or 0 <= self.threshold_percentile <= 100,
             "threshold_percentile must be in [0, 100]"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers) if self.layers is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchCoreConfig:
        """Build from a dict, rejecting unknown keys so typos do not pass silently."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown hyperparameters: {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> PatchCoreConfig:
        """A copy with some hyperparameters changed."""
        return dataclasses.replace(self, **changes)
