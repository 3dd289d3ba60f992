"""Backbone layers -> locally aware patch embeddings (PatchCore section 3.1).

The reference pipeline (patchcore-inspection) unfolds each layer into p x p patches, resizes deeper
layers' patch grids bilinearly to the first layer's grid, averages each flattened patch down to
`pretrain_embed_dimension` (adaptive 1-d pooling), then averages the concatenated layers down to
`target_embed_dimension`. Every one of those steps is linear, and channel-mixing commutes with
spatial resizing, so the whole chain equals one (usually grouped) convolution per layer followed by
the resize. We build those convolution kernels once from the very same pooling operators and apply
them to the raw feature maps: identical embeddings up to float rounding, without the 9x memory of
unfolded patches and without resizing C*p*p channels. This is PatchCore-specific speed work, which
is why it is hand-written.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import BackboneSpec, get_backbone
from ..backbones.cnn import check_weights_loaded
from ..backbones.fusion import fold_batchnorm, pack_convolutions
from ..errors import BackboneError

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the hook of the last needed layer to end the backbone's forward pass early."""


def pooling_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """The n_out x n_in matrix of `adaptive_avg_pool1d` from n_in to n_out values."""
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)  # n_in x 1 x n_in
    return F.adaptive_avg_pool1d(eye, n_out).squeeze(1).T.contiguous()  # n_out x n_in


@dataclass
class LayerProjection:
    """The fused patchify + pooling kernel of one layer, writing output channels [start, stop)."""

    weight: torch.Tensor  # (stop - start) x (C / groups) x p x p, float64
    groups: int
    start: int
    stop: int


def _find_groups(block: torch.Tensor) -> int:
    """Largest group count for which `block` (T x C x p x p) is block-diagonal in channels."""
    rows, channels = block.shape[:2]
    mask = block.abs().sum(dim=(2, 3)) > 0  # T x C
    g = math.gcd(rows, channels)
    for groups in sorted((d for d in range(1, g + 1) if g % d == 0), reverse=True):
        r, c = rows // groups, channels // groups
        ok = True
        for i in range(groups):
            inside = mask[i * r : (i + 1) * r, i * c : (i + 1) * c].sum()
            if inside != mask[i * r : (i + 1) * r].sum():
                ok = False
                break
        if ok:
            return groups
    return 1


def native_projections(channels: list[int], patchsize: int) -> list[LayerProjection]:
    """Per-layer p x p mean of each channel, layers concatenated at their native width.

    The same "locally aware" neighbourhood average as the reference, without pooling each
    layer's flattened patch to a common size (which stretches thin layers and squeezes wide
    ones, reweighting them): a depthwise kernel per layer.
    """
    out, start = [], 0
    for c in channels:
        weight = torch.full((c, 1, patchsize, patchsize), 1.0 / patchsize**2, dtype=torch.float64)
        out.append(LayerProjection(weight, c, start, start + c))
        start += c
    return out


def build_projections(
    channels: list[int], patchsize: int, pretrain_dim: int, target_dim: int
) -> list[LayerProjection]:
    """Fused kernels reproducing unfold -> per-layer pooling -> cross-layer pooling."""
    agg = pooling_matrix(pretrain_dim * len(channels), target_dim)  # T x (L * D)
    out = []
    for layer, c in enumerate(channels):
        n_in = c * patchsize * patchsize
        pre = pooling_matrix(n_in, pretrain_dim)  # D x n_in
        full = agg[:, layer * pretrain_dim : (layer + 1) * pretrain_dim] @ pre  # T x n_in
        rows = torch.nonzero(full.abs().sum(dim=1) > 0).flatten()
        start, stop = int(rows.min()), int(rows.max()) + 1
        block = full[start:stop].reshape(stop - start, c, patchsize, patchsize)
        groups = _find_groups(block)
        r, cg = (stop - start) // groups, c // groups
        weight = torch.cat(
            [block[i * r : (i + 1) * r, i * cg : (i + 1) * cg] for i in range(groups)], dim=0
        )
        out.append(LayerProjection(weight, groups, start, stop))
    return out


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when available; `cuda` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackboneError("--device cuda was requested but no CUDA GPU is available")
    return torch.device(device)


