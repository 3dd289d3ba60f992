"""`patchcore export` + the torch-free Inferencer: the same scores and maps as the torch model
(CNN with real weights, ViT, ensemble; ONNX and OpenVINO), exact blocked search, clear errors
for foreign or corrupted export folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from scipy import ndimage

from patchcore import PatchCore, load_dataset
from patchcore.cli import app
from patchcore.data.resample import gaussian_blur, resize_bilinear, sample_bilinear
from patchcore.errors import ModelFileError, PatchCoreError
from patchcore.export import export_model
from patchcore.inference import Inferencer, is_export_folder, read_manifest
from patchcore.inference.search import Bank, knn

TOL = 1e-4


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(b).max(), 1e-12))


def assert_same_prediction(torch_pred, light_pred) -> None:
    assert rel(light_pred.scores, torch_pred.scores) <= TOL
    assert rel(light_pred.maps, torch_pred.maps) <= TOL
    assert rel(light_pred.patch_scores, torch_pred.patch_scores) <= TOL
    np.testing.assert_array_equal(light_pred.labels, torch_pred.labels)
    np.testing.assert_allclose(light_pred.calibrated, torch_pred.calibrated, atol=TOL)
    assert light_pred.sizes == torch_pred.sizes
    np.testing.assert_array_equal(light_pred.view_image, torch_pred.view_image)
    for i in range(len(torch_pred)):
        assert rel(light_pred.original_map(i), torch_pred.original_map(i)) <= TOL


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    """Generated carpet category with scratches and spots, 64 px."""
    from patchcore.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path_factory.mktemp("exp"), categories=("carpet",),
                                  n_train=6, n_test_good=2, n_test_defect=3, size=64, seed=3)
    return load_dataset(root / "carpet")


@pytest.fixture(scope="module")
def cnn_export(fitted, tmp_path_factory) -> Path:
    """The shared fitted EfficientNet-Lite0 model (real weights, 128 px) exported to ONNX."""
    return export_model(fitted, tmp_path_factory.mktemp("cnn") / "export")


def test_cnn_export_reproduces_predict(fitted, split, cnn_export):
    files = [s.path for s in split.test]
    expected = fitted.predict(files)
    got = Inferencer(cnn_export).predict(files)
    assert_same_prediction(expected, got)
    # The detector still works: defects score above the normal test images.
    labels = np.array([s.label for s in split.test])
    assert got.scores[labels == 1].mean() > got.scores[labels == 0].mean()
    # Inputs other than paths (arrays, PIL, bytes) give the same scores.
    from PIL import Image

    img = Image.open(files[-1]).convert("RGB")
    more = Inferencer(cnn_export).predict([np.asarray(img), img, Path(files[-1]).read_bytes()])
    assert rel(more.scores, np.repeat(got.scores[-1:], 3)) <= TOL


def test_openvino_runs_the_same_export_and_its_own_format(fitted, split, cnn_export, tmp_path):
    files = [s.path for s in split.test[:3]]
    expected = fitted.predict(files)
    assert_same_prediction(expected, Inferencer(cnn_export, runtime="openvino").predict(files))
    ov_folder = export_model(fitted, tmp_path / "ov", format="openvino")
    assert read_manifest(ov_folder).members[0].graph.endswith(".xml")
    inf = Inferencer(ov_folder)
    assert inf.runtime == "openvino"
    assert_same_prediction(expected, inf.predict(files))


def test_vit_export_reproduces_predict(small_split):
    model = PatchCore(backbone="timm:vit_tiny_patch16_224", pretrained=False, imagesize=64,
                      resize=64, target_embed_dimension=64, pretrain_embed_dimension=64,
                      device="cpu", progress=False, reweight=True, anomaly_scorer_num_nn=3)
    model.fit(small_split)
    folder = export_model(model, Path(small_split.train[0].path).parents[3] / "vit_export")
    files = [s.path for s in small_split.test]
    assert_same_prediction(model.predict(files), Inferencer(folder).predict(files))


def test_ensemble_exports_every_member(small_split, tmp_path):
    model = PatchCore(backbone=("efficientnet_lite0", "resnet18"),
                      layers=("0.blocks.2", "0.blocks.4", "1.layer3"), imagesize=64, resize=64,
                      pretrained=False, target_embed_dimension=48, pretrain_embed_dimension=48,
                      device="cpu", progress=False, preprocess="aspect", blur_sigma=2.0)
    model.fit(small_split)
    folder = export_model(model, tmp_path / "ens")
    manifest = read_manifest(folder)
    assert [m.backbone for m in manifest.members] == ["efficientnet_lite0", "resnet18"]
    assert all(m.norm is not None for m in manifest.members)
    assert manifest.members[0].grid != manifest.members[1].grid  # the resize path is used
    files = [s.path for s in small_split.test]
    assert_same_prediction(model.predict(files), Inferencer(folder).predict(files))


# -- blocked exact search ------------------------------------------------------------------------

@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("k", [1, 4])
def test_blocked_search_is_exact_within_a_tiny_budget(distance, k):
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(3000, 24)).astype(np.float32)
    queries = rng.normal(size=(500, 24)).astype(np.float32)
    # A budget of 0.01 MB forces many query and bank blocks.
    dist, idx = knn(queries, Bank(bank, distance), k, budget_mb=0.01)
    if distance == "cosine":
        qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
        full = 1.0 - qn.astype(np.float64) @ bn.T.astype(np.float64)
    else:
        full = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1))
    order = np.argsort(full, axis=1)[:, :k]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_allclose(dist, np.take_along_axis(full, order, axis=1), rtol=1e-5,
                               atol=1e-6)


def test_float16_bank_is_searched_as_float32():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(700, 16)).astype(np.float16)
    q = rng.normal(size=(50, 16)).astype(np.float32)
    dist, idx = knn(q, Bank(bank), 1, budget_mb=0.005)
    full = np.linalg.norm(q[:, None, :] - bank.astype(np.float32)[None], axis=2)
    np.testing.assert_array_equal(idx[:, 0], full.argmin(axis=1))
    np.testing.assert_allclose(dist[:, 0], full.min(axis=1), rtol=1e-5)


# -- numpy map geometry = torch / scipy -------------------------------------------------------

@pytest.mark.parametrize("shape,size", [((3, 16, 16), (128, 128)), ((2, 9, 13), (40, 7)),
                                        ((1, 5, 5), (5, 5))])
def test_resize_matches_torch_interpolate(shape, size):
    x = np.random.default_rng(2).random(shape, dtype=np.float32)
    ref = F.interpolate(torch.from_numpy(x)[:, None], size=size, mode="bilinear",
                        align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(resize_bilinear(x, size), ref, atol=1e-6)


@pytest.mark.parametrize("sigma,shape", [(4.0, (2, 64, 64)), (1.5, (1, 10, 13)),
                                         (9.0, (1, 12, 12))])
def test_blur_matches_scipy_gaussian_filter(sigma, shape):
    x = np.random.default_rng(3).random(shape, dtype=np.float32)
    ref = ndimage.gaussian_filter(x, sigma, axes=(1, 2))
    np.testing.assert_allclose(gaussian_blur(x, sigma), ref, atol=1e-6)


def test_sampling_matches_torch_grid_sample_with_border_padding():
    x = np.random.default_rng(4).random((12, 17), dtype=np.float32)
    xs, ys = np.linspace(-1.3, 1.2, 23), np.linspace(-1.0, 1.1, 9)
    grid = torch.from_numpy(np.stack(np.meshgrid(xs, ys), axis=-1)).float()[None]
    ref = F.grid_sample(torch.from_numpy(x)[None, None], grid, mode="bilinear",
                        padding_mode="border", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(sample_bilinear(x, xs, ys), ref, atol=1e-6)


# -- foreign, corrupted and refused folders ---------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_foreign_and_corrupted_exports_give_one_line_errors(cnn_export, tmp_path):
    with pytest.raises(ModelFileError, match="no export.json"):
        Inferencer(tmp_path)
    with pytest.raises(ModelFileError, match="not a folder"):
        Inferencer(tmp_path / "missing")
    bad = _copy(cnn_export, tmp_path / "bank")
    data = bytearray((bad / "bank_0.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (bad / "bank_0.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="SHA-256"):
        Inferencer(bad)
    cut = _copy(cnn_export, tmp_path / "cut")
    (cut / "member_0.onnx").write_bytes((cut / "member_0.onnx").read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="truncated"):
        Inferencer(cut)
    with pytest.raises(ModelFileError, match="cannot load"):
        Inferencer(cut, verify=False)  # an unreadable graph, found by the runtime
    for change, message in [({"format": "other"}, "not a patchcore export"),
                            ({"format_version": 99}, "newer"),
                            ({"graph_format": "tflite"}, "graph_format"),
                            ({"members": []}, "members"),
                            ({"config": {"imagesize": -3}}, "imagesize")]:
        folder = _copy(cnn_export, tmp_path / f"m{len(list(tmp_path.iterdir()))}")
        doc = json.loads((folder / "export.json").read_text())
        doc.update(change)
        (folder / "export.json").write_text(json.dumps(doc))
        with pytest.raises(ModelFileError, match=message) as info:
            Inferencer(folder)
        assert "\n" not in str(info.value)
    folder = _copy(cnn_export, tmp_path / "escape")
    doc = json.loads((folder / "export.json").read_text())
    doc["members"][0]["bank"] = "../../etc/passwd"
    (folder / "export.json").write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="plain names"):
        Inferencer(folder)


def test_export_refuses_foreign_destinations_and_replaces_only_with_overwrite(fitted, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ModelFileError, match="not an export folder"):
        export_model(fitted, other, check=False)
    assert (other / "notes.txt").read_text() == "keep me"
    first = export_model(fitted, tmp_path / "e", check=False)
    with pytest.raises(ModelFileError, match="--overwrite"):
        export_model(fitted, first, check=False)
    export_model(fitted, first, check=False, overwrite=True)
    assert is_export_folder(first) and not list(tmp_path.glob(".e.*"))
    with pytest.raises(PatchCoreError, match="format"):
        export_model(fitted, tmp_path / "x", format="tflite")


# -- command lines ----------------------------------------------------------------------------

def test_cli_export_then_predict_with_the_export_folder(fitted, split, tmp_path):
    model_dir = fitted.save(tmp_path / "model")
    runner = CliRunner()
    out = runner.invoke(app, ["export", str(model_dir), "-o", str(tmp_path / "exp")])
    assert out.exit_code == 0, out.output
    files = [str(s.path) for s in split.test[:3]]
    out = runner.invoke(app, ["predict", str(tmp_path / "exp"), *files, "-o",
                              str(tmp_path / "pred")])
    assert out.exit_code == 0, out.output
    rows = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    rows = rows["predictions"] if isinstance(rows, dict) else rows
    expected = fitted.predict(files)
    assert rel(np.array([r["score"] for r in rows]), expected.scores) <= TOL
    out = runner.invoke(app, ["export", str(tmp_path / "nope"), "-o", str(tmp_path / "e2")])
    assert out.exit_code == 2 and len(out.output.strip().splitlines()) == 1


def test_light_command_line_prints_json_lines(cnn_export, split):
    files = [str(s.path) for s in split.test[:2]]
    proc = subprocess.run([sys.executable, "-m", "patchcore.inference", str(cnn_export), *files,
                           "-q"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in rows] == files and all(r["label"] in ("good", "anomalous")
                                                      for r in rows)
    proc = subprocess.run([sys.executable, "-m", "patchcore.inference", "/nonexistent", "x.png"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
