"""Hyperparameter tuning: grids, cached features, best == standalone fit, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from patchcore.cli import app
from patchcore.config import PatchCoreConfig
from patchcore.data.layouts import load_dataset
from patchcore.data.synthetic import make_synthetic_dataset
from patchcore.errors import ConfigError
from patchcore.evaluation.evaluate import evaluate_split
from patchcore.evaluation.tuning import RESULTS_FILE, config_for, grid_points, parse_grid, tune
from patchcore.model import PatchCore

BASE = PatchCoreConfig(backbone="efficientnet_lite0", resize=146, imagesize=128)
GRID = "percentage=0.02,0.2;anomaly_scorer_num_nn=1,3"


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


def test_parse_grid_and_points() -> None:
    grid = parse_grid("percentage=0.01,0.1; anomaly_scorer_num_nn=1,3;distance=euclidean,cosine;"
                      "reweight=true,false;layers=blocks.2+blocks.4")
    assert grid["percentage"] == [0.01, 0.1] and grid["anomaly_scorer_num_nn"] == [1, 3]
    assert grid["reweight"] == [True, False] and grid["distance"] == ["euclidean", "cosine"]
    assert len(grid_points(grid)) == 16 and len(grid_points(grid, random_n=5)) == 5
    assert config_for(BASE, {"layers": "blocks.2+blocks.4"}).layers == ("blocks.2", "blocks.4")
    with pytest.raises(ConfigError):
        parse_grid("nonsense=1,2")
    with pytest.raises(ConfigError):
        parse_grid("percentage")


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


def test_best_setting_matches_a_standalone_fit(tuned, split) -> None:
    _, result = tuned
    best = result.best
    model = PatchCore(config_for(BASE, best["params"]))
    model.progress = False
    model.fit(split)
    row, _ = evaluate_split(model, split)
    for key in ("image_auroc", "pixel_auroc", "pro"):
        assert row[key] == pytest.approx(best[key], abs=1e-6), key


def test_resume_skips_finished_points(tuned, split) -> None:
    out, _ = tuned
    again = tune(split, out, parse_grid(GRID), BASE)
    assert (again.evaluated, again.skipped, again.extracted) == (0, 4, 0)
    lines = (out / RESULTS_FILE).read_text().splitlines()
    (out / RESULTS_FILE).write_text("\n".join(lines[:-1]) + "\n")  # "interrupted" before the last
    partial = tune(split, out, parse_grid(GRID), BASE)
    assert (partial.evaluated, partial.skipped, partial.extracted) == (1, 3, 0)
    assert len((out / RESULTS_FILE).read_text().splitlines()) == 4


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
