"""The command line end to end on a small generated dataset with a tiny random-weight model."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_CLI as TINY
from PIL import Image

from patchcore.cli import app
from patchcore.config import PatchCoreConfig, RuntimeSettings
from patchcore.data.synthetic import make_synthetic_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two generated categories, 6 training and 4 test images each, 64 px."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("cli") / "data",
                                  categories=("carpet", "wood"), n_train=6, n_test_good=2,
                                  n_test_defect=2, size=64, seed=2)


@pytest.fixture(scope="module")
def results(data, tmp_path_factory):
    """`patchcore fit` of both categories."""
    out = tmp_path_factory.mktemp("fit") / "results"
    r = runner.invoke(app, ["-q", "fit", str(data), "-o", str(out), "-p", "0.5", *TINY])
    assert r.exit_code == 0, r.output
    return out


def test_fit_writes_models_and_results(results):
    assert (results / "models" / "carpet" / "config.json").is_file()
    assert (results / "models" / "wood" / "config.json").is_file()
    rows = list(csv.DictReader(open(results / "results.csv")))
    assert [r["category"] for r in rows] == ["carpet", "wood", "mean"]
    saved = json.loads((results / "models" / "carpet" / "config.json").read_text())["config"]
    assert saved["percentage"] == 0.5 and saved["pretrained"] is False
    assert saved["backbone"] == "resnet18" and saved["target_embed_dimension"] == 16


def test_evaluate_with_reports_and_other_size(results, data, tmp_path):
    out = tmp_path / "eval"
    r = runner.invoke(app, ["-q", "evaluate", str(results), str(data), "--imagesize", "48",
                            "--resize", "48", "-o", str(out), "--save-reports",
                            "--save-anomaly-scores", "--save-segmentation-images"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["category"] for r in rows] == ["carpet", "wood", "mean"]
    assert (out / "reports" / "carpet" / "index.html").is_file()
    assert (out / "scores" / "wood.csv").is_file()
    assert len(list((out / "segmentation" / "carpet").glob("*.png"))) == 4


def test_evaluate_a_category_folder_uses_its_own_model(results, data, tmp_path):
    r = runner.invoke(app, ["-q", "evaluate", str(results), str(data / "wood"), "-o",
                            str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["category"] for r in rows] == ["wood", "mean"]


def test_predict_writes_maps_overlays_and_tables(results, data, tmp_path):
    test_dir = data / "carpet" / "test"
    preds = tmp_path / "preds"
    r = runner.invoke(app, ["-q", "predict", str(results / "models" / "carpet"),
                            str(test_dir / "good"), str(test_dir / "scratch" / "*.png"),
                            "-o", str(preds)])
    assert r.exit_code == 0, r.output
    summary = json.loads((preds / "predictions.json").read_text())
    assert len(summary) == 3
    for row in summary:
        original = Image.open(row["path"])
        assert Image.open(preds / row["overlay"]).size == original.size
        assert Image.open(preds / row["map_image"]).size == original.size
        assert np.load(preds / row["map"]).shape == original.size[::-1]
        assert row["label"] in ("good", "anomalous")
        assert 0.0 <= row["calibrated_score"] <= 1.0
    # names mirror the inputs' paths below their common folder
    assert sorted(r["map"] for r in summary) == ["good/000_map.npy", "good/001_map.npy",
                                                 "scratch/000_map.npy"]
    table = list(csv.DictReader(open(preds / "predictions.csv")))
    assert [t["overlay"] for t in table] == [s["overlay"] for s in summary]


def test_fit_dot_inside_a_category_folder(data, tmp_path, monkeypatch):
    monkeypatch.chdir(data / "wood")
    out = tmp_path / "out"
    r = runner.invoke(app, ["-q", "fit", ".", "-o", str(out), "--no-evaluate", *TINY])
    assert r.exit_code == 0, r.output
    assert (out / "models" / "wood" / "config.json").is_file()
    assert sorted(p.name for p in (out / "models").iterdir()) == ["wood"]


def test_every_field_is_an_option_with_its_help_and_default():
    r = runner.invoke(app, ["fit", "--help"], terminal_width=1000)
    assert r.exit_code == 0
    blocks: list[str] = []  # one per option: its line and, after a long name, the next one
    for x in r.output.splitlines():
        if x.startswith("  -"):
            blocks.append(x.strip())
        elif blocks:
            blocks[-1] += " " + x.strip()
    for cls in (PatchCoreConfig, RuntimeSettings):
        for f in dataclasses.fields(cls):
            if f.name == "progress":
                continue
            flag = (f.metadata["cli"] or "--" + f.name.replace("_", "-")).split("/")[0]
            start = f"{f.metadata['short']}, {flag}" if f.metadata["short"] else flag
            line = next((x for x in blocks if x.startswith(start + " ")), None)
            assert line is not None, start
            assert f.metadata["help"] in line, flag
            if f.default not in (None, ()) and not isinstance(f.default, bool):
                assert f"default: {f.default}" in line, flag
    assert "[0<x<=1]" in next(x for x in blocks if "--percentage" in x)
    assert "[approx_greedy_coreset|greedy_coreset|random|identity]" in r.output


def test_ensemble_options_reach_the_config(data, monkeypatch, tmp_path):
    seen = {}

    def fake_fit(self, split):
        seen["config"] = self.config
        raise KeyboardInterrupt

    monkeypatch.setattr("patchcore.model.PatchCore.fit", fake_fit)
    r = runner.invoke(app, ["-q", "fit", str(data / "carpet"), "-o", str(tmp_path / "o"),
                            "-b", "resnet18", "-b", "resnet50", "-le", "0.layer2",
                            "-le", "1.layer3", "-p", "0.25", "--reweight", "--random-weights"])
    assert r.exit_code == 130
    config = seen["config"]
    assert config.backbone == ("resnet18", "resnet50")
    assert config.layers == ("0.layer2", "1.layer3")
    assert config.percentage == 0.25 and config.reweight and not config.pretrained


def test_demo_runs_through_the_library(tmp_path):
    out = tmp_path / "demo"
    args = ["-q", "demo", "-o", str(out), "--n-train", "4", *TINY]
    for _ in range(2):  # a second demo replaces the first one's predictions
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
    assert (out / "results" / "models" / "carpet" / "config.json").is_file()
    assert (out / "results" / "reports" / "carpet" / "index.html").is_file()
    rows = json.loads((out / "predictions" / "predictions.json").read_text())
    assert len(rows) == 14 and all((out / "predictions" / r["overlay"]).is_file() for r in rows)


def test_backbones_command_lists_weights():
    r = runner.invoke(app, ["backbones"])
    assert r.exit_code == 0
    line = next(x for x in r.output.splitlines() if x.startswith("efficientnet_lite2"))
    assert "weights here: yes" in line
    lines = r.output.splitlines()  # columns aligned, however long a name or source is
    assert len({x.index(" weights here: ") for x in lines}) == 1
    name_w = max(len(x.split()[0]) for x in lines)
    assert all(x[name_w:name_w + 2] == "  " and x[name_w + 2] != " " for x in lines)


def test_the_installed_entry_point_gives_one_line_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "patchcore.cli", "fit", str(tmp_path / "missing"),
                        "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: dataset folder {tmp_path / 'missing'} "
                                             "does not exist"]
    assert not (tmp_path / "out").exists()
