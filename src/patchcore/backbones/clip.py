"""OpenAI CLIP image encoders through open_clip: ModifiedResNets and ViT-B/16 (visual tower only).

open_clip is imported inside the builders, so `import patchcore` works without it installed.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import torch
from torch import nn

from ..errors import BackboneError
from . import weights as W
from .registry import BackboneSpec, register
from .transformers import hf_cache_lookup, hf_cached_file, square_side

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:
        raise BackboneError("CLIP backbones need open_clip: pip install open_clip_torch") from exc
    return open_clip


def clip_build(arch: str) -> nn.Module:
    """The visual tower of open_clip model `arch`, random weights."""
    return _open_clip().create_model(arch, pretrained=None).visual


def _visual_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full CLIP state dict reduced to the visual tower (`visual.` prefix stripped)."""
    if any(k.startswith("visual.") for k in state):
        return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return state


def _hub_repo(arch: str) -> str | None:
    try:
        cfg = _open_clip().get_pretrained_cfg(arch, "openai")
    except Exception:  # noqa: BLE001 - an unknown tag means no hub copy
        return None
    repo = (cfg or {}).get("hf_hub", "")
    return repo.strip("/") or None


def clip_load(spec: BackboneSpec, weights: str | None, arch: str) -> dict[str, torch.Tensor]:
    """Visual-tower weights: local open_clip checkpoint, the HF cache, or a download."""
    state = W.resolve_state_dict(
        spec.name, weights,
        cached=lambda looked: hf_cache_lookup(_hub_repo(arch), looked),
        download=lambda: _open_clip().create_model(arch, pretrained="openai").visual.state_dict(),
        download_what="open_clip download",
        how=f"on a machine with internet run `python -c \"import open_clip; open_clip.create_model("
            f"'{arch}', pretrained='openai')\"` and copy the Hugging Face cache (HF_HOME) here",
    )
    return _visual_only(state)


def clip_available(spec: BackboneSpec, arch: str) -> bool:
    """Whether weights are on this machine, without touching the network."""
    if W.user_weights(spec.name, None, []) is not None:
        return True
    try:
        repo = _hub_repo(arch)
    except BackboneError:
        return False
    return bool(repo and hf_cached_file(repo))


def clip_vit_grid(output: torch.Tensor, spec: BackboneSpec) -> torch.Tensor:
    """open_clip resblock output -> B x C x H x W; accepts N x L x D and (older) L x N x D."""
    if output.ndim != 3:
        raise BackboneError(f"{spec.name}: expected 3-d tokens, got {tuple(output.shape)}")
    if math_square(output.shape[1] - 1):
        tokens = output  # batch first (open_clip >= 2.2x default)
    elif math_square(output.shape[0] - 1):
        tokens = output.permute(1, 0, 2)  # sequence first (LND)
    else:
        raise BackboneError(f"{spec.name}: token layout {tuple(output.shape)} not understood")
    patches = tokens[:, 1:]
    side = square_side(patches.shape[1], spec.name)
    return patches.reshape(tokens.shape[0], side, side, -1).permute(0, 3, 1, 2)


def math_square(n: int) -> bool:
    """True when n is a positive perfect square."""
    return n > 0 and math.isqrt(n) ** 2 == n


for _name, _arch, _size in (("clip_rn50", "RN50", 224), ("clip_rn50x4", "RN50x4", 288),
                            ("clip_rn50x16", "RN50x16", 384), ("clip_rn101", "RN101", 224)):
    register(
        BackboneSpec(
            name=_name,
            build=partial(clip_build, _arch),
            default_layers=("layer2", "layer3"),
            load_weights=partial(clip_load, arch=_arch),
            weights_available=partial(clip_available, arch=_arch),
            source="open_clip",
            weights_hint=f"open_clip {_arch} pretrained='openai' (HF cache or download)",
            mean=CLIP_MEAN,
            std=CLIP_STD,
            input_size=_size,
            channels_last=True,
            description=f"CLIP {_arch} image encoder (OpenAI)",
        )
    )

register(
    BackboneSpec(
        name="clip_vit_b16",
        build=partial(clip_build, "ViT-B-16"),
        default_layers=("transformer.resblocks.8", "transformer.resblocks.11"),
        load_weights=partial(clip_load, arch="ViT-B-16"),
        weights_available=partial(clip_available, arch="ViT-B-16"),
        source="open_clip",
        weights_hint="open_clip ViT-B-16 pretrained='openai' (HF cache or download)",
        mean=CLIP_MEAN,
        std=CLIP_STD,
        input_size=224,
        patch_multiple=16,
        to_grid=clip_vit_grid,
        description="CLIP ViT-B/16 image encoder (OpenAI); fixed 224 px position embedding",
    )
)
