"""Explanations: nearest memory-bank patch vs brute force, and provenance of bank rows."""

from __future__ import annotations

import logging
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FAST
from PIL import Image

from patchcore.cli import app
from patchcore.data.layouts import load_dataset
from patchcore.data.synthetic import make_synthetic_dataset
from patchcore.errors import DataError
from patchcore.explain import (
    explain_patch,
    patch_box,
    save_explanation,
    save_explanation_gif,
    training_image,
)
from patchcore.model import PatchCore


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
    feats = model.patch_features(bad.path)
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


def test_explain_cli_train_root(identity_model, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    model, split = identity_model
    new_root = tmp_path / "moved"
    shutil.copytree(model.train_root_, new_root)
    monkeypatch.setattr(model, "train_root_", str(tmp_path / "gone"))  # the dataset moved
    model_dir = model.save(tmp_path / "model")
    bad = next(s for s in split.test if s.label == 1)
    args = ["-q", "explain", str(model_dir), str(bad.path), "--device", "cpu",
            "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "--train-root" in result.output
    result = CliRunner().invoke(app, [*args, "--train-root", str(new_root)])
    assert result.exit_code == 0, result.output
    info = (tmp_path / "out" / f"{bad.path.stem}_explain.json").read_text()
    assert str(new_root) in info


# --- the source image must be the right one, or an error --------------------------------------


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail instead of hanging: SIGALRM interrupts a blocking call (e.g. opening a FIFO)."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"took longer than {seconds} s (blocked?)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _training_patch(model: PatchCore, image_i: int) -> Callable[..., dict]:
    """explain_patch of patch (1, 1) of training image `image_i` (its own bank row is nearest)."""
    query = model.training_path(image_i)
    feats = model.patch_features(query)
    return lambda **kw: explain_patch(model, query, (1, 1), feats, **kw)


def _decoy(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (128, 128), (255, 0, 255)).save(path)


def test_source_does_not_depend_on_cwd(identity_model, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = identity_model
    expected = Path(model.train_root_) / model.train_paths_[2]
    for rel in model.train_paths_:  # same relative paths, other pictures, in the new cwd
        _decoy(tmp_path / rel)
    monkeypatch.chdir(tmp_path)
    info = _training_patch(model, 2)()
    assert info["source_index"] == 2 and info["source_path"] == str(expected)
    assert Path(info["source_path"]).is_absolute()
    save_explanation(model, info, tmp_path / "e.png")


def test_moved_dataset_needs_and_takes_train_root(identity_model, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = identity_model
    new_root = tmp_path / "moved"
    shutil.copytree(model.train_root_, new_root)
    explain = _training_patch(model, 1)
    old_root = tmp_path / "gone" / "train" / "good"  # where fit found the images
    monkeypatch.setattr(model, "train_root_", str(old_root))
    with pytest.raises(DataError, match="missing.*--train-root DIR.*train_root=") as err:
        explain()
    assert "\n" not in str(err.value) and str(old_root) in str(err.value)
    info = explain(train_root=new_root)
    assert info["source_path"] == str(new_root / model.train_paths_[1])
    png = save_explanation(model, info, tmp_path / "e.png", train_root=new_root)
    assert png.is_file()
    # An older model: absolute paths under the old root, no stored root.
    monkeypatch.setattr(model, "train_paths_", [str(old_root / p) for p in model.train_paths_])
    monkeypatch.setattr(model, "train_root_", None)
    assert explain(train_root=new_root)["source_path"] == info["source_path"]
    with pytest.raises(DataError, match="missing"):
        explain()
    with pytest.raises(DataError, match="not a folder"):
        explain(train_root=tmp_path / "nowhere")


def test_relative_paths_without_root_warn(identity_model, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    model, _ = identity_model
    explain = _training_patch(model, 0)
    monkeypatch.chdir(model.train_root_)
    monkeypatch.setattr(model, "train_root_", None)  # paths relative to fit's cwd
    with caplog.at_level(logging.WARNING, logger="patchcore.explain"):
        info = explain()
    assert info["source_path"] == os.path.abspath(model.train_paths_[0])
    assert "relative to the folder" in caplog.text and "--train-root" in caplog.text


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_source_is_an_error_not_a_hang(identity_model, tmp_path: Path) -> None:
    model, _ = identity_model
    root = tmp_path / "fifo_root"
    for rel in model.train_paths_:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(root / rel)
    explain = _training_patch(model, 1)
    with deadline(20), pytest.raises(DataError, match="not a regular file"):
        explain(train_root=root)
    info = explain()
    with deadline(20), pytest.raises(DataError, match="not a regular file"):
        save_explanation(model, info, tmp_path / "e.png", train_root=root)
    with deadline(20), pytest.raises(DataError, match="not a regular file"):
        save_explanation(model, {**info, "source_path": str(root / model.train_paths_[1])},
                         tmp_path / "e.png")
    with deadline(20), pytest.raises(DataError, match="not a regular file"):
        save_explanation_gif(model, model.training_path(1), tmp_path / "e.gif", max_frames=2,
                             train_root=root)


def test_bank_index_out_of_range_is_an_error(identity_model,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = identity_model
    n = len(model.train_paths_)
    for bad in (-1, n):
        with pytest.raises(DataError, match=f"training image {bad}.*{n} training paths"):
            training_image(model, bad)
    bank = model.members_[0].bank
    explain = _training_patch(model, 0)
    monkeypatch.setattr(bank, "image_index", np.full_like(bank.image_index, -1))
    with deadline(20), pytest.raises(DataError, match="training image -1"):
        explain()


def test_multi_view_provenance_points_at_the_right_view(tmp_path: Path) -> None:
    """Tile mode: a patch of any view of a training image finds itself in that very view."""
    make_synthetic_dataset(tmp_path, categories=("carpet",), n_train=3, n_test_good=1,
                           n_test_defect=1, size=(48, 96), seed=4)
    model = PatchCore(backbone="resnet18", pretrained=False, imagesize=32, preprocess="tile",
                      tile_size=48, tile_stride=24, sampler="identity", calibration_holdout=0.0,
                      target_embed_dimension=16, pretrain_embed_dimension=16, device="cpu",
                      progress=False)
    model.fit(load_dataset(tmp_path / "carpet"))
    n_views = model.preprocessor.num_views((96, 48))
    assert n_views == 3 and len(model.members_[0].bank) == 3 * n_views * 16
    for image_i in (0, 2):
        path = model.training_path(image_i)
        for view in range(n_views):
            info = explain_patch(model, path, patch=(1, 2), view=view)
            assert info["distance"] == pytest.approx(0.0, abs=1e-3)
            assert (info["source_index"], info["source_view"]) == (image_i, view)
            assert info["source_position"] == (1, 2)
    info = explain_patch(model, path)  # default: the most anomalous patch over all views
    assert 0 <= info["view"] < n_views
    figure = save_explanation(model, info, tmp_path / "out" / "e.png")
    assert figure.is_file()
