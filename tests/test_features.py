"""Patch aggregation: shapes, and equality with the literal reference pipeline.

Equality is checked on the production `FeatureExtractor.forward` (never a re-statement of it):
for toy backbones with chosen layer shapes, and for ResNet-18 (random weights) and
EfficientNet-Lite0 (real weights), whose layers are recomputed by an independent copy.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from reference_patchcore import reference_embeddings
from torch import nn

from patchcore.backbones.registry import BackboneSpec
from patchcore.engine.features import FeatureExtractor, build_projections
from patchcore.errors import BackboneError


class _ToyBackbone(nn.Module):
    """Feature maps of chosen channel counts and (non-square) sizes from a 3-channel image."""

    def __init__(self, channels: list[int], sizes: list[int]) -> None:
        super().__init__()
        self.grids = nn.ModuleList(
            nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.AdaptiveAvgPool2d((s, s + 1)))
            for c, s in zip(channels, sizes, strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([g(x).flatten(1) for g in self.grids], dim=1)


def _toy_spec(net: nn.Module) -> BackboneSpec:
    return BackboneSpec(name="toy", build=lambda: net, default_layers=("grids.0",),
                        load_weights=lambda spec, weights: {}, source="test", weights_hint="")


def _assert_close_to_reference(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal up to float32 rounding: max abs difference within `tol` of the largest value."""
    ours, ref = ours.double(), ref.double()
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item(), f"max abs error {err:.3g}"


@pytest.mark.parametrize(
    "channels,sizes,patchsize,stride,pre,target",
    [
        ([512, 1024], [14, 7], 3, 1, 1024, 1024),  # WideResNet-50 shape, paper defaults
        ([48, 120], [16, 8], 3, 1, 1024, 1024),  # EfficientNet-Lite2: upsampling pools
        ([64, 96, 40], [12, 6, 3], 5, 2, 300, 128),  # three layers, odd sizes, stride 2
        ([30], [9], 1, 1, 100, 77),  # one layer, no neighbourhood
    ],
)
def test_extractor_equals_reference_on_chosen_layer_shapes(
    channels, sizes, patchsize, stride, pre, target
):
    # The production forward pass (fused kernels, grouped convolutions, resizing of the deeper
    # layers) against the literal reference pipeline applied to the same layer outputs.
    torch.manual_seed(0)
    net = _ToyBackbone(channels, sizes)
    twin = copy.deepcopy(net).double().eval()
    layers = tuple(f"grids.{i}" for i in range(len(channels)))
    fe = FeatureExtractor(_toy_spec(net), layers, pretrained=False, imagesize=32,
                          pretrain_embed_dimension=pre, target_embed_dimension=target,
                          patchsize=patchsize, patchstride=stride)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        grids = [g(images.double()) for g in twin.grids]
    ref = reference_embeddings(grids, patchsize, stride, pre, target)
    _assert_close_to_reference(fe(images).reshape(-1, target), ref)


def _resnet18_layers(state: dict[str, torch.Tensor], images: torch.Tensor) -> list[torch.Tensor]:
    net = torchvision.models.resnet18()
    net.load_state_dict(state)
    net = net.double().eval()
    with torch.no_grad():
        x = net.maxpool(net.relu(net.bn1(net.conv1(images.double()))))
        layer2 = net.layer2(net.layer1(x))
        return [layer2, net.layer3(layer2)]


def _efficientnet_lite0_layers(
    state: dict[str, torch.Tensor], images: torch.Tensor
) -> list[torch.Tensor]:
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(state)
    net = net.double().eval()
    out = []
    with torch.no_grad():
        x = net.bn1(net.conv_stem(images.double()))
        for i in range(5):
            x = net.blocks[i](x)
            if i in (2, 4):
                out.append(x)
    return out


@pytest.mark.parametrize("backbone,pretrained,reference_layers", [
    ("resnet18", False, _resnet18_layers),
    ("efficientnet_lite0", True, _efficientnet_lite0_layers),
])
def test_extractor_forward_equals_reference_pipeline(backbone, pretrained, reference_layers):
    # The backbone is re-run layer by layer by an independent copy of the architecture (same
    # weights, float64), and the patch embeddings are built by the literal reference pipeline.
    torch.manual_seed(0)
    fe = FeatureExtractor(backbone, pretrained=pretrained, imagesize=64, fold_norms=False)
    images = torch.randn(2, 3, 64, 64)
    ours = fe(images)
    grids = reference_layers(fe.backbone.state_dict(), images)
    assert [g.shape[1] for g in grids] == fe.channels
    assert grids[0].shape[2:] != grids[1].shape[2:]  # the deeper layer really is resized
    ref = reference_embeddings(grids, 3, 1, 1024, 1024)
    assert ours.shape == (2, *grids[0].shape[2:], 1024)
    _assert_close_to_reference(ours.reshape(-1, 1024), ref)


def test_grouped_kernels_are_used_for_paper_shapes():
    projections = build_projections([512, 1024], 3, 1024, 1024)
    assert [p.groups for p in projections] == [512, 512]
    assert [(p.start, p.stop) for p in projections] == [(0, 512), (512, 1024)]


def test_extractor_shapes_and_early_stop():
    fe = FeatureExtractor("resnet18", ("layer2", "layer3"), pretrained=False, imagesize=64)
    called = []
    fe.backbone.layer4.register_forward_hook(lambda *a: called.append(1))
    out = fe(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 8, 8, 1024)
    assert fe.channels == [128, 256]
    assert not called, "the forward pass must stop after the last needed layer"


def test_unknown_layer_is_a_clear_error():
    with pytest.raises(BackboneError, match="no layer 'layer9'.*layer4"):
        FeatureExtractor("resnet18", ("layer9",), pretrained=False, imagesize=64)
