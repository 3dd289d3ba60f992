"""The command line end to end on a generated dataset, and readable errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from patchcore.cli import app
from patchcore.data.synthetic import make_synthetic_dataset

runner = CliRunner()
FAST = ["-b", "efficientnet_lite0", "--resize", "146", "--imagesize", "128", "--device", "cpu"]


def test_fit_evaluate_predict(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", categories=("carpet", "wood"), n_train=8,
                                  n_test_good=4, n_test_defect=4, size=128, seed=2)
    out = tmp_path / "results"
    r = runner.invoke(app, ["-q", "fit", str(data), "-d", "carpet", "-d", "wood", "-o", str(out),
                            "-p", "0.1", *FAST])
    assert r.exit_code == 0, r.output
    assert (out / "models" / "carpet" / "config.json").is_file()
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["category"] for r in rows] == ["carpet", "wood", "mean"]
    assert float(rows[0]["image_auroc"]) >= 0.9 and float(rows[0]["pixel_auroc"]) >= 0.85

    r = runner.invoke(app, ["-q", "evaluate", str(out), str(data), "--imagesize", "112",
                            "--resize", "128", "-o", str(tmp_path / "eval")])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(tmp_path / "eval" / "results.csv")))
    assert len(rows) == 3 and float(rows[0]["image_auroc"]) >= 0.8

    test_dir = data / "carpet" / "test"
    preds = tmp_path / "preds"
    r = runner.invoke(app, ["-q", "predict", str(out / "models" / "carpet"), str(test_dir / "good"),
                            str(test_dir / "scratch" / "*.png"), "-o", str(preds)])
    assert r.exit_code == 0, r.output
    summary = json.loads((preds / "predictions.json").read_text())
    assert len(summary) == 6
    for row in summary:
        original = Image.open(row["path"])
        overlay = Image.open(preds / row["overlay"])
        assert overlay.size == original.size
        assert np.load(preds / row["map"]).shape == original.size[::-1]
        assert 0.0 <= row["calibrated_score"] <= 1.0
    scratches = [r for r in summary if "scratch" in r["path"]]
    goods = [r for r in summary if "good" in r["path"]]
    assert min(r["score"] for r in scratches) > max(r["score"] for r in goods)
    assert all(r["label"] == "anomalous" for r in scratches)


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    cmd = [sys.executable, "-m", "patchcore.cli"]
    r = subprocess.run([*cmd, "fit", str(tmp_path / "missing")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("[]")
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    r = subprocess.run([*cmd, "predict", str(tmp_path / "m"), str(img)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "not a patchcore model file" in r.stderr
    r = subprocess.run([*cmd, "fit", str(tmp_path), "-b", "nonet"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown backbone 'nonet'" in r.stderr


def test_backbones_command_lists_weights():
    r = runner.invoke(app, ["backbones"])
    assert r.exit_code == 0
    line = next(x for x in r.output.splitlines() if x.startswith("efficientnet_lite2"))
    assert "weights here: yes" in line
