"""Hyperparameter tuning: checked grids, verified feature caches, best == standalone fit, resume."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from patchcore.cli import app
from patchcore.config import PatchCoreConfig, RuntimeSettings
from patchcore.data.layouts import load_dataset
from patchcore.data.synthetic import make_synthetic_dataset
from patchcore.engine.memory import FeatureStore
from patchcore.errors import ConfigError, DataError
from patchcore.evaluation import tuning
from patchcore.evaluation.evaluate import evaluate_split
from patchcore.evaluation.tuning import (
    RESULTS_FILE,
    config_for,
    grid_points,
    open_cache,
    parse_grid,
    tune,
)
from patchcore.model import PatchCore

BASE = PatchCoreConfig(backbone="efficientnet_lite0", resize=146, imagesize=128)
GRID = "percentage=0.02,0.2;anomaly_scorer_num_nn=1,3"
METRICS = ("image_auroc", "pixel_auroc", "pro")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune_data")
    make_synthetic_dataset(root, ("carpet",), n_train=8, n_test_good=3, n_test_defect=4,
                           size=128, seed=7)
    return load_dataset(root / "carpet")


@pytest.fixture(scope="module")
def tuned(split, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune_out")
    return out, tune(split, out, parse_grid(GRID), BASE)


def _metrics(rows: list[dict]) -> list[tuple]:
    return [(json.dumps(r["params"], sort_keys=True), *(r[k] for k in METRICS)) for r in rows]


def _entry(out: Path) -> Path:
    (folder,) = (out / "cache").iterdir()
    return folder


def _copy_cache(tuned, tmp_path: Path) -> Path:
    """A fresh output folder holding only the tuned run's feature cache."""
    out, _ = tuned
    shutil.copytree(out / "cache", tmp_path / "cache")
    return tmp_path


def test_parse_grid_and_points() -> None:
    grid = parse_grid("percentage=0.01,0.1; anomaly_scorer_num_nn=1,3;distance=euclidean,cosine;"
                      "reweight=true,false;layers=blocks.2+blocks.4")
    assert grid["percentage"] == [0.01, 0.1] and grid["anomaly_scorer_num_nn"] == [1, 3]
    assert grid["reweight"] == [True, False] and grid["distance"] == ["euclidean", "cosine"]
    points = grid_points(grid)
    assert len(points) == 16 and len({json.dumps(p, sort_keys=True) for p in points}) == 16
    some = grid_points(grid, random_n=5, seed=3)
    assert len(some) == 5 and some == grid_points(grid, random_n=5, seed=3)
    assert all(p in points for p in some)
    assert grid_points(grid, random_n=99) == points
    assert config_for(BASE, {"layers": "blocks.2+blocks.4"}).layers == ("blocks.2", "blocks.4")
    assert parse_grid("threshold_fpr=none,0.1")["threshold_fpr"] == [None, 0.1]


