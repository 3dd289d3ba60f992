"""Pathology foundation models: H-optimus-0 (Bioptimus), a ViT-g/14 with 4 register tokens.

The architecture is timm's `vit_giant_patch14_reg4_dinov2` with the hub config's arguments, so it
is built without network access; the 1.1B-parameter weights come from a local file or folder
(--weights / PATCHCORE_WEIGHTS_DIR), the Hugging Face cache (HF_HOME) or the gated hub repo.
We build with `dynamic_img_size=True` (the hub config says False) so image sizes other than 224
work; the weights are identical either way. Use `backbone_dtype="bfloat16"` to halve memory.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch import nn

from . import weights as W
from .registry import BackboneSpec, register
from .transformers import hf_cache_lookup, hf_cached_file, timm_build, vit_grid

log = logging.getLogger(__name__)

H_OPTIMUS_REPO = "bioptimus/H-optimus-0"
H_OPTIMUS_ARCH = "vit_giant_patch14_reg4_dinov2"
H_OPTIMUS_ARGS = {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "global_pool": "token"}


def h_optimus_build() -> nn.Module:
    """H-optimus-0's architecture with random weights (about 4.5 GB in float32)."""
    return timm_build(H_OPTIMUS_ARCH, dynamic_img_size=True, **H_OPTIMUS_ARGS)


def h_optimus_load(spec: BackboneSpec, weights: str | None) -> dict[str, torch.Tensor]:
    """H-optimus-0 weights: user file/folder, the HF cache, or the (gated) hub when online."""

    def download() -> dict[str, torch.Tensor]:
        import timm

        return timm.create_model(f"hf-hub:{H_OPTIMUS_REPO}", pretrained=True).state_dict()

    return W.resolve_state_dict(
        spec.name, weights, cached=lambda looked: hf_cache_lookup(H_OPTIMUS_REPO, looked),
        download=download, download_what=f"hub download of {H_OPTIMUS_REPO}",
        how=f"accept the licence of https://huggingface.co/{H_OPTIMUS_REPO}, log in with "
            f"`huggingface-cli login`, then run `python -c \"import timm; timm.create_model("
            f"'hf-hub:{H_OPTIMUS_REPO}', pretrained=True)\"` to fill the HF cache",
    )


def h_optimus_available(spec: BackboneSpec) -> bool:
    """Whether weights are on this machine, without touching the network."""
    return W.user_weights(spec.name, None, []) is not None or bool(hf_cached_file(H_OPTIMUS_REPO))


register(
    BackboneSpec(
        name="h_optimus_0",
        build=h_optimus_build,
        default_layers=("out",),
        load_weights=h_optimus_load,
        weights_available=h_optimus_available,
        source="timm + Hugging Face hub (gated)",
        weights_hint=f"hf-hub:{H_OPTIMUS_REPO} (HF cache, local file, or login + download)",
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        input_size=224,
        patch_multiple=14,
        to_grid=partial(vit_grid, prefix=5),
        layer_aliases={"out": "norm"},
        description="H-optimus-0 pathology ViT-g/14 (1.1B params, 4 registers)",
    )
)
