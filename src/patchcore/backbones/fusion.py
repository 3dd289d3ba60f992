"""Inference-time simplification of a frozen backbone: batch norms folded into their convolutions,
and (CPU) convolution weights kept in oneDNN's blocked layout.

A frozen BatchNorm after a convolution is an affine map per channel, so it can be folded into
the convolution's weights and bias once; the forward pass then skips one full read and write of
every activation map per block. With 2 threads this took efficientnet_lite0's forward from 11.6
to 8.0 ms at batch 1 (benchmarks/latency.py on a quiet 16-core host). Written by hand because
the pairs must be found in any registered backbone (timm, torchvision, custom) without tracing
it into a graph, which would bypass the forward hooks that collect layer outputs: a dry forward
pass records which BatchNorm consumed exactly the tensor a Conv2d produced.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


class _PostNorm(nn.Module):
    """What remains of a norm+activation module (timm's BatchNormAct2d) once the norm is folded:
    its dropout and activation."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _conv_bn_pairs(model: nn.Module, example: torch.Tensor
                   ) -> tuple[list[tuple[str, str]], torch.Tensor | None]:
    """(conv name, batch-norm name) pairs where the norm's input is the conv's output tensor and
    nothing else reads that tensor (checked by the tensor's identity during one forward), and
    that forward's output (see `_run`)."""
    produced: dict[int, str] = {}
    readers: dict[int, list[str]] = {}
    alive: list[torch.Tensor] = []  # keeps each output alive so that no id is reused
    handles = []

    def conv_hook(name: str):
        def hook(_m, _inputs, output):
            alive.append(output)
            produced[id(output)] = name
            readers.setdefault(id(output), [])
        return hook

    def reader_hook(name: str):
        def hook(_m, inputs):
            for x in inputs:
                if isinstance(x, torch.Tensor) and id(x) in produced:
                    readers[id(x)].append(name)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook(name)))
        if name and not list(module.children()):
            handles.append(module.register_forward_pre_hook(reader_hook(name)))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(reader_hook(name)))
    try:
        output = _run(model, example)
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    pairs = []
    for key, conv in produced.items():
        names = readers.get(key, [])
        if len(names) == 1 and isinstance(modules[names[0]], nn.BatchNorm2d):
            pairs.append((conv, names[0]))
    return pairs, output


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    assert bn.running_mean is not None and bn.running_var is not None
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(
        bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        w = conv.weight.double() * scale.double().view(-1, 1, 1, 1)
        b = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale.double())
        b = (b - bn.running_mean.double()) * scale.double() + shift.double()
        conv.weight.copy_(w.to(conv.weight.dtype))
        conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=False)


def _run(model: nn.Module, example: torch.Tensor) -> torch.Tensor | None:
    """The model's first output tensor for `example` (None where the forward fails)."""
    try:
        with torch.inference_mode():
            out: Any = model(example)
    except Exception:  # noqa: BLE001 - a backbone that can't run whole is left unfolded
        return None
    while isinstance(out, (tuple, list, dict)) and out:
        out = next(iter(out.values())) if isinstance(out, dict) else out[0]
    return out if isinstance(out, torch.Tensor) else None


def _fold_pairs(model: nn.Module, pairs: list[tuple[str, str]]) -> tuple[nn.Module, int]:
    """A copy of `model` with the given (conv, norm) pairs folded where the norm is a plain
    BatchNorm2d or timm's BatchNormAct2d (other subclasses may do more than an affine map)."""
    folded_model = copy.deepcopy(model)
    modules = dict(folded_model.named_modules())
    folded = 0
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        known = type(bn) is nn.BatchNorm2d or type(bn).__name__ == "BatchNormAct2d"
        if (not known or bn.running_mean is None or bn.running_var is None
                or conv.out_channels != bn.num_features):
            continue
        _fold(conv, bn)
        replacement: nn.Module = (
            _PostNorm(getattr(bn, "drop", nn.Identity()), bn.act) if hasattr(bn, "act")
            else nn.Identity())
        parent_name, _, child = bn_name.rpartition(".")
        parent = modules[parent_name] if parent_name else folded_model
        setattr(parent, child, replacement)
        folded += 1
    return folded_model, folded