@pytest.mark.parametrize(("text", "words"), [
    ("percentage=abc", "percentage takes a number"),
    ("anomaly_scorer_num_nn=1.5", "whole number"),
    ("devcie=cpu", "did you mean device"),
    ("device=cpu", "runtime setting"),
    ("batch_size=4,8", "runtime setting"),
    ("max_memory_mb=10", "--max-memory"),
    ("nonsense=1,2", "unknown hyperparameter"),
    ("percentage=2", "percentage must be <= 1"),
    ("percentage=0", "percentage must be > 0"),
    ("percentage=nan", "finite"),
    ("sampler=fast", "sampler must be one of"),
    ("reweight=maybe", "true or false"),
    ("percentage=", "empty value"),
    ("percentage=0.1,,0.2", "empty value"),
    ("percentage=0.1,0.1", "twice"),
    ("percentage=0.1;percentage=0.2", "given twice"),
    ("percentage", "name=v1,v2"),
    ("=0.1", "name=v1,v2"),
    (" ; ", "empty"),
])
def test_malformed_grids_are_one_line_config_errors(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_grid(text)
    message = str(err.value)
    assert words in message and "\n" not in message


def test_invalid_points_fail_before_any_extraction(split, tmp_path, monkeypatch) -> None:
    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted for an invalid grid")

    monkeypatch.setattr(tuning, "extract_features", no_extraction)
    with pytest.raises(ConfigError, match="patchsize must be odd"):
        tune(split, tmp_path, parse_grid("patchsize=3,2"), BASE)  # valid alone, not as config
    with pytest.raises(ConfigError, match="percentage takes|percentage must be"):
        tune(split, tmp_path, {"percentage": ["abc"]}, BASE)  # dict grids are checked too
    with pytest.raises(ConfigError, match="runtime setting"):
        tune(split, tmp_path, {"device": ["cpu"]}, BASE)
    with pytest.raises(ConfigError, match="random points"):
        tune(split, tmp_path, parse_grid(GRID), BASE, random_n=0)
    assert not (tmp_path / RESULTS_FILE).exists()


def test_tune_outputs(tuned) -> None:
    out, result = tuned
    assert result.evaluated == 4 and result.skipped == 0 and result.extracted == 1
    assert len(list((out / "cache").iterdir())) == 1  # one feature setting, cached once
    for name in ("tune_results.csv", "tune_results.json", "best.json", RESULTS_FILE,
                 "plots/image_auroc_vs_percentage.png",
                 "plots/pixel_auroc_vs_anomaly_scorer_num_nn.png",
                 "plots/heatmap_image_auroc.png"):
        assert (out / name).is_file(), name
    rows = json.loads((out / "tune_results.json").read_text())
    assert len(rows) == 4 and {"image_auroc", "pixel_auroc", "pro", "seconds"} <= set(rows[0])
    best = result.best
    assert all((best["image_auroc"], best["pixel_auroc"]) >= (r["image_auroc"], r["pixel_auroc"])
               for r in result.rows)
    meta = json.loads((_entry(out) / "meta.json").read_text())
    for name in ("train.npy", "test.npy", "labels.npy", "masks.npy"):
        assert set(meta["files"][name]) == {"shape", "dtype", "sha256"}, name


def test_best_setting_matches_a_standalone_fit(tuned, split) -> None:
    _, result = tuned
    best = result.best
    model = PatchCore(config_for(BASE, best["params"]))
    model.progress = False
    model.fit(split)
    row, _ = evaluate_split(model, split)
    for key in METRICS:
        assert row[key] == pytest.approx(best[key], abs=1e-6), key


def test_tiny_memory_budget_gives_identical_results(tuned, split, tmp_path, monkeypatch) -> None:
    seen = []
    build_bank = tuning.build_bank

    def spy(store, *args, **kwargs):
        seen.append(isinstance(store, FeatureStore) and store.on_disk)
        return build_bank(store, *args, **kwargs)

    monkeypatch.setattr(tuning, "build_bank", spy)
    monkeypatch.setattr(tuning, "CHUNK_ROWS", 100)  # stream into the cache in many pieces
    settings = RuntimeSettings(progress=False, max_memory_mb=0.01)
    small = tune(split, tmp_path, parse_grid(GRID), BASE, settings=settings)
    assert small.extracted == 1 and seen == [True] * 4
    assert _metrics(small.rows) == _metrics(tuned[1].rows)
    assert json.loads((_entry(tmp_path) / "meta.json").read_text())["files"] == json.loads(
        (_entry(tuned[0]) / "meta.json").read_text())["files"]  # the same bytes on disk


@pytest.mark.parametrize("damage", ["smaller train", "other test", "truncated train",
                                    "bad header", "garbled meta", "no meta", "other key"])
def test_damaged_cache_entries_are_rejected(tuned, tmp_path, damage, caplog) -> None:
    folder = _entry(_copy_cache(tuned, tmp_path))
    key = json.loads((folder / "meta.json").read_text())["key"]
    cache = open_cache(folder, key)
    assert cache is not None
    cache.close()
    train = np.load(folder / "train.npy")
    if damage == "smaller train":
        np.save(folder / "train.npy", train[: len(train) // 2])
    elif damage == "other test":
        test = np.load(folder / "test.npy")
        np.save(folder / "test.npy", test[::-1].copy())  # same shape and dtype, other values
    elif damage == "truncated train":
        data = (folder / "train.npy").read_bytes()
        (folder / "train.npy").write_bytes(data[: len(data) // 2])
    elif damage == "bad header":
        (folder / "labels.npy").write_bytes(b"\x93NUMPY garbage")
    elif damage == "garbled meta":
        text = (folder / "meta.json").read_text()
        (folder / "meta.json").write_text(text[: len(text) // 2])
    elif damage == "no meta":
        (folder / "meta.json").unlink()
    else:
        key = {**key, "train": key["train"][:-1]}
    with caplog.at_level(logging.WARNING, logger="patchcore.evaluation.tuning"):
        assert open_cache(folder, key) is None
    assert "recomputing" in caplog.text


def test_swapped_cache_array_is_recomputed(tuned, split, tmp_path) -> None:
    out = _copy_cache(tuned, tmp_path)
    folder = _entry(out)
    train = np.load(folder / "train.npy")
    np.save(folder / "train.npy", train[: len(train) // 2])  # fewer patches: a wrong bank
    again = tune(split, out, parse_grid(GRID), BASE)
    assert (again.evaluated, again.skipped, again.extracted) == (4, 0, 1)
    assert _metrics(again.rows) == _metrics(tuned[1].rows)
    assert open_cache(folder, json.loads((folder / "meta.json").read_text())["key"]) is not None


def test_truncated_cache_and_half_written_line_recover(tuned, split, tmp_path) -> None:
    out = _copy_cache(tuned, tmp_path)
    lines = (tuned[0] / RESULTS_FILE).read_text().splitlines()
    # A run killed while appending the last line, and while rewriting the test features.
    (out / RESULTS_FILE).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    test = _entry(out) / "test.npy"
    test.write_bytes(test.read_bytes()[:1000])
    again = tune(split, out, parse_grid(GRID), BASE)
    assert (again.evaluated, again.skipped, again.extracted) == (1, 3, 1)
    assert _metrics(again.rows) == _metrics(tuned[1].rows)
    saved = (out / RESULTS_FILE).read_text()
    assert saved.endswith("\n") and [json.loads(x) for x in saved.splitlines()]  # all lines valid
    final = tune(split, out, parse_grid(GRID), BASE)
    assert (final.evaluated, final.skipped, final.extracted) == (0, 4, 0)


def test_resume_skips_finished_points(tuned, split) -> None:
    out, _ = tuned
    again = tune(split, out, parse_grid(GRID), BASE)
    assert (again.evaluated, again.skipped, again.extracted) == (0, 4, 0)
    lines = (out / RESULTS_FILE).read_text().splitlines()
    (out / RESULTS_FILE).write_text("\n".join(lines[:-1]) + "\n")  # "interrupted" before the last
    partial = tune(split, out, parse_grid(GRID), BASE)
    assert (partial.evaluated, partial.skipped, partial.extracted) == (1, 3, 0)
    assert len((out / RESULTS_FILE).read_text().splitlines()) == 4


def test_results_of_other_settings_are_not_reused(tuned, split, tmp_path) -> None:
    out = _copy_cache(tuned, tmp_path)
    shutil.copy(tuned[0] / RESULTS_FILE, out / RESULTS_FILE)
    other = tune(split, out, parse_grid(GRID), BASE.replace(blur_sigma=2.0))
    assert (other.evaluated, other.skipped, other.extracted) == (4, 0, 0)  # same features


def test_tune_cli_resumes(tuned, split, tmp_path: Path) -> None:
    out, result = tuned
    args = ["tune", str(split.root), "-o", str(out), "--grid", GRID, "-b", "efficientnet_lite0",
            "--resize", "146", "--imagesize", "128", "--device", "cpu"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "evaluated 0 points, skipped 4" in res.output
    assert "best:" in res.output
    res = CliRunner().invoke(app, ["tune", str(split.root), "--grid", "bogus=1", "-o",
                                   str(tmp_path)])
    assert res.exit_code != 0


def test_feature_store_over_an_npy_file(tmp_path) -> None:
    data = np.random.default_rng(1).normal(size=(500, 6)).astype(np.float32)
    np.save(tmp_path / "f.npy", data)
    ram = FeatureStore.open_npy(tmp_path / "f.npy")
    disk = FeatureStore.open_npy(tmp_path / "f.npy", max_memory_mb=0.001)
    assert disk.on_disk and not ram.on_disk and disk.shape == ram.shape == (500, 6)
    np.testing.assert_array_equal(disk[120:260], data[120:260])
    idx = np.array([499, 3, 250, 0])
    np.testing.assert_array_equal(disk.gather(idx, chunk=64), data[np.sort(idx)])
    np.testing.assert_array_equal(ram.gather(idx), data[np.sort(idx)])
    with pytest.raises(ValueError, match="read-only"):
        disk.append(data[:2])
    disk.close()
    ram.close()
    assert (tmp_path / "f.npy").is_file()  # an opened file is not the store's to delete
    np.save(tmp_path / "i.npy", np.zeros((4, 2), dtype=np.int64))
    with pytest.raises(DataError, match="float32"):
        FeatureStore.open_npy(tmp_path / "i.npy")
