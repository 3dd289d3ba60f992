"""Vision transformers from timm: ViT, DINO, DINOv2 (with register tokens), Swin; `timm:<name>`.

Token outputs (B x N x C, the first `num_prefix_tokens` being CLS / register tokens) become
B x C x H x W grids; Swin stages are already grids but channels-last (B x H x W x C). Models are
built with `dynamic_img_size=True`, so the pretrained position embeddings are interpolated to any
image size that is a multiple of the patch size while the state dict keeps its pretrained shapes.
"""

from __future__ import annotations

import logging
import math
from functools import cache, partial

import torch
from torch import nn

from ..errors import BackboneError
from . import weights as W
from .registry import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, register, register_prefix

log = logging.getLogger(__name__)

HALF = (0.5, 0.5, 0.5)
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                   "open_clip_pytorch_model.bin")


# --- grids ------------------------------------------------------------------------------------

def square_side(n: int, what: str) -> int:
    """The side of a square grid of `n` patches (images are square crops)."""
    side = math.isqrt(n)
    if side * side != n:
        raise BackboneError(f"{what}: {n} patch tokens do not form a square grid")
    return side


def tokens_to_grid(tokens: torch.Tensor, prefix: int, name: str) -> torch.Tensor:
    """B x N x C tokens (first `prefix` are CLS/register tokens) -> B x C x H x W, row-major."""
    if tokens.ndim != 3:
        raise BackboneError(f"{name}: expected B x N x C tokens, got shape {tuple(tokens.shape)}")
    patches = tokens[:, prefix:]
    side = square_side(patches.shape[1], name)
    b, _, c = patches.shape
    return patches.reshape(b, side, side, c).permute(0, 3, 1, 2)


def vit_grid(output: torch.Tensor, spec: BackboneSpec, prefix: int = 1) -> torch.Tensor:
    """`to_grid` for timm ViTs: drop the prefix tokens, fold the rest into a grid."""
    return tokens_to_grid(output, prefix, spec.name)


def nhwc_grid(output: torch.Tensor, spec: BackboneSpec) -> torch.Tensor:
    """`to_grid` for channels-last stages (timm Swin): B x H x W x C -> B x C x H x W."""
    if output.ndim != 4:
        raise BackboneError(f"{spec.name}: expected B x H x W x C, got {tuple(output.shape)}")
    return output.permute(0, 3, 1, 2)


def timm_grid(output: torch.Tensor, spec: BackboneSpec, prefix: int, nhwc: bool) -> torch.Tensor:
    """`to_grid` for any timm model: tokens (3-d), channels-last or channels-first maps (4-d)."""
    if output.ndim == 3:
        return tokens_to_grid(output, prefix, spec.name)
    if output.ndim == 4:
        return output.permute(0, 3, 1, 2) if nhwc else output
    raise BackboneError(f"{spec.name}: cannot turn an output of shape {tuple(output.shape)} "
                        "into a feature grid")


# --- weights: user file, Hugging Face cache, hub -----------------------------------------------

