"""Patch aggregation: shapes, and equality with the literal reference pipeline."""

from __future__ import annotations

import pytest
import torch
from reference_patchcore import reference_embeddings

from patchcore.engine.features import FeatureExtractor, build_projections
from patchcore.errors import BackboneError


def _fused(grids, patchsize, stride, pre, target):
    import torch.nn.functional as F

    projections = build_projections([g.shape[1] for g in grids], patchsize, pre, target)
    pad = (patchsize - 1) // 2
    h = (grids[0].shape[2] + 2 * pad - patchsize) // stride + 1
    w = (grids[0].shape[3] + 2 * pad - patchsize) // stride + 1
    out = torch.zeros(grids[0].shape[0], target, h, w, dtype=torch.float64)
    for g, p in zip(grids, projections, strict=True):
        y = F.conv2d(g.double(), p.weight.double(), stride=stride, padding=pad, groups=p.groups)
        if y.shape[-2:] != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        out[:, p.start : p.stop] += y
    return out.permute(0, 2, 3, 1).reshape(-1, target)


@pytest.mark.parametrize(
    "channels,sizes,patchsize,stride,pre,target",
    [
        ([512, 1024], [14, 7], 3, 1, 1024, 1024),  # WideResNet-50 shape, paper defaults
        ([48, 120], [16, 8], 3, 1, 1024, 1024),  # EfficientNet-Lite2: upsampling pools
        ([64, 96, 40], [12, 6, 3], 5, 2, 300, 128),  # three layers, odd sizes, stride 2
        ([30], [9], 1, 1, 100, 77),  # one layer, no neighbourhood
    ],
)
def test_fused_kernels_equal_reference(channels, sizes, patchsize, stride, pre, target):
    torch.manual_seed(0)
    grids = [torch.randn(2, c, s, s + 1, dtype=torch.float64)
             for c, s in zip(channels, sizes, strict=True)]
    ref = reference_embeddings(grids, patchsize, stride, pre, target)
    fused = _fused(grids, patchsize, stride, pre, target)
    assert fused.shape == ref.shape
    assert torch.allclose(fused, ref, atol=1e-9, rtol=1e-9)


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
    # equals the reference pipeline applied to the same layer outputs
    grids = fe._layer_grids(torch.randn(1, 3, 64, 64))
    ref = reference_embeddings(grids, 3, 1, 1024, 1024)
    assert ref.shape == (64, 1024)


def test_unknown_layer_is_a_clear_error():
    with pytest.raises(BackboneError, match="no layer 'layer9'.*layer4"):
        FeatureExtractor("resnet18", ("layer9",), pretrained=False, imagesize=64)
