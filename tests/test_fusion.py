"""Batch-norm folding and packed convolution weights: fewer operations, the same features."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from patchcore.backbones import fusion
from patchcore.backbones.fusion import PackedConv2d, _pointwise_ops, fold_batchnorm
from patchcore.engine.features import FeatureExtractor


def _trained_bn(bn: nn.BatchNorm2d, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(bn.num_features, generator=g))
        bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return bn


class Shared(nn.Module):
    """conv1's output feeds a norm and is also added back: folding it would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1 = _trained_bn(nn.BatchNorm2d(3), 1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn2 = _trained_bn(nn.BatchNorm2d(4), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        z = self.bn1(y) + y
        return self.bn2(self.conv2(z))


def test_folds_only_exclusive_pairs_and_keeps_the_output():
    model = Shared().eval()
    x = torch.rand(2, 3, 16, 16)
    before = model(x)
    folded, n = fold_batchnorm(model, torch.rand(1, 3, 16, 16))
    assert n == 1  # conv2 -> bn2 only: conv1's output is also read by the addition
    assert isinstance(folded.bn2, nn.Identity) and isinstance(folded.bn1, nn.BatchNorm2d)
    assert torch.allclose(folded(x), before, atol=1e-5, rtol=1e-5)
    assert isinstance(model.bn2, nn.BatchNorm2d)  # the original is untouched


def test_training_mode_is_refused():
    import pytest

    with pytest.raises(ValueError):
        fold_batchnorm(Shared().train(), torch.rand(1, 3, 8, 8))


def test_extractors_fold_and_give_the_same_features():
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    for name, layers in [("efficientnet_lite0", None), ("resnet18", ("layer2", "layer3"))]:
        kw = dict(pretrained=name.startswith("efficientnet"), imagesize=128,
                  aggregation="native")
        torch.manual_seed(0)
        ext = FeatureExtractor(name, layers, **kw)
        assert ext.folded_norms > 5
        assert not any(isinstance(m, nn.BatchNorm2d) for m in ext.backbone.modules())
        ref = _unfolded_features(name, layers, kw, x)
        got = ext(x)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def _unfolded_features(name, layers, kw, x):
    torch.manual_seed(0)
    plain = FeatureExtractor(name, layers, fold_norms=False, **kw)
    assert plain.folded_norms == 0
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.backbone.modules())
    return plain(x)


# --- convolution weights packed for oneDNN (CPU) -------------------------------------------


def _convs():
    """Plain convolutions of every kind a backbone uses."""
    g = torch.Generator().manual_seed(5)
    out = [nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False),
           nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
           nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2),
           nn.Conv2d(8, 6, (1, 3), padding=(0, 1), groups=2),
           nn.Conv2d(8, 8, 1)]
    for conv in out:
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    return out


@pytest.mark.skipif(_pointwise_ops() is None, reason="this torch build has no oneDNN ops")
@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_convolutions_give_the_plain_output(channels_last):
    g = torch.Generator().manual_seed(6)
    for conv in _convs():
        packed = PackedConv2d.of(conv).eval()
        for shape in [(1, conv.in_channels, 20, 20), (3, conv.in_channels, 17, 29)]:
            x = torch.randn(shape, generator=g)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                want = conv(x)
                first, again = packed(x), packed(x)  # packs and checks, then packed
            assert packed._packed[shape] is not None
            for got in (first, again):
                assert got.shape == want.shape
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.skipif(_pointwise_ops() is None, reason="this torch build has no oneDNN ops")
def test_packing_keeps_to_small_batches_and_few_shapes():
    conv = _convs()[4]
    packed = PackedConv2d.of(conv)
    with torch.inference_mode():
        packed(torch.rand(PackedConv2d.MAX_BATCH + 1, 8, 8, 8))
        assert not packed._packed  # a large batch gains nothing: plain
        for side in range(8, 8 + PackedConv2d.MAX_SHAPES + 2):
            x = torch.rand(1, 8, side, side)
            assert torch.allclose(packed(x), conv(x), rtol=1e-5, atol=1e-6)
    assert len(packed._packed) == PackedConv2d.MAX_SHAPES  # one weight copy per shape, capped
    x = torch.rand(1, 8, 8, 8, requires_grad=True)  # a packed shape, but with gradients
    packed(x).sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
    for copied in (pickle.loads(pickle.dumps(packed)), copy.deepcopy(packed)):
        assert not copied._packed  # oneDNN tensors are not copied; packed again on use
        assert len(packed._packed) == PackedConv2d.MAX_SHAPES  # the original keeps its own
        with torch.inference_mode():
            assert torch.equal(copied(x), packed(x))


@pytest.mark.skipif(_pointwise_ops() is None, reason="this torch build has no oneDNN ops")
def test_a_packed_result_that_differs_is_dropped(monkeypatch):
    conv = _convs()[0]
    packed = PackedConv2d.of(conv)
    x = torch.rand(1, 3, 16, 16)
    op, reorder = _pointwise_ops()
    monkeypatch.setattr(fusion, "_pointwise_ops", lambda: (lambda *a: op(*a) * 1.001, reorder))
    with torch.inference_mode():
        first, second = packed(x), packed(x)
        want = conv(x)
    assert packed._packed[(1, 3, 16, 16)] is None
    assert torch.equal(first, want) and torch.equal(second, want)


@pytest.mark.skipif(_pointwise_ops() is None, reason="this torch build has no oneDNN ops")
def test_packed_extractors_match_the_unpacked_one():
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(7))
    kw = dict(pretrained=False, imagesize=96, aggregation="native")
    torch.manual_seed(0)
    ext = FeatureExtractor("resnet18", ("layer2", "layer3"), **kw)
    assert ext.packed_convolutions >= 15
    torch.manual_seed(0)
    assert FeatureExtractor("resnet18", ("layer2", "layer3"), fold_norms=False,
                            **kw).packed_convolutions == 0
    with torch.inference_mode():
        got = ext(x)
    assert any(v is not None for m in ext.backbone.modules() if isinstance(m, PackedConv2d)
               for v in m._packed.values())
    ref = _unfolded_features("resnet18", ("layer2", "layer3"), kw, x)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
