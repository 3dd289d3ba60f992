"""Backbone zoo: grids per family, localisation, ensembles, errors (offline, random weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import patchcore
from patchcore import BackboneError, ConfigError, PatchCore, PatchCoreConfig, WeightsNotFoundError
from patchcore.backbones import get_backbone
from patchcore.data.synthetic import make_synthetic_dataset, make_texture
from patchcore.engine.features import FeatureExtractor
from patchcore.engine.pipeline import make_extractor, member_features, parse_members

SMALL = {"pretrained": False, "target_embed_dimension": 64, "pretrain_embed_dimension": 64}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may download anything; caches point at empty folders."""
    monkeypatch.setenv("PATCHCORE_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.delenv("PATCHCORE_WEIGHTS_DIR", raising=False)
    torch.set_num_threads(2)


@pytest.mark.parametrize(
    ("name", "size", "grids"),
    [
        ("resnet18", 64, [(8, 8), (4, 4)]),
        ("densenet201", 64, [(8, 8), (4, 4)]),
        ("timm:vit_tiny_patch16_224", 64, [(4, 4), (4, 4)]),
        ("swin_tiny_patch4_window7_224", 64, [(8, 8), (4, 4)]),
        ("clip_rn50", 64, [(8, 8), (4, 4)]),
        ("dinov2_vits14_reg", 56, [(4, 4), (4, 4)]),
    ],
)
def test_feature_grid_shapes(name: str, size: int, grids: list[tuple[int, int]]) -> None:
    fe = FeatureExtractor(name, imagesize=size, **SMALL)
    assert fe.grid_sizes == grids
    out = fe(torch.randn(2, 3, size, size))
    assert out.shape == (2, *grids[0], 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_out_alias_and_timm_prefix() -> None:
    fe = FeatureExtractor("timm:vit_tiny_patch16_224", ("out",), imagesize=48, **SMALL)
    assert fe.grid_sizes == [(3, 3)]  # position embeddings interpolated from 224 to 48 px
    spec = get_backbone("timm:resnet18")
    assert spec.default_layers == ("layer2", "layer3") and spec.patch_multiple == 1
    vit = get_backbone("timm:vit_tiny_patch16_224")
    assert vit.default_layers == ("blocks.8", "blocks.11") and vit.patch_multiple == 16
    assert get_backbone("dinov2_vits14").patch_multiple == 14


def test_channels_last_is_a_spec_field() -> None:
    from dataclasses import replace

    for name in ("resnet18", "densenet201", "efficientnet_lite0", "clip_rn50"):
        assert get_backbone(name).channels_last, name
    for name in ("vit_small_patch16_224", "swin_tiny_patch4_window7_224", "clip_vit_b16",
                 "h_optimus_0", "timm:resnet18"):
        assert not get_backbone(name).channels_last, name
    torch.manual_seed(0)  # the same random weights for both builds
    fe = FeatureExtractor("resnet18", imagesize=32, **SMALL)
    assert fe.channels_last
    assert fe.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    plain = FeatureExtractor(replace(get_backbone("resnet18"), channels_last=False),
                             imagesize=32, **SMALL)
    assert not plain.channels_last and plain.backbone.conv1.weight.is_contiguous()
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(fe(x), plain(x), atol=1e-4)


def test_bfloat16_backbone_returns_float32() -> None:
    fe = FeatureExtractor("resnet18", imagesize=64, dtype="bfloat16", **SMALL)
    assert next(fe.backbone.parameters()).dtype == torch.bfloat16
    assert fe(torch.randn(1, 3, 64, 64)).dtype == torch.float32
    with pytest.raises(ConfigError, match="backbone_dtype"):
        PatchCoreConfig(backbone_dtype="float64")


# --- localisation: catches token-to-grid transposition and stride mistakes -------------------

DEFECT = (slice(12, 36), slice(84, 108))  # rows, cols at 128 px: off the diagonal


@pytest.fixture(scope="module")
def textures(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray]:
    """Six normal textures on disk and one of them with a bright square pasted in."""
    root = tmp_path_factory.mktemp("textures")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        img = make_texture(rng, 128, "carpet")
        paths.append(root / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    test = np.asarray(Image.open(paths[0])).copy()
    test[DEFECT] = (255, 255, 0)
    return paths, test


@pytest.mark.parametrize(
    "name", ["resnet18", "timm:vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"]
)
def test_localisation(name: str, textures: tuple[list[Path], np.ndarray]) -> None:
    paths, test = textures
    model = PatchCore(backbone=name, imagesize=128, resize=128, sampler="identity",
                      calibration_holdout=0.0, blur_sigma=1.0, device="cpu", **SMALL)
    model.progress = False
    model.fit(paths)
    amap = model.predict(test).maps[0]
    assert amap.shape == (128, 128)
    row, col = np.unravel_index(np.argmax(amap), amap.shape)
    # A transposed grid would put the peak near rows 84-108, cols 12-36.
    margin = 8
    assert DEFECT[0].start - margin <= row < DEFECT[0].stop + margin, (row, col)
    assert DEFECT[1].start - margin <= col < DEFECT[1].stop + margin, (row, col)
    normal = model.predict(np.asarray(Image.open(paths[1]))).maps[0]
    assert amap.max() > normal.max()


# --- fit / predict / ensembles ---------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated MVTec-style category."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("data"), n_train=6, n_test_good=2,
                                  n_test_defect=3, size=64)
    return root / "carpet"


def test_vit_fit_predict(dataset: Path) -> None:
    split = patchcore.load_dataset(dataset)
    model = PatchCore(backbone="timm:vit_tiny_patch16_224", imagesize=64, resize=64,
                      device="cpu", **SMALL)
    model.progress = False
    model.fit(split)
    pred = model.score(split.test, masks=True)
    assert pred.maps.shape == (len(split.test), 64, 64)
    assert model.feature_grid_ == (4, 4)
    result = patchcore.metrics.evaluate(pred.true_labels, pred.scores, pred.masks, pred.maps)
    assert 0.0 <= result["image_auroc"] <= 1.0 and np.isfinite(result["pro"])


def test_ensemble_save_load_round_trip(dataset: Path, tmp_path: Path) -> None:
    split = patchcore.load_dataset(dataset)
    model = PatchCore(backbone=("resnet18", "timm:vit_tiny_patch16_224"),
                      layers=("0.layer2", "0.layer3", "1.blocks.8"), imagesize=64, resize=64,
                      device="cpu", **SMALL)
    model.progress = False
    model.fit(split)
    assert [m.layers for m in model.members_] == [("layer2", "layer3"), ("blocks.8",)]
    assert all(m.bank.norm[1] > 0 for m in model.members_)
    before = model.score(split.test)
    loaded = PatchCore.load(model.save(tmp_path / "model"))
    loaded.progress = False
    after = loaded.score(split.test)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.maps, after.maps)
    assert [m.backbone for m in loaded.members_] == ["resnet18", "timm:vit_tiny_patch16_224"]


def test_ensemble_members_get_their_own_normalisation() -> None:
    """Raw [0, 1] images reach each member normalised with that backbone's own mean / std."""
    config = PatchCoreConfig(backbone=("resnet18", "timm:vit_tiny_patch16_224"),
                             pretrained=False, imagesize=64, resize=64)
    members = parse_members(config.backbone, config.layers)
    raw = torch.rand(1, 3, 64, 64)
    own = [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5,) * 3, (0.5,) * 3)]
    for member, (mean, std) in zip(members, own, strict=True):
        make_extractor(member, config, torch.device("cpu"))
        m, s = (torch.tensor(v).view(1, 3, 1, 1) for v in (mean, std))
        expected = member.extractor((raw - m) / s).numpy()
        np.testing.assert_allclose(member_features(member, raw), expected, rtol=1e-5, atol=1e-5)
        wrong = member.extractor(raw).numpy()  # un-normalised input gives other features
        assert np.abs(wrong - expected).max() > 1e-2


