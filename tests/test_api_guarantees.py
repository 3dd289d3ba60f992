"""The estimator never gives a confident wrong answer and answers misuse with one clear error."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from conftest import TINY
from PIL import Image

from patchcore import ConfigError, DataError, ModelFileError, PatchCore, PatchCoreConfig
from patchcore.config import RuntimeSettings
from patchcore.data.synthetic import make_synthetic_dataset
from patchcore.storage import CONFIG_FILE


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("guarantees")
    make_synthetic_dataset(root, categories=("tile",), n_train=6, n_test_good=2, n_test_defect=2,
                           size=48, seed=5)
    return root / "tile"


@pytest.fixture(scope="module")
def tiny_model(data):
    return PatchCore(**TINY).fit(data)  # a category folder given as a path


def test_too_few_images_give_uncalibrated_labels_not_good(data, caplog):
    train = sorted((data / "train" / "good").glob("*.png"))[:1]  # nothing to compare it with
    with caplog.at_level(logging.WARNING):
        model = PatchCore(**TINY).fit(train)
    assert "uncalibrated" in caplog.text
    pred = model.predict(sorted((data / "test").rglob("*.png")))
    assert (pred.labels == -1).all() and np.isnan(pred.calibrated).all()
    assert set(pred.label_names) == {"uncalibrated"}
    assert np.isfinite(pred.scores).all()


def test_calibrated_model_labels_follow_threshold(tiny_model, data):
    cal = tiny_model.calibration_
    assert cal.calibrated and cal.source_images >= 2
    pred = tiny_model.predict(sorted((data / "test").rglob("*.png")))
    np.testing.assert_array_equal(pred.labels, (pred.scores >= cal.image_threshold).astype(int))
    assert set(pred.label_names) <= {"good", "anomalous"}


def test_k_larger_than_the_bank_is_an_error_at_fit_and_at_load(tiny_model, data, tmp_path):
    with pytest.raises(ConfigError, match="anomaly_scorer_num_nn=1000 is larger than the memory"):
        PatchCore(**{**TINY, "anomaly_scorer_num_nn": 1000}).fit(data)
    saved = tiny_model.save(tmp_path / "m")
    doc = json.loads((saved / CONFIG_FILE).read_text())
    rows = doc["members"][0]["bank_shape"][0]
    doc["config"]["anomaly_scorer_num_nn"] = rows + 1
    (saved / CONFIG_FILE).write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="larger than the memory bank"):
        PatchCore.load(saved)


@pytest.mark.parametrize("key, value, message", [
    ("imagesize", 20000, "imagesize must be <= 4096"),
    ("resize", 20000, "resize must be <= 4096"),
    ("blur_sigma", 1e6, "blur_sigma must be <= 64"),
    ("anomaly_scorer_num_nn", 1000000, "anomaly_scorer_num_nn must be <= 1024"),
    ("imagesize", 224.5, "imagesize must be int"),
    ("percentage", "abc", "percentage must be float"),
    ("projection_dim", 0, "projection_dim must be >= 1"),
    ("sampler", "magic", "sampler must be one of"),
    ("pretrained", 1, "pretrained must be bool"),
    ("bogus", 1, "unknown hyperparameters: bogus"),
])
def test_config_json_values_are_range_checked_on_load(tiny_model, tmp_path, key, value, message):
    saved = tiny_model.save(tmp_path / "m")
    doc = json.loads((saved / CONFIG_FILE).read_text())
    doc["config"][key] = value
    (saved / CONFIG_FILE).write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match=message):
        PatchCore.load(saved)


@pytest.mark.parametrize("entry, value", [
    ("feature_grid", [100000, 4]), ("feature_grid", "big"), ("members", []),
    ("train_paths", "x"), ("calibration", {"image_threshold": "high"}),
])
def test_damaged_model_entries_are_one_line_errors(tiny_model, tmp_path, entry, value):
    saved = tiny_model.save(tmp_path / "m")
    doc = json.loads((saved / CONFIG_FILE).read_text())
    doc[entry] = value
    (saved / CONFIG_FILE).write_text(json.dumps(doc))
    with pytest.raises(ModelFileError) as info:
        PatchCore.load(saved)
    assert "\n" not in str(info.value)


def test_provenance_out_of_range_is_rejected(tiny_model, tmp_path):
    saved = tiny_model.save(tmp_path / "m")
    doc = json.loads((saved / CONFIG_FILE).read_text())
    doc["train_paths"] = doc["train_paths"][:1]  # bank rows point at images 0..n-1
    (saved / CONFIG_FILE).write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="provenance"):
        PatchCore.load(saved)


def test_deeply_nested_config_json_is_rejected(tiny_model, tmp_path):
    saved = tiny_model.save(tmp_path / "m")
    (saved / CONFIG_FILE).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ModelFileError):
        PatchCore.load(saved)


def test_training_paths_are_stored_relative_to_their_root(tiny_model, data, tmp_path,
                                                         monkeypatch):
    moved = tmp_path / "moved"
    shutil.copytree(data, moved / "tile")
    saved = tiny_model.save(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    loaded = PatchCore.load(saved)
    assert loaded.training_path(0) == tiny_model.training_path(0)
    assert loaded.training_path(0).is_file()
    with pytest.raises(DataError, match="out of range"):
        loaded.training_path(-1)
    with pytest.raises(DataError, match="out of range"):
        loaded.training_path(len(loaded.train_paths_))


@pytest.mark.parametrize("bad", [
    None, 5, 3.5, np.zeros((0, 0, 3), dtype=np.uint8), np.zeros((2, 2, 2, 2, 3), np.uint8),
    np.zeros((8, 8, 2), np.uint8), b"not an image", object(),
])
def test_predict_misuse_is_a_data_error(tiny_model, bad):
    with pytest.raises(DataError) as info:
        tiny_model.predict(bad)
    assert "\n" not in str(info.value)


def test_closed_pil_image_and_empty_list(tiny_model):
    img = Image.new("RGB", (40, 40))
    img.close()
    with pytest.raises(DataError):
        tiny_model.predict(img)
    with pytest.raises(DataError, match="no images"):
        tiny_model.predict([])


def test_fit_on_a_missing_folder_string_names_it(tmp_path):
    with pytest.raises(DataError, match="does_not_exist"):
        PatchCore(**TINY).fit(str(tmp_path / "does_not_exist"))


def test_runtime_settings_are_checked_and_separate():
    with pytest.raises(ConfigError, match="num_workers must be >= 0"):
        RuntimeSettings(num_workers=-1)
    with pytest.raises(ConfigError, match="max_memory_mb must be > 0"):
        RuntimeSettings(max_memory_mb=-5)
    with pytest.raises(ConfigError, match="unknown settings: colour"):
        PatchCore(colour="red")
    model = PatchCore(batch_size=3, percentage=0.2)
    assert model.settings.batch_size == 3 and model.config.percentage == 0.2
    assert "batch_size" not in PatchCoreConfig().to_dict()


def test_registries_and_config_choices_agree():
    from patchcore import config
    from patchcore.data.layouts import LAYOUTS
    from patchcore.engine.sampling import SAMPLERS

    assert set(config.SAMPLERS) == set(SAMPLERS)
    assert "auto" in LAYOUTS


def test_a_large_holdout_still_leaves_images_for_the_bank(data):
    model = PatchCore(**{**TINY, "calibration_holdout": 0.9}).fit(data)
    assert len(model.train_paths_) == 2 and model.calibration_.source_images == 4
    assert len(model.members_[0].bank) > 0