class FeatureExtractor(nn.Module):
    """Images (B x 3 x H x W, normalised) -> patch embeddings (B x h x w x target_dim)."""

    def __init__(
        self,
        backbone: str | BackboneSpec,
        layers: tuple[str, ...] | None = None,
        *,
        pretrained: bool = True,
        weights: str | None = None,
        pretrain_embed_dimension: int = 1024,
        target_embed_dimension: int = 1024,
        patchsize: int = 3,
        patchstride: int = 1,
        imagesize: int = 224,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        aggregation: str = "reference",
        fold_norms: bool = True,
    ) -> None:
        super().__init__()
        self.spec = get_backbone(backbone) if isinstance(backbone, str) else backbone
        self.layers = tuple(layers) if layers else self.spec.default_layers
        self.patchsize = patchsize
        self.patchstride = patchstride
        self.target_dim = target_embed_dimension
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        # Backbone precision; embeddings are always returned as float32.
        self.dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))
        if imagesize % self.spec.patch_multiple:
            raise BackboneError(
                f"{self.spec.name}: imagesize {imagesize} must be a multiple of "
                f"{self.spec.patch_multiple} (the patch size)"
            )
        model = self.spec.build()
        if pretrained:
            check_weights_loaded(model, self.spec.load_weights(self.spec, weights), self.spec.name)
        model.eval().requires_grad_(False)
        # Frozen batch norms folded into their convolutions: the same features, a faster pass.
        self.folded_norms = 0
        if fold_norms:
            example = torch.rand(1, 3, min(imagesize, 96), min(imagesize, 96),
                                 generator=torch.Generator().manual_seed(0))
            model, self.folded_norms = fold_batchnorm(model, example)
        # CNNs run faster with NHWC activations on CPU (oneDNN) and on GPU (tensor cores).
        self.channels_last = self.spec.channels_last
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        # On CPU, convolution weights kept in oneDNN's layout per input shape (batch <= 8);
        # like folding, only for the simplified backbone (fold_norms=False: the one as built).
        self.packed_convolutions = (pack_convolutions(model) if fold_norms
                                    and self.device.type == "cpu" else 0)
        self.backbone = model
        self._outputs: dict[str, torch.Tensor] = {}
        self._hooks = []
        self._modules_by_layer = {}
        for layer in self.layers:
            module_name = self.spec.layer_aliases.get(layer, layer)
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                children = ", ".join(n for n, _ in model.named_children())
                raise BackboneError(
                    f"backbone {self.spec.name!r} has no layer {layer!r}; its top-level modules "
                    f"are: {children} (nested names use dots, e.g. layer2 or blocks.4)"
                ) from None
            self._modules_by_layer[layer] = module
        self._last_layer = None
        self._register_hooks()
        self.to(self.device)
        self.backbone.to(self.dtype)
        # One dry pass finds the execution order (to stop after the last layer) and the shapes.
        with torch.inference_mode():
            grids = self._layer_grids(torch.zeros(1, 3, imagesize, imagesize, device=self.device))
        self.channels = [g.shape[1] for g in grids]
        self.grid_sizes = [tuple(g.shape[2:]) for g in grids]
        if aggregation == "native":
            projections = native_projections(self.channels, patchsize)
            self.target_dim = sum(self.channels)
        elif aggregation == "reference":
            projections = build_projections(
                self.channels, patchsize, pretrain_embed_dimension, target_embed_dimension
            )
        else:
            raise BackboneError(f"unknown aggregation {aggregation!r}: reference or native")
        self._proj = projections
        for i, p in enumerate(projections):
            weight = p.weight.float().to(self.device)
            self.register_buffer(f"proj_weight_{i}", weight, persistent=False)
        self.feature_grid = self._out_size(self.grid_sizes[0])

    def _register_hooks(self) -> None:
        order: list[str] = []

        def make_hook(layer: str):
            def hook(_module, _inputs, output):
                if isinstance(output, (tuple, list)):
                    output = output[0]
                self._outputs[layer] = output
                if self._last_layer is None:
                    if layer not in order:
                        order.append(layer)
                    if len(order) == len(self._modules_by_layer):
                        raise _StopForward  # dry pass: skip the rest (heads, attention pools)
                elif layer == self._last_layer:
                    raise _StopForward

            return hook

        for layer, module in self._modules_by_layer.items():
            self._hooks.append(module.register_forward_hook(make_hook(layer)))
        self._order = order

    def _run_backbone(self, images: torch.Tensor) -> None:
        self._outputs = {}
        try:
            self.backbone(images)
        except _StopForward:
            pass
        if self._last_layer is None:
            self._last_layer = self._order[-1] if self._order else None
        missing = [layer for layer in self.layers if layer not in self._outputs]
        if missing:
            raise BackboneError(f"{self.spec.name}: layers {missing} produced no output")

    def _layer_grids(self, images: torch.Tensor) -> list[torch.Tensor]:
        images = images.to(self.dtype)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self._run_backbone(images)
        grids = [self.spec.to_grid(self._outputs[layer], self.spec) for layer in self.layers]
        self._outputs = {}
        return [g.float() for g in grids]

    def _out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        pad = (self.patchsize - 1) // 2
        return tuple((s + 2 * pad - self.patchsize) // self.patchstride + 1 for s in size)

    @property
    def feature_dim(self) -> int:
        """Length of one patch embedding."""
        return self.target_dim

    def _full_precision(self) -> contextlib.AbstractContextManager:
        """On CUDA, convolutions in full fp32 (cuDNN would use TF32 by default, which changed
        image AUROC by up to 0.04 against the CPU on a 40-image magnetic_tile test set)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        cudnn = torch.backends.cudnn
        return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                           deterministic=cudnn.deterministic, allow_tf32=False)

    @torch.inference_mode()
    def backbone_grids(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's output grids (B x C x h x w, float32) at each layer, for normalised
        images."""
        with self._full_precision():
            return self._layer_grids(images.to(self.device, non_blocking=True))

    @torch.inference_mode()
    def project(self, grids: list[torch.Tensor]) -> torch.Tensor:
        """Layer grids -> patch embeddings, B x h x w x target_embed_dimension, float32."""
        h, w = self.feature_grid
        # Built channels-last (B x h x w x D), the layout the backbone's grids already have on
        # CPU: adding an NHWC grid into an NCHW slice cost 2.7 of wide_resnet50_2's 4.1 ms here.
        out = torch.zeros(grids[0].shape[0], h, w, self.target_dim, device=self.device)
        pad = (self.patchsize - 1) // 2
        for i, (grid, proj) in enumerate(zip(grids, self._proj, strict=True)):
            with self._full_precision():
                y = F.conv2d(
                    grid, getattr(self, f"proj_weight_{i}"), stride=self.patchstride,
                    padding=pad, groups=proj.groups,
                )
            if y.shape[-2:] != (h, w):
                y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
            out[..., proj.start : proj.stop] += y.permute(0, 2, 3, 1)
        return out

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings, B x h x w x target_embed_dimension, float32."""
        return self.project(self.backbone_grids(images))