def _same(out: torch.Tensor | None, reference: torch.Tensor) -> bool:
    scale = float(reference.abs().max()) or 1.0
    return out is not None and out.shape == reference.shape and float(
        (out - reference).abs().max()) <= 1e-4 * scale


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int]:
    """A copy of `model` with every eval-mode BatchNorm2d that reads only a Conv2d's output
    folded into that conv, and the number of folded pairs.

    Each folded norm is replaced by what else it did (timm's norm+activation modules keep
    their activation and dropout). The copy's output on `example` must match the original's
    (relative error 1e-4): where folding all pairs at once does not (a conv output also read
    by a function rather than a module), pairs are kept one by one only when they pass. When
    nothing folds, `model` itself comes back.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode")
    pairs, reference = _conv_bn_pairs(model, example)
    if not pairs or reference is None:
        return model, 0
    folded_model, folded = _fold_pairs(model, pairs)
    if not _same(_run(folded_model, example), reference):
        kept: list[tuple[str, str]] = []
        for pair in pairs:
            trial, _ = _fold_pairs(model, [*kept, pair])
            if _same(_run(trial, example), reference):
                kept.append(pair)
        log.debug("batch-norm folding: %d of %d pairs keep the output", len(kept), len(pairs))
        folded_model, folded = _fold_pairs(model, kept) if kept else (model, 0)
    log.debug("folded %d batch norms into their convolutions", folded)
    return folded_model, folded


@functools.cache
def _pointwise_ops() -> tuple[Any, Any] | None:
    """oneDNN's convolution with a pre-packed weight and its weight reorder (the ops PyTorch's
    own compiler uses on CPU), or None where this build of torch lacks them."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return (torch.ops.mkldnn._convolution_pointwise,
                torch.ops.mkldnn._reorder_convolution_weight)
    except (AttributeError, RuntimeError):
        return None


class PackedConv2d(nn.Conv2d):
    """A frozen Conv2d that keeps its weight in oneDNN's blocked layout, per input shape (CPU).

    Hand-written because a plain CPU convolution reorders its weight into that layout on every
    call: at batch 1 this was 10-15% of wide_resnet50_2's forward to layer3 (68 -> 58 ms at
    224 x 224 on 2 cores, outputs bit-identical), 10% at 256 x 320, 5% at batch 8 and nothing
    at batch 32. The layout depends on the input's shape, so each shape (batches of at most
    MAX_BATCH, at most MAX_SHAPES of them: each costs one copy of the weight) is packed on its
    first call, where the packed result is also checked against the plain convolution; other
    shapes, gradients, tracing and export run the plain convolution. Still a Conv2d (the same
    parameters, state-dict keys and attributes).
    """

    MAX_BATCH = 8
    MAX_SHAPES = 2
    _packed: dict[tuple[int, ...], torch.Tensor | None]

    @classmethod
    def of(cls, conv: nn.Conv2d) -> PackedConv2d:
        """`conv` (its parameters shared, not copied) as a PackedConv2d."""
        packed = copy.copy(conv)
        packed.__class__ = cls
        packed._packed = {}
        return packed

    def __getstate__(self) -> dict[str, Any]:
        """Pickled and copied without the packed weights (oneDNN tensors have no storage to
        copy); they are packed again on first use."""
        state = self.__dict__.copy()
        state["_packed"] = {}
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._packable(x):
            return super().forward(x)
        ops = _pointwise_ops()
        key = tuple(x.shape)
        if ops is None or (key not in self._packed and len(self._packed) >= self.MAX_SHAPES):
            return super().forward(x)
        if key not in self._packed:
            return self._pack(x, key, ops)
        packed = self._packed[key]
        return super().forward(x) if packed is None else self._call(ops, x, packed)

    def _packable(self, x: torch.Tensor) -> bool:
        """Whether `x` may take the packed path: CPU float32, a small batch, no gradients,
        not being traced, exported or compiled."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or \
                torch.onnx.is_in_onnx_export():
            return False
        w = self.weight
        return (x.device.type == "cpu" and x.dtype == torch.float32 == w.dtype
                and x.dim() == 4 and x.shape[0] <= self.MAX_BATCH
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))

    def _call(self, ops: tuple[Any, Any], x: torch.Tensor, packed: torch.Tensor
              ) -> torch.Tensor:
        return ops[0](x, packed, self.bias, self.padding, self.stride, self.dilation,
                      self.groups, "none", [], "")

    def _pack(self, x: torch.Tensor, key: tuple[int, ...], ops: tuple[Any, Any]
              ) -> torch.Tensor:
        """This shape's packed weight, kept only where it gives the plain convolution's output
        (relative error 1e-5); that output is returned either way."""
        plain = super().forward(x)
        packed = None
        try:
            packed = ops[1](self.weight, self.padding, self.stride, self.dilation, self.groups,
                            list(key))
            out = self._call(ops, x, packed)
            scale = float(plain.abs().max()) or 1.0
            if out.shape != plain.shape or float((out - plain).abs().max()) > 1e-5 * scale:
                packed = None
        except RuntimeError:
            packed = None
        self._packed[key] = packed
        if packed is None:
            log.debug("convolution %s: packed weight differs for input %s; plain", self, key)
        return plain


def pack_convolutions(model: nn.Module) -> int:
    """Replace, in place, every plain CPU float32 Conv2d of `model` (zero padding given as
    numbers) by a PackedConv2d; the number replaced. Nothing where oneDNN's ops are missing."""
    if _pointwise_ops() is None:
        return 0
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Conv2d and m.padding_mode == "zeros"
               and not isinstance(m.padding, str) and m.weight.device.type == "cpu"
               and m.weight.dtype == torch.float32]
    for name, conv in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedConv2d.of(conv))
    return len(targets)
