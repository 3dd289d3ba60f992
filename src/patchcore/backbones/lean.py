"""Hand-written EfficientNet-Lite and ResNet-family backbones that mirror timm and torchvision.

Why by hand: start-up time. A cold `patchcore predict MODEL IMAGE` with an efficientnet_lite2
model took 4.0-4.2 s, of which importing timm cost 1.4 s (`python -X importtime`: timm.layers
imports torchvision's feature extraction, whose roi_align imports torch._dynamo, 0.9 s alone)
on top of 1.0 s for torch itself; building these backbones from the classes below imports
neither library, and the same command takes 2.7 s (2-core machine, 3 runs each).

Each class mirrors, module for module, timm's `tf_efficientnet_lite{0..4}` (timm 1.0:
models/efficientnet.py `_gen_efficientnet_lite`, models/_efficientnet_blocks.py,
layers/conv2d_same.py, layers/norm_act.py) or torchvision's ResNet (models/resnet.py), so that
their weights load unchanged: the same state-dict keys, shapes and buffers, the same module
names (hooks on "blocks.2" or "layer3" find the same tensors), the same forward pass and the
same weight initialisation drawn from the global RNG in the same order (a seeded build without
pretrained weights gives bit-identical random weights). tests/test_lean_backbones.py checks
all of this against timm and torchvision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# --- EfficientNet-Lite (timm tf_efficientnet_lite{N}) ------------------------------------------

# variant: (channel multiplier, depth multiplier), as in timm's tf_efficientnet_lite{N}.
LITE_MULTIPLIERS = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2), 3: (1.2, 1.4), 4: (1.4, 1.8)}
# Stages of timm's arch_def: (block kind, repeats, kernel, stride, expansion, out channels).
_LITE_STAGES = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)
_BN_EPS_TF = 1e-3


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's channel rounding: nearest multiple of `divisor`, never more than 10% below."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


def same_padding(size: int | torch.Tensor, kernel: int, stride: int, dilation: int = 1
                 ) -> int | torch.Tensor:
    """Total TensorFlow 'SAME' padding along one axis of length `size` (timm's
    get_same_padding; a tensor size, as tracing may give, stays a tensor)."""
    if isinstance(size, torch.Tensor):
        return torch.clamp(((size / stride).ceil() - 1) * stride + (kernel - 1) * dilation + 1
                           - size, min=0)
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from each input's size: the padding may
    be asymmetric (the extra row/column goes bottom/right), so it is applied with F.pad."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = False) -> None:
        super().__init__(in_chs, out_chs, kernel_size, stride, 0, 1, groups, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.size()[-2:]
        pad_h = same_padding(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = same_padding(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv_same(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1
              ) -> nn.Conv2d:
    """timm's create_conv2d(padding='same'), no bias: a plain Conv2d with symmetric padding
    where 'SAME' is static (stride 1, odd kernel), else a Conv2dSame."""
    if stride == 1 and (kernel_size - 1) % 2 == 0:
        return nn.Conv2d(in_chs, out_chs, kernel_size, stride, (kernel_size - 1) // 2,
                         groups=groups, bias=False)
    return Conv2dSame(in_chs, out_chs, kernel_size, stride, groups)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d followed by `drop` and `act` submodules (named
    so, like timm's, that batch-norm folding in fusion.py keeps them)."""

    def __init__(self, num_features: int, act: bool = True, eps: float = _BN_EPS_TF) -> None:
        super().__init__(num_features, eps=eps)
        self.drop = nn.Identity()
        self.act: nn.Module = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class DepthwiseSeparableConv(nn.Module):
    """timm's DepthwiseSeparableConv without squeeze-excite: dw conv, BN+ReLU6, pw conv, BN."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_dw = conv_same(in_chs, in_chs, kernel_size, stride, groups=in_chs)
        self.bn1 = BatchNormAct2d(in_chs)
        self.conv_pw = conv_same(in_chs, out_chs, 1)
        self.bn2 = BatchNormAct2d(out_chs, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return out + x if self.has_skip else out


class InvertedResidual(nn.Module):
    """timm's InvertedResidual (MBConv) without squeeze-excite: pw expansion, dw conv, pw
    projection; a residual where stride is 1 and the channel count is unchanged."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int,
                 expansion: float) -> None:
        super().__init__()
        mid_chs = make_divisible(in_chs * expansion)
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_pw = conv_same(in_chs, mid_chs, 1)
        self.bn1 = BatchNormAct2d(mid_chs)
        self.conv_dw = conv_same(mid_chs, mid_chs, kernel_size, stride, groups=mid_chs)
        self.bn2 = BatchNormAct2d(mid_chs)
        self.conv_pwl = conv_same(mid_chs, out_chs, 1)
        self.bn3 = BatchNormAct2d(out_chs, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        out = self.bn3(self.conv_pwl(out))
        return out + x if self.has_skip else out


class EfficientNetLite(nn.Module):
    """timm's EfficientNet as built for tf_efficientnet_lite{variant}: stem, seven stages in
    `blocks` (blocks.2 / blocks.4 end at stride 8 / 16), 1280-channel head, classifier."""

    def __init__(self, variant: int, num_classes: int = 1000) -> None:
        super().__init__()
        width, depth = LITE_MULTIPLIERS[variant]
        stem_chs, head_chs = 32, 1280  # fixed (not scaled) in every variant
        self.conv_stem = conv_same(3, stem_chs, 3, stride=2)
        self.bn1 = BatchNormAct2d(stem_chs)
        # timm's block builder probes its squeeze-excite class with a throwaway
        # SqueezeExcite(8): two 8x8 1x1 convs whose initialisation draws from the global RNG.
        # Drawing the same keeps a seeded random build bit-identical to timm's.
        for _ in range(2):
            nn.Conv2d(8, 8, 1)
        stages, in_chs = [], stem_chs
        for i, (kind, repeats, kernel, stride, expansion, chs) in enumerate(_LITE_STAGES):
            out_chs = make_divisible(chs * width)
            # timm scales the repeats of all stages but the first and the last (fix_first_last)
            n = repeats if i in (0, len(_LITE_STAGES) - 1) else math.ceil(repeats * depth)
            blocks: list[nn.Module] = []
            for j in range(n):
                s = stride if j == 0 else 1
                blocks.append(DepthwiseSeparableConv(in_chs, out_chs, kernel, s) if kind == "ds"
                              else InvertedResidual(in_chs, out_chs, kernel, s, expansion))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = conv_same(in_chs, head_chs, 1)
        self.bn2 = BatchNormAct2d(head_chs)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head_chs, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's _init_weight_goog, module by module in the same order."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.weight.size(0))
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the head's feature map (stride 32, 1280 channels)."""
        x = self.blocks(self.bn1(self.conv_stem(x)))
        return self.bn2(self.conv_head(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> ImageNet logits."""
        return self.classifier(self.global_pool(self.forward_features(x)).flatten(1))


def efficientnet_lite(variant: int) -> EfficientNetLite:
    """timm.create_model(f"tf_efficientnet_lite{variant}") without timm."""
    if variant not in LITE_MULTIPLIERS:
        raise ValueError(f"no EfficientNet-Lite{variant}; variants are 0 to 4")
    return EfficientNetLite(variant)


# --- ResNet family (torchvision.models.resnet) -------------------------------------------------

def _conv3x3(in_chs: int, out_chs: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 3, stride, 1, groups=groups, bias=False)


def _conv1x1(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 1, stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs and a residual."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64
                 ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3x3 conv): 1x1, grouped 3x3, 1x1, residual."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64
                 ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet (no dilation, zero_init_residual=False): stem, layer1..layer4
    (layer2 / layer3 end at stride 8 / 16), average pool, fc."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, ...],
                 groups: int = 1, width_per_group: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes, self.groups, self.base_width = 64, groups, width_per_group
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        downsample = None
        out_chs = planes * block.expansion
        if stride != 1 or self.inplanes != out_chs:
            # built before the first block, as torchvision does (the same RNG draws)
            downsample = nn.Sequential(_conv1x1(self.inplanes, out_chs, stride),
                                       nn.BatchNorm2d(out_chs))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = out_chs
        layers += [block(out_chs, planes, groups=self.groups, base_width=self.base_width)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> ImageNet logits."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# arch: (block, blocks per layer, groups, width per group), as torchvision builds them.
RESNETS: dict[str, tuple[type[BasicBlock | Bottleneck], tuple[int, ...], int, int]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1, 64),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": (Bottleneck, (3, 4, 23, 3), 1, 128),
    "resnext101_32x8d": (Bottleneck, (3, 4, 23, 3), 32, 8),
}


def resnet(arch: str) -> ResNet:
    """torchvision.models.get_model(arch, weights=None) without torchvision."""
    if arch not in RESNETS:
        raise ValueError(f"no lean ResNet {arch!r}; known: {', '.join(RESNETS)}")
    block, layers, groups, width = RESNETS[arch]
    return ResNet(block, layers, groups, width)
