"""Model hyperparameters (saved with a model) and runtime settings (never saved), validated.

Every field carries its help text, choices and range in its metadata: validation, the JSON loader
and the command line all read them from here, so a default, a limit or a help text exists once.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
BACKBONE_DTYPES = ("float32", "float16", "bfloat16")
BANK_DTYPES = ("float32", "float16")
# The registries own these names; config only checks membership (kept literal here so that
# reading a config does not import torch or faiss). tests/test_config.py checks they match.
SAMPLERS = ("approx_greedy_coreset", "greedy_coreset", "random", "identity")
DISTANCES = ("euclidean", "cosine")
INDEX_TYPES = ("flat", "ivf", "hnsw")
PREPROCESS_MODES = ("square", "aspect", "tile", "crop")
AGGREGATIONS = ("native", "reference")

MAX_IMAGESIZE = 4096  # pixels per side of the backbone input
MAX_EMBED_DIMENSION = 16384


def _f(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
       choices: tuple[str, ...] | None = None, cli: str | None = None,
       short: str | None = None, open_lo: bool = False) -> Any:
    meta = {"help": help, "min": lo, "max": hi, "choices": choices, "cli": cli, "short": short,
            "open_lo": open_lo}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class PatchCoreConfig:
    """Hyperparameters of PatchCore; names follow amazon-science/patchcore-inspection.

    These, and only these, are saved with a model: they decide its scores.
    """

    backbone: str | tuple[str, ...] = _f(
        "efficientnet_lite2", "Backbone name; repeat for an ensemble.", short="-b")
    layers: tuple[str, ...] | None = _f(
        None, "Layers to take features from (default: the backbone's). Ensembles: 0.layer2.",
        cli="--layer", short="-le")
    weights: str | None = _f(None, "Local weights file or folder (offline use).")
    pretrained: bool = _f(True, "Pretrained weights; random weights are for tests and speed "
                          "measurements only.", cli="--pretrained/--random-weights")
    aggregation: str = _f(
        "native", "Patch features: native (each layer's 3x3 neighbourhood mean, layers "
        "concatenated at their own width) or reference (the paper's pooling of every layer "
        "to --pretrain-embed-dimension, then to --target-embed-dimension).",
        choices=AGGREGATIONS)
    pretrain_embed_dimension: int = _f(
        1024, "reference aggregation: per-layer embedding size.", lo=1,
        hi=MAX_EMBED_DIMENSION)
    target_embed_dimension: int = _f(
        1024, "reference aggregation: memory-bank embedding size.", lo=1,
        hi=MAX_EMBED_DIMENSION)
    patchsize: int = _f(3, "Neighbourhood aggregated into each patch feature (odd).", lo=1,
                        hi=15)
    patchstride: int = _f(1, "Stride of the patch neighbourhood.", lo=1, hi=8)
    preprocess: str = _f(
        "square", "How images become backbone inputs: square (whole image resized to imagesize "
        "x imagesize), aspect (shorter side to imagesize, overlapping squares along the longer "
        "side), tile (overlapping --tile-size tiles), crop (the paper's resize + centre crop, "
        "which discards the image's borders: for reproducing MVTec AD numbers).",
        choices=PREPROCESS_MODES)
    resize: int = _f(256, "crop mode: shorter image side before the centre crop.", lo=16,
                     hi=MAX_IMAGESIZE)
    imagesize: int = _f(224, "Side of the square views fed to the backbone.", lo=16,
                        hi=MAX_IMAGESIZE)
    standardize: bool = _f(True, "Scale each image to a fixed mean and contrast before the "
                           "backbone, so that lighting and exposure changes between images "
                           "are not scored as anomalies (--no-standardize: pixels as read, "
                           "as the paper).")
    tile_size: int | None = _f(None, "tile mode: tile side in original pixels (default "
                               "2 x imagesize).", lo=16, hi=65536)
    tile_stride: int | None = _f(None, "tile mode: tile step in original pixels (default half "
                                 "the tile).", lo=1, hi=65536)
    sampler: str = _f("approx_greedy_coreset", "Memory-bank subsampling.", choices=SAMPLERS)
    percentage: float = _f(0.1, "Share of patches kept in the memory bank (coreset).", lo=0.0,
                           hi=1.0, open_lo=True, short="-p")
    projection_dim: int = _f(128, "Random projection size of the approximate coreset.", lo=1,
                             hi=MAX_EMBED_DIMENSION)
    num_starting_points: int = _f(10, "Starting points of the approximate coreset.", lo=1,
                                  hi=10_000)
    anomaly_scorer_num_nn: int = _f(1, "Nearest bank rows averaged into a patch score.", lo=1,
                                    hi=1024)
    distance: str = _f("euclidean", "Patch distance.", choices=DISTANCES)
    reweight: bool = _f(False, "Image score reweighting (paper Eq. 7).")
    reweight_neighbourhood: int = _f(3, "b in Eq. 7: bank neighbours of the nearest row.", lo=1,
                                     hi=1024)
    blur_sigma: float = _f(4.0, "Gaussian blur of anomaly maps, in pixels.", lo=0.0, hi=64.0)
    index: str = _f("flat",
                    "Nearest-neighbour index: flat (exact), ivf or hnsw (faiss, approximate).",
                    choices=INDEX_TYPES)
    bank_dtype: str = _f("float32", "Memory-bank storage precision.", choices=BANK_DTYPES)
    backbone_dtype: str = _f(
        "float32", "Backbone precision (bfloat16 for large models on CPU).",
        choices=BACKBONE_DTYPES)
    calibration_holdout: float = _f(
        0.0, "Without a validation set: 0 = thresholds from leave-one-image-out scores (every "
        "training image stays in the memory bank); > 0 = hold this share of the training "
        "images out of the bank to score them.", lo=0.0, hi=0.9)
    threshold_fpr: float | None = _f(
        None, "Image threshold at this false-positive rate of normal validation scores.",
        lo=0.0, hi=1.0)
    threshold_percentile: float | None = _f(
        None, "Image threshold at this percentile (0-100) of normal validation scores.",
        lo=0.0, hi=100.0)
    seed: int = _f(0, "Random seed (coreset, hold-out, random weights).", lo=0, hi=2**32 - 1)

    def __post_init__(self) -> None:
        if isinstance(self.backbone, (list, tuple)):
            self.backbone = (tuple(self.backbone) if len(self.backbone) != 1
                             else self.backbone[0])
        if isinstance(self.layers, list):
            self.layers = tuple(self.layers)
        self.validate()

    @property
    def backbones(self) -> tuple[str, ...]:
        """The backbone names (one, or several for an ensemble)."""
        return (self.backbone,) if isinstance(self.backbone, str) else tuple(self.backbone)

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid hyperparameter."""
        check_fields(self)
        if self.patchsize % 2 != 1:
            raise ConfigError(f"patchsize must be odd, got {self.patchsize}")
        if self.preprocess == "crop" and self.resize < self.imagesize:
            raise ConfigError(f"resize ({self.resize}) must be >= imagesize ({self.imagesize}): "
                              "the image is centre-cropped after resizing")
        tile = self.tile_size or 2 * self.imagesize
        if self.tile_stride is not None and self.tile_stride > tile:
            raise ConfigError(f"tile_stride ({self.tile_stride}) must be at most tile_size "
                              f"({tile}): larger steps leave parts of the image unseen")
        if not self.backbones or not all(self.backbones):
            raise ConfigError("at least one backbone name is needed")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchCoreConfig:
        """Build from a dict, rejecting unknown keys so typos do not pass silently.

        Runtime settings saved by older versions (device, batch_size, ...) are ignored.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k not in LEGACY_RUNTIME_KEYS}
        # A saved config lacking a later hyperparameter predates it: it was fitted (and must
        # keep scoring) with the behaviour of that time, not with today's default.
        data = {**LEGACY_VALUES, **data}
        return from_plain(cls, data, "hyperparameter")

    def replace(self, **changes: Any) -> PatchCoreConfig:
        """A copy with some hyperparameters changed."""
        return dataclasses.replace(self, **changes)


# Saved in config.json by format-1 models written before runtime settings were split off.
LEGACY_RUNTIME_KEYS = ("device", "batch_size", "num_workers", "max_memory_mb", "extra")
# Behaviour of models saved before these hyperparameters existed.
LEGACY_VALUES: dict[str, Any] = {"preprocess": "crop", "aggregation": "reference",
                                 "standardize": False}


@dataclass
class RuntimeSettings:
    """How to run (device, batching, memory): never saved with a model, never changes scores."""

    device: str = _f("auto", "auto, cpu or cuda.", choices=DEVICES)
    batch_size: int = _f(8, "Images per forward pass.", lo=1, hi=4096)
    num_workers: int = _f(0, "Image decoding worker processes.", lo=0, hi=256)
    max_memory_mb: float | None = _f(
        None, "MB of RAM for training features before they spill to disk.", lo=0.0, hi=2**30,
        open_lo=True,
        cli="--max-memory")
    progress: bool = _f(True, "Show progress bars.")

    def __post_init__(self) -> None:
        check_fields(self)

    def replace(self, **changes: Any) -> RuntimeSettings:
        """A copy with some settings changed."""
        return dataclasses.replace(self, **changes)


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments -> (hyperparameters, runtime settings); unknown names are an error."""
    hyper = {f.name for f in dataclasses.fields(PatchCoreConfig)}
    runtime = {f.name for f in dataclasses.fields(RuntimeSettings)}
    unknown = sorted(set(overrides) - hyper - runtime)
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(unknown)}; hyperparameters are "
                          f"{', '.join(sorted(hyper))}; runtime settings "
                          f"{', '.join(sorted(runtime))}")
    return ({k: v for k, v in overrides.items() if k in hyper},
            {k: v for k, v in overrides.items() if k in runtime})