def hf_cached_file(repo_id: str, filenames: tuple[str, ...] = HF_WEIGHT_FILES) -> str | None:
    """A weights file of `repo_id` already in the Hugging Face cache (honours HF_HOME), offline."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in filenames:
        try:
            found = try_to_load_from_cache(repo_id, filename)
        except Exception:  # noqa: BLE001 - malformed cache entries count as absent
            found = None
        if isinstance(found, str):
            return found
    return None


def hf_cache_lookup(repo: str | None, looked: list[str]) -> str | None:
    """`hf_cached_file(repo)`, noting the search in `looked` when it finds nothing."""
    cached = hf_cached_file(repo) if repo else None
    if not cached and repo:
        looked.append(f"Hugging Face cache (HF_HOME) for {repo}")
    return cached


def _timm_hub_id(timm_name: str) -> str | None:
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def timm_load(spec: BackboneSpec, weights: str | None, timm_name: str,
              kwargs: tuple[tuple[str, object], ...] = ()) -> dict[str, torch.Tensor]:
    """Weights of a timm model: --weights / PATCHCORE_WEIGHTS_DIR, the HF cache, the hub."""

    def download() -> dict[str, torch.Tensor]:
        import timm

        return timm.create_model(timm_name, pretrained=True, **dict(kwargs)).state_dict()

    return W.resolve_state_dict(
        spec.name, weights,
        cached=lambda looked: hf_cache_lookup(_timm_hub_id(timm_name), looked),
        download=download, download_what="timm hub download",
        how=f"on a machine with internet run `python -c \"import timm; timm.create_model("
            f"'{timm_name}', pretrained=True)\"` and copy the Hugging Face cache (HF_HOME) here",
    )


def timm_available(spec: BackboneSpec, timm_name: str) -> bool:
    """Whether weights are on this machine, without touching the network."""
    if W.user_weights(spec.name, None, []) is not None:
        return True
    hub_id = _timm_hub_id(timm_name)
    return bool(hub_id and hf_cached_file(hub_id))


def timm_build(timm_name: str, **kwargs: object) -> nn.Module:
    """A timm model with random weights (weights come from `load_weights`)."""
    import timm

    return timm.create_model(timm_name, pretrained=False, **kwargs)


# --- fixed entries ----------------------------------------------------------------------------

def _vit(name: str, timm_name: str, patch: int, mean: tuple[float, float, float],
         description: str, layers: tuple[str, ...] = ("blocks.8", "blocks.11"),
         prefix: int = 1) -> BackboneSpec:
    kwargs = {"dynamic_img_size": True}
    return register(
        BackboneSpec(
            name=name,
            build=partial(timm_build, timm_name, **kwargs),
            default_layers=layers,
            load_weights=partial(timm_load, timm_name=timm_name),
            weights_available=partial(timm_available, timm_name=timm_name),
            source="timm",
            weights_hint=f"timm {timm_name} (HF cache or download)",
            mean=mean,
            std=HALF if mean == HALF else IMAGENET_STD,
            input_size=224,
            patch_multiple=patch,
            to_grid=partial(vit_grid, prefix=prefix),
            layer_aliases={"out": "norm"},
            description=description,
        )
    )


def _swin(name: str, timm_name: str, description: str) -> BackboneSpec:
    return register(
        BackboneSpec(
            name=name,
            build=partial(timm_build, timm_name, dynamic_img_size=True),
            default_layers=("layers.1", "layers.2"),
            load_weights=partial(timm_load, timm_name=timm_name),
            weights_available=partial(timm_available, timm_name=timm_name),
            source="timm",
            weights_hint=f"timm {timm_name} (HF cache or download)",
            input_size=224,
            patch_multiple=32,  # patch 4 x three 2x patch merges
            to_grid=nhwc_grid,
            layer_aliases={"out": "norm"},
            description=description,
        )
    )


_vit("vit_small_patch16_224", "vit_small_patch16_224", 16, HALF, "ViT-S/16 (ImageNet-21k, 1k)")
_vit("vit_base_patch16_224", "vit_base_patch16_224", 16, HALF, "ViT-B/16 (ImageNet-21k, 1k)")
_vit("dino_vitb16", "vit_base_patch16_224.dino", 16, IMAGENET_MEAN, "DINO ViT-B/16 (self-sup.)")
_vit("dinov2_vits14", "vit_small_patch14_dinov2.lvd142m", 14, IMAGENET_MEAN, "DINOv2 ViT-S/14")
_vit("dinov2_vitb14", "vit_base_patch14_dinov2.lvd142m", 14, IMAGENET_MEAN, "DINOv2 ViT-B/14")
_vit("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2.lvd142m", 14, IMAGENET_MEAN,
     "DINOv2 ViT-S/14 with 4 register tokens", prefix=5)
_vit("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2.lvd142m", 14, IMAGENET_MEAN,
     "DINOv2 ViT-B/14 with 4 register tokens", prefix=5)
_swin("swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224", "Swin-T (ImageNet-1k)")
_swin("swin_base_patch4_window7_224", "swin_base_patch4_window7_224", "Swin-B (ImageNet-22k, 1k)")


# --- generic timm:<name> ----------------------------------------------------------------------

def _build_flexible(timm_name: str, dynamic: bool) -> nn.Module:
    return timm_build(timm_name, dynamic_img_size=True) if dynamic else timm_build(timm_name)


def _inspect(timm_name: str) -> tuple[nn.Module, bool]:
    """Build on the meta device (no memory, no weights) to read the structure."""
    try:
        with torch.device("meta"):
            return timm_build(timm_name, dynamic_img_size=True), True
    except TypeError:  # CNNs do not take dynamic_img_size
        with torch.device("meta"):
            return timm_build(timm_name), False


@cache
def timm_spec(timm_name: str) -> BackboneSpec:
    """A registry entry for any timm model, with default layers from its `feature_info`."""
    try:
        import timm

        if not timm.is_model(timm_name.split(".")[0]):
            raise BackboneError(f"timm has no model {timm_name!r}; see timm.list_models()")
        model, dynamic = _inspect(timm_name)
    except BackboneError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported with the model name
        raise BackboneError(f"cannot build timm model {timm_name!r}: {exc}") from exc
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    nhwc = str(getattr(model, "output_fmt", "NCHW")) == "NHWC"
    info = list(getattr(model, "feature_info", []) or [])
    blocks = getattr(model, "blocks", None)
    if hasattr(model, "num_prefix_tokens") and isinstance(blocks, nn.Sequential):
        depth = len(blocks)
        late = (max(0, 3 * depth // 4 - 1), depth - 1)  # blocks 8 and 11 of a 12-block ViT
        layers = tuple(dict.fromkeys(f"blocks.{i}" for i in late))
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", (1, 1))
        multiple = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    else:
        by_red = {int(f["reduction"]): f["module"] for f in info}
        layers = tuple(by_red[r] for r in (8, 16) if r in by_red)
        if not layers and info:
            layers = tuple(f["module"] for f in info[-2:])
        multiple = max(by_red) if nhwc and by_red else 1
    if not layers:
        raise BackboneError(f"timm model {timm_name!r} has no feature_info; pass layers with -le")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    name = f"timm:{timm_name}"
    return BackboneSpec(
        name=name,
        build=partial(_build_flexible, timm_name, dynamic),
        default_layers=layers,
        load_weights=partial(timm_load, timm_name=timm_name),
        weights_available=partial(timm_available, timm_name=timm_name),
        source="timm",
        weights_hint=f"timm {timm_name} (HF cache or download)",
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        input_size=int(size),
        patch_multiple=multiple,
        to_grid=partial(timm_grid, prefix=prefix, nhwc=nhwc),
        layer_aliases={"out": "norm"} if hasattr(model, "norm") else {},
        description=f"any timm model ({timm_name})",
    )


register_prefix("timm", timm_spec)
