"""Batch-norm folding: fewer operations, the same features."""

from __future__ import annotations

import torch
from torch import nn

from patchcore.backbones.fusion import fold_batchnorm
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