# -- field checks shared by both dataclasses -------------------------------------------------

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _allowed(hint: Any) -> tuple[set[type], bool]:
    """(base types, None allowed) of a field annotation."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(
        hint) is typing.Union else (hint,)
    kinds: set[type] = set()
    optional = False
    for a in args:
        if a is type(None):
            optional = True
        else:
            kinds.add(typing.get_origin(a) or a)
    return kinds, optional


def check_value(name: str, value: Any, hint: Any, meta: Any) -> Any:
    """The value, type-checked and range-checked against the field's metadata."""
    kinds, optional = _allowed(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} must be set (got null)")
    if bool in kinds and isinstance(value, bool):
        return value
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number or text, not true/false")
    if int in kinds and isinstance(value, int):
        pass
    elif float in kinds and isinstance(value, (int, float)):
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
    elif str in kinds and isinstance(value, str):
        if len(value) > 4096:
            raise ConfigError(f"{name} is implausibly long ({len(value)} characters)")
    elif tuple in kinds and isinstance(value, (list, tuple)):
        if len(value) > 64 or not all(isinstance(v, str) and 0 < len(v) <= 512 for v in value):
            raise ConfigError(f"{name} must be a short list of non-empty names, got {value!r}")
        return tuple(value)
    else:
        want = " or ".join(sorted(k.__name__ for k in kinds))
        raise ConfigError(f"{name} must be {want}, got {type(value).__name__} {value!r:.60}")
    choices, lo, hi = meta.get("choices"), meta.get("min"), meta.get("max")
    if choices and value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    if lo is not None and (value < lo or (meta.get("open_lo") and value == lo)):
        bound = f"> {lo:g}" if meta.get("open_lo") else f">= {lo:g}"
        raise ConfigError(f"{name} must be {bound}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name} must be <= {hi:g}, got {value}")
    return value


def check_fields(obj: Any) -> None:
    """Validate (and normalise, e.g. int -> float) every field of a config dataclass."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, check_value(f.name, getattr(obj, f.name), hints[f.name], f.metadata))


def to_plain(obj: Any) -> dict[str, Any]:
    """A dataclass of plain values as a JSON-ready dict (tuples become lists)."""
    data = dataclasses.asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def from_plain(cls: type, data: dict[str, Any], what: str) -> Any:
    """`cls(**data)` with unknown keys rejected by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {what}s: {', '.join(map(str, unknown))[:200]}")
    try:
        return cls(**data)
    except TypeError as exc:  # a key given twice or a wrong signature
        raise ConfigError(str(exc)) from None