# --- errors and listing ----------------------------------------------------------------------

def test_unknown_backbone() -> None:
    with pytest.raises(BackboneError, match="unknown backbone 'resnet19'.*resnet18"):
        get_backbone("resnet19")
    with pytest.raises(BackboneError, match="timm has no model"):
        get_backbone("timm:no_such_model_xyz")


def test_unknown_layer() -> None:
    with pytest.raises(BackboneError, match="no layer 'layer9'.*layer2"):
        FeatureExtractor("resnet18", ("layer9",), imagesize=64, **SMALL)


def test_missing_weights_offline() -> None:
    spec = get_backbone("wide_resnet50_2")
    assert not spec.weights_available(spec)
    with pytest.raises(WeightsNotFoundError, match="wide_resnet50_2.*Fix:.*--weights"):
        spec.load_weights(spec, None)


@pytest.mark.parametrize("name", ["dino_vitb16", "clip_rn50", "h_optimus_0"])
def test_missing_weights_offline_hub_models(name: str) -> None:
    spec = get_backbone(name)
    assert not spec.weights_available(spec)
    with pytest.raises(WeightsNotFoundError, match=f"{name}.*Fix:"):
        spec.load_weights(spec, None)


def test_h_optimus_entry() -> None:
    spec = get_backbone("h_optimus_0")
    assert spec.default_layers == ("out",) and spec.layer_aliases["out"] == "norm"
    assert spec.mean == (0.707223, 0.578729, 0.703617)
    assert spec.std == (0.211883, 0.230117, 0.177517)
    assert spec.input_size == 224 and spec.patch_multiple == 14


def test_weights_from_local_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    source = FeatureExtractor("timm:vit_tiny_patch16_224", imagesize=32, **SMALL).backbone
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(source.state_dict(), folder / "timm:vit_tiny_patch16_224.pth")
    monkeypatch.setenv("PATCHCORE_WEIGHTS_DIR", str(folder))
    spec = get_backbone("timm:vit_tiny_patch16_224")
    assert spec.weights_available(spec)
    fe = FeatureExtractor(spec, imagesize=32, target_embed_dimension=64,
                          pretrain_embed_dimension=64)
    torch.testing.assert_close(fe.backbone.pos_embed, source.pos_embed)


def test_list_backbones_offline() -> None:
    rows = {r["name"]: r for r in patchcore.list_backbones()}
    for name in ("resnet18", "wide_resnet50_2", "densenet201", "efficientnet_lite0",
                 "vit_base_patch16_224", "vit_small_patch16_224", "dino_vitb16", "dinov2_vits14",
                 "dinov2_vitb14", "swin_tiny_patch4_window7_224", "swin_base_patch4_window7_224",
                 "clip_rn50", "clip_rn50x4", "clip_rn50x16", "clip_rn101", "clip_vit_b16",
                 "h_optimus_0"):
        assert name in rows, name
        assert isinstance(rows[name]["weights_available"], bool)
    assert rows["clip_rn50x4"]["input_size"] == 288
    assert rows["wide_resnet50_2"]["weights_available"] is False
