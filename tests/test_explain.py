"""Explanations: nearest memory-bank patch vs brute force, and provenance of bank rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from patchcore.cli import app
from patchcore.data.layouts import load_dataset
from patchcore.data.synthetic import make_synthetic_dataset
from patchcore.explain import (
    explain_patch,
    image_features,
    patch_box,
    save_explanation,
    save_explanation_gif,
)
from patchcore.model import PatchCore

FAST = dict(backbone="efficientnet_lite0", resize=146, imagesize=128, batch_size=8,
            device="cpu")


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory):
    """Every training patch kept (sampler identity), no calibration holdout."""
    root = tmp_path_factory.mktemp("explain_data")
    make_synthetic_dataset(root, ("carpet",), n_train=3, n_test_good=1, n_test_defect=2,
                           size=128, seed=5)
    split = load_dataset(root / "carpet")
    model = PatchCore(**FAST, sampler="identity", calibration_holdout=0.0)
    model.progress = False
    model.fit(split)
    return model, split


def test_training_patch_finds_itself(identity_model) -> None:
    model, _ = identity_model
    h, w = model.feature_grid_
    member = model.members_[0]
    for image_i, (r, c) in ((1, (2, 3)), (2, (h - 1, w - 1))):
        info = explain_patch(model, model.training_path(image_i), patch=(r, c))
        assert info["nearest_row"] == image_i * h * w + r * w + c
        assert info["distance"] == pytest.approx(0.0, abs=1e-3)
        assert info["source_path"] == str(model.training_path(image_i))
        assert info["source_index"] == image_i
        assert info["source_position"] == (r, c)
        assert tuple(member.bank.position[info["nearest_row"]]) == (r, c)


def test_nearest_patch_matches_brute_force(identity_model) -> None:
    model, split = identity_model
    bad = next(s for s in split.test if s.label == 1)
    feats = image_features(model, bad.path)
    info = explain_patch(model, bad.path)
    bank = model.members_[0].bank.features.astype(np.float64)
    # The default patch is the most anomalous one: largest distance to its nearest bank row.
    all_d = np.sqrt(((feats.reshape(-1, 1, feats.shape[-1]).astype(np.float64)
                      - bank[None]) ** 2).sum(-1))
    nearest_d = all_d.min(axis=1).reshape(feats.shape[:2])
    assert info["patch"] == np.unravel_index(nearest_d.argmax(), nearest_d.shape)
    r, c = info["patch"]
    row_d = all_d[r * feats.shape[1] + c]
    assert info["nearest_row"] == int(row_d.argmin())
    assert info["distance"] == pytest.approx(row_d.min(), rel=1e-4)
    assert info["distance_metric"] == "euclidean"
    src = model.members_[0].bank.image_index[info["nearest_row"]]
    assert info["source_path"] == str(model.training_path(src))


def test_patch_box_and_figures(identity_model, tmp_path: Path) -> None:
    model, split = identity_model
    h, w = model.feature_grid_
    cell = model.config.imagesize / h
    left, top, right, bottom = patch_box(model, h // 2, w // 2)
    assert right - left == pytest.approx(model.config.patchsize * cell, abs=1)
    assert (left + right) / 2 == pytest.approx((w // 2 + 0.5) * cell, abs=1)
    assert patch_box(model, 0, 0)[:2] == (0, 0)
    bad = next(s for s in split.test if s.label == 1)
    info = explain_patch(model, bad.path)
    png = save_explanation(model, info, tmp_path / "e.png")
    assert Image.open(png).size[0] > 400
    gif = save_explanation_gif(model, bad.path, tmp_path / "e.gif", max_frames=4)
    with Image.open(gif) as im:
        assert im.n_frames == 4


def test_explain_cli(identity_model, tmp_path: Path) -> None:
    model, split = identity_model
    model_dir = model.save(tmp_path / "model")
    bad = next(s for s in split.test if s.label == 1)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["-q", "explain", str(model_dir), str(bad.path),
                                      "--patch", "1,2", "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / f"{bad.path.stem}_explain.png").is_file()
    assert '"patch": [\n    1,\n    2\n  ]' in (out / f"{bad.path.stem}_explain.json").read_text()
    result = CliRunner().invoke(app, ["explain", str(model_dir), str(bad.path), "--patch", "x"])
    assert result.exit_code != 0
