"""Model folders: identical scores after a round trip; clear errors for damaged or foreign files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from patchcore import ModelFileError, PatchCore
from patchcore.storage import BANK_FILE, CONFIG_FILE


@pytest.fixture()
def saved(fitted, tmp_path):
    return fitted.save(tmp_path / "model")


def test_round_trip_gives_identical_scores(fitted, split, saved):
    loaded = PatchCore.load(saved)
    loaded.progress = False
    a = fitted.score(split.test, masks=False)
    b = loaded.score(split.test, masks=False)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.maps, b.maps)
    assert loaded.calibration_ == fitted.calibration_
    assert loaded.config == fitted.config
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG_FILE, BANK_FILE]


def test_config_json_is_complete(saved):
    doc = json.loads((saved / CONFIG_FILE).read_text())
    assert doc["format"] == "patchcore-model" and doc["format_version"] == 2
    for key in ("backbone", "layers", "percentage", "resize", "imagesize", "seed"):
        assert key in doc["config"]
    # Runtime settings do not change scores and are not saved as hyperparameters.
    for key in ("device", "batch_size", "num_workers", "max_memory_mb", "progress"):
        assert key not in doc["config"]
    root = Path(doc["train_root"])
    assert all((root / p).is_file() and not Path(p).is_absolute() for p in doc["train_paths"])
    assert doc["members"][0]["layers"] == ["blocks.2", "blocks.4"]
    assert "image_threshold" in doc["calibration"]


def test_foreign_and_corrupt_files_are_rejected(saved, tmp_path):
    cases = {}
    bad = tmp_path / "notjson"
    shutil.copytree(saved, bad)
    (bad / CONFIG_FILE).write_text("{not json")
    cases[bad] = "corrupt or not JSON"
    foreign = tmp_path / "foreign"
    shutil.copytree(saved, foreign)
    (foreign / CONFIG_FILE).write_text(json.dumps({"model": "something else"}))
    cases[foreign] = "not a patchcore model file"
    future = tmp_path / "future"
    shutil.copytree(saved, future)
    doc = json.loads((future / CONFIG_FILE).read_text())
    doc["format_version"] = 99
    (future / CONFIG_FILE).write_text(json.dumps(doc))
    cases[future] = "format version 99"
    truncated = tmp_path / "truncated"
    shutil.copytree(saved, truncated)
    data = (truncated / BANK_FILE).read_bytes()
    (truncated / BANK_FILE).write_bytes(data[: len(data) // 2])
    cases[truncated] = "corrupt or not a safetensors"
    pickle_file = tmp_path / "pickled"
    shutil.copytree(saved, pickle_file)
    (pickle_file / BANK_FILE).write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n" * 10)
    cases[pickle_file] = "corrupt or not a safetensors"
    for folder, message in cases.items():
        with pytest.raises(ModelFileError, match=message) as info:
            PatchCore.load(folder)
        assert str(folder) in str(info.value)
    with pytest.raises(ModelFileError, match="does not exist"):
        PatchCore.load(tmp_path / "nowhere")


def test_tampered_bank_shape_is_rejected(saved, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(saved, tampered)
    tensors = load_file(str(tampered / BANK_FILE))
    tensors["member0.bank"] = tensors["member0.bank"][:-5]
    save_file(tensors, str(tampered / BANK_FILE))
    with pytest.raises(ModelFileError, match="do not belong together|does not match"):
        PatchCore.load(tampered)
    tensors = load_file(str(saved / BANK_FILE))
    tensors["extra"] = np.zeros(3, dtype=np.float32)
    extra = tmp_path / "extra"
    shutil.copytree(saved, extra)
    save_file(tensors, str(extra / BANK_FILE))
    with pytest.raises(ModelFileError, match="unexpected tensors"):
        PatchCore.load(extra)


def test_interrupted_save_keeps_the_previous_model(fitted, saved, monkeypatch):
    before = (saved / BANK_FILE).read_bytes()

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("patchcore.storage._write_bank", explode)
    with pytest.raises(KeyboardInterrupt):
        fitted.save(saved)
    assert (saved / BANK_FILE).read_bytes() == before
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".")] == []
    PatchCore.load(saved)


LEGACY = Path(__file__).parent / "data" / "legacy_model_v1"


def test_model_saved_by_format_1_scores_exactly_as_before():
    """A model written by patchcore 0.1.0 before the engine refactor: same scores, maps, labels."""
    model = PatchCore.load(LEGACY / "model", device="cpu", progress=False)
    expected = np.load(LEGACY / "expected.npz")
    pred = model.predict(sorted((LEGACY / "images").glob("*.png")))
    np.testing.assert_allclose(pred.scores, expected["scores"], rtol=1e-6)
    np.testing.assert_allclose(pred.maps, expected["maps"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(pred.labels, expected["labels"])
    np.testing.assert_allclose(pred.calibrated, expected["calibrated"], rtol=1e-6)
    assert model.config.anomaly_scorer_num_nn == 2  # its own hyperparameters, not defaults
    assert (model.config.preprocess, model.config.standardize) == ("crop", False)


def test_model_saved_before_standardize_existed_reads_pixels_as_they_are(tmp_path):
    """A config.json without `standardize` (models saved before it existed) loads with it
    off and scores exactly as it did, although new models standardize by default."""
    import dataclasses
    import json

    from conftest import TINY

    from patchcore.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "d", categories=("wood",), n_train=4, n_test_good=1,
                           n_test_defect=2, size=48, seed=4)
    assert PatchCore(**TINY).config.standardize is True
    old = PatchCore(**TINY, standardize=False).fit(tmp_path / "d" / "wood")
    folder = old.save(tmp_path / "m")
    config_file = folder / "config.json"
    document = json.loads(config_file.read_text())
    del document["config"]["standardize"]
    config_file.write_text(json.dumps(document))
    loaded = PatchCore.load(folder, progress=False)
    assert loaded.config.standardize is False
    test = sorted((tmp_path / "d" / "wood" / "test").rglob("*.png"))
    np.testing.assert_array_equal(loaded.predict(test).scores, old.predict(test).scores)
    standardized = PatchCore.from_state(dataclasses.replace(
        loaded.state(), config=loaded.config.replace(standardize=True)))
    assert not np.array_equal(standardized.predict(test).scores, old.predict(test).scores)


@pytest.mark.parametrize("preprocess", ["aspect", "tile"])
def test_multi_view_models_round_trip(tmp_path, preprocess):
    """Provenance counts views: a model with several views per image saves and loads."""
    from conftest import TINY

    from patchcore.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "d", categories=("wood",), n_train=4, n_test_good=1,
                           n_test_defect=1, size=(48, 96), seed=6)
    model = PatchCore(**TINY, preprocess=preprocess, tile_size=48, tile_stride=24)
    model.fit(tmp_path / "d" / "wood")
    assert model.members_[0].bank.image_index.max() >= len(model.train_paths_)  # views > images
    loaded = PatchCore.load(model.save(tmp_path / "m"), progress=False)
    test = sorted((tmp_path / "d" / "wood" / "test").rglob("*.png"))
    np.testing.assert_array_equal(model.predict(test).scores, loaded.predict(test).scores)
    assert loaded.training_view(int(loaded.members_[0].bank.image_index.max()))[0] == 3
