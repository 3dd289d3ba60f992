"""Nothing lost, nothing silently wrong: one-line errors (exit 2) before any work, predict
outputs that never collide, never replace what they should not, are locked against a second
writer, and leave nothing half-written after a full disk or Ctrl-C (exit 130)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import TINY_CLI as TINY
from PIL import Image

from patchcore import PatchCore
from patchcore.cli import app
from patchcore.data.synthetic import make_synthetic_dataset
from patchcore.engine.calibration import Calibration
from patchcore.reports import predictions
from patchcore.reports.predictions import OutputError, folder_lock, output_names

runner = CliRunner()


def one_line(result, code: int = 2, *fragments: str) -> str:
    """Assert exit `code` and exactly one line on stderr (containing `fragments`)."""
    assert result.exit_code == code, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One generated category, 6 training and 4 test images, 64 px."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("safety") / "data",
                                  categories=("carpet",), n_train=6, n_test_good=2,
                                  n_test_defect=2, size=64, seed=3)


@pytest.fixture(scope="module")
def model(data, tmp_path_factory):
    """A fitted (calibrated) model folder."""
    out = tmp_path_factory.mktemp("model")
    r = runner.invoke(app, ["-q", "fit", str(data), "-o", str(out), "--no-evaluate", *TINY])
    assert r.exit_code == 0, r.output
    return out / "models" / "carpet"


@pytest.fixture
def images(tmp_path):
    """Inputs whose names would collide if named by stem: a, sub/a, a_1 and b.png + b.jpg."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "sub/a.png", "a_1.png", "b.png", "b.jpg"]):
        Image.new("RGB", (40 + 4 * i, 36), (20 * i, 90, 140)).save(root / name)
    return root


def predict(model, out, *inputs, extra=()):
    return runner.invoke(app, ["-q", "predict", str(model), *map(str, inputs), "-o", str(out),
                               *extra])


# -- options and user mistakes: one line, exit 2, nothing written ------------------------------

@pytest.mark.parametrize("option", [
    ["--max-train", "-1"], ["--max-memory", "-5"], ["--train-val-split", "1.5"],
    ["--num-workers", "-1"], ["--imagesize", "224.5"], ["-p", "0"], ["-p", "1.5"],
    ["--batch-size", "0"], ["--seed", "-3"], ["--sampler", "fastest"], ["--device", "tpu"],
    ["--patchsize", "4"], ["--resize", "16", "--imagesize", "32", "--preprocess", "crop"],
    ["--layout", "zip"], ["-b", "nonet"], ["--tracker", "tensorboard"], ["--no-such-option"],
])
def test_bad_fit_options_are_one_line_before_any_work(data, tmp_path, option):
    out = tmp_path / "out"
    one_line(runner.invoke(app, ["fit", str(data), "-o", str(out), *option]), 2, "error:")
    assert not out.exists()


def test_bad_grid_is_one_line(data, tmp_path):
    r = runner.invoke(app, ["tune", str(data), "-o", str(tmp_path / "t"), "--grid",
                            "percentage=abc", *TINY])
    one_line(r, 2, "error:", "abc")
    assert not (tmp_path / "t").exists()


def test_bad_evaluate_and_predict_options(model, data, tmp_path):
    one_line(runner.invoke(app, ["evaluate", str(model), str(data), "--imagesize", "8"]), 2,
             "imagesize")
    one_line(runner.invoke(app, ["predict", str(model), str(data), "--batch-size", "-1"]), 2,
             "batch")
    one_line(runner.invoke(app, ["explain", str(model), str(data), "--patch", "1;2"]), 2,
             "ROW,COL")
    one_line(runner.invoke(app, ["predict", str(model), str(tmp_path / "none*.png")]), 2,
             "no such file")


def test_broken_model_folder_is_one_line(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("[]")
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    r = runner.invoke(app, ["predict", str(tmp_path / "m"), str(tmp_path / "x.png"), "-o",
                            str(tmp_path / "p")])
    one_line(r, 2, "error:", "not a patchcore model")
    assert not (tmp_path / "p").exists()


def test_output_folder_that_is_a_file_or_read_only(data, model, images, tmp_path):
    """A file as output folder; a read-only one is covered by the faked probe test below
    (chmod does not stop root, which runs CI)."""
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    for out in (afile, afile / "sub"):
        one_line(runner.invoke(app, ["fit", str(data), "-o", str(out), *TINY]), 2, str(out))
        one_line(predict(model, out, images / "a.png"), 2, str(out))
    assert afile.read_text() == "x"


def test_unwritable_output_folder_is_refused_before_work(data, model, images, tmp_path,
                                                         monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(predictions.tempfile, "mkstemp", denied)  # the probe file fails
    for run in (lambda out: runner.invoke(app, ["fit", str(data), "-o", str(out), *TINY]),
                lambda out: predict(model, out, images / "a.png")):
        one_line(run(tmp_path / "new" / "out"), 2, "cannot write to output folder",
                 "read-only file system")
        assert not (tmp_path / "new").exists()


def test_unexpected_errors_keep_their_traceback(data, tmp_path, monkeypatch):
    def bug(self, split):
        raise RuntimeError("a bug")

    monkeypatch.setattr("patchcore.model.PatchCore.fit", bug)
    r = runner.invoke(app, ["-q", "fit", str(data), "-o", str(tmp_path / "o"), *TINY])
    assert isinstance(r.exception, RuntimeError) and r.exit_code == 1


def test_os_errors_are_one_line_naming_the_path(data, tmp_path, monkeypatch):
    def denied(self, path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr("patchcore.model.PatchCore.save", denied)
    r = runner.invoke(app, ["-q", "fit", str(data), "-o", str(tmp_path / "o"), *TINY])
    one_line(r, 2, "error: permission denied", str(tmp_path / "o" / "models" / "carpet"))


# -- predict outputs ---------------------------------------------------------------------------

def test_output_names_never_collide():
    names = output_names(["x/a.png", "x/sub/a.png", "x/a_1.png", "x/b.png", "x/b.jpg",
                          "x/C.png", "x/c.png"])
    assert names == ["a", "sub/a", "a_1", "b.png", "b.jpg", "C.png", "c.png~2"]
    assert output_names(["x/a.png", "x/a.png"]) == ["a.png", "a.png~2"]
    assert output_names(["/data/one/img.png"]) == ["img"]


def test_predict_names_mirror_inputs_without_collisions(model, images, tmp_path):
    out = tmp_path / "p"
    r = predict(model, out, images, images / "a.png")  # a.png twice: scored once
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "predictions.json").read_text())
    assert [r["map"] for r in rows] == ["a_map.npy", "a_1_map.npy", "b.jpg_map.npy",
                                        "b.png_map.npy", "sub/a_map.npy"]
    files = [row[k] for row in rows for k in ("map", "map_image", "overlay")]
    assert len(set(files)) == len(files) and all((out / f).is_file() for f in files)
    for row in rows:  # every overlay belongs to its own input (the inputs differ in width)
        assert Image.open(out / row["overlay"]).size == Image.open(row["path"]).size
    assert not list(out.glob(".patchcore*"))


def test_earlier_outputs_need_overwrite_which_replaces_only_ours(model, images, tmp_path):
    out = tmp_path / "p"
    assert predict(model, out, images).exit_code == 0
    (out / "notes.txt").write_text("mine")
    before = (out / "predictions.json").read_bytes()
    one_line(predict(model, out, images / "b.png"), 2, "already holds predictions",
             "--overwrite")
    assert (out / "predictions.json").read_bytes() == before
    r = predict(model, out, images / "b.png", extra=["--overwrite"])
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "predictions.json").read_text())
    assert [r["map"] for r in rows] == ["b_map.npy"]
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [
        "b_map.npy", "b_map.png", "b_overlay.png", "notes.txt", "predictions.csv",
        "predictions.json"]


def test_files_not_ours_are_never_replaced(model, images, tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    (out / "a_overlay.png").write_text("someone else's")
    for extra in ((), ("--overwrite",)):
        one_line(predict(model, out, images / "a.png", extra=extra), 2, "a_overlay.png",
                 "not written by patchcore")
    assert (out / "a_overlay.png").read_text() == "someone else's"


def test_uncalibrated_predictions_are_never_good(model, images, tmp_path):
    uncalibrated = PatchCore.load(model)
    uncalibrated.calibration_ = Calibration()  # a model without a threshold
    uncalibrated.save(tmp_path / "m")
    out = tmp_path / "p"
    r = runner.invoke(app, ["predict", str(tmp_path / "m"), str(images / "a.png"),
                            str(images / "a_1.png"), "-o", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    printed = [x for x in r.stdout.splitlines() if x.startswith(("good", "anomalous", "unc"))]
    assert len(printed) == 2 and all(x.startswith("uncalibrated") for x in printed)
    rows = json.loads((out / "predictions.json").read_text())
    assert all(r["label"] == "uncalibrated" and r["calibrated_score"] is None for r in rows)
    table = (out / "predictions.csv").read_text().splitlines()[1:]
    assert all(",,uncalibrated," in line for line in table)


# -- one writer at a time ----------------------------------------------------------------------

def test_a_second_writer_gets_one_line(model, images, tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    with folder_lock(out):
        one_line(predict(model, out, images / "a.png"), 2, "in use", f"process {os.getpid()}")
        assert not (out / "predictions.json").exists()
    assert predict(model, out, images / "a.png").exit_code == 0
    assert not (out / predictions.LOCK_FILE).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(model, images, tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    out = tmp_path / "p"
    out.mkdir()
    (out / predictions.LOCK_FILE).write_text(gone)
    assert predict(model, out, images / "a.png").exit_code == 0
    # the O_EXCL fallback (no flock) refuses a live holder and takes over a dead one's lock
    lock = out / predictions.LOCK_FILE
    lock.write_text(str(os.getpid()))
    with pytest.raises(OutputError, match="in use"):
        predictions._acquire_exclusive(lock)
    lock.write_text(gone)
    fd = predictions._acquire_exclusive(lock)
    assert lock.read_text().strip() == str(os.getpid())
    predictions._release(lock, fd)
    assert not lock.exists()


# -- disk full and Ctrl-C ----------------------------------------------------------------------

def failing_after(n: int, exc: BaseException):
    """A write_atomic that writes `n` files, then raises `exc`."""
    real = predictions.write_atomic
    calls = []

    def write(path, data):
        calls.append(path)
        if len(calls) > n:
            raise exc
        real(path, data)
    return write


def test_disk_full_removes_this_runs_files(model, images, tmp_path, monkeypatch):
    monkeypatch.setattr(predictions, "write_atomic",
                        failing_after(4, OSError(errno.ENOSPC, "No space left on device")))
    out = tmp_path / "new" / "p"
    one_line(predict(model, out, images), 2, "no space left on device",
             "removed this run's partial outputs")
    assert not (tmp_path / "new").exists()


def test_disk_full_keeps_earlier_outputs(model, images, tmp_path, monkeypatch):
    out = tmp_path / "p"
    assert predict(model, out, images).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(predictions, "write_atomic",
                        failing_after(7, OSError(errno.ENOSPC, "No space left on device")))
    one_line(predict(model, out, images / "a.png", images / "b.png", extra=["--overwrite"]), 2,
             "no space left")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_ctrl_c_in_predict_leaves_nothing(model, images, tmp_path, monkeypatch):
    monkeypatch.setattr(predictions, "write_atomic", failing_after(2, KeyboardInterrupt()))
    out = tmp_path / "p"
    line = one_line(predict(model, out, images), 130)
    assert line == "interrupted; nothing was written"
    assert not out.exists()


def test_ctrl_c_in_fit_says_what_was_kept(data, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "o"
    monkeypatch.setattr("patchcore.model.PatchCore.fit", interrupt)
    line = one_line(runner.invoke(app, ["-q", "fit", str(data), "-o", str(out), *TINY]), 130)
    assert line == "interrupted; nothing was written" and not out.exists()
    monkeypatch.undo()
    monkeypatch.setattr("patchcore.evaluation.evaluate.evaluate_split", interrupt)
    line = one_line(runner.invoke(app, ["-q", "fit", str(data), "-o", str(out), *TINY]), 130)
    assert line == f"interrupted; kept {out / 'models' / 'carpet'}"


def test_interrupted_overwrite_puts_the_earlier_outputs_back(model, images, tmp_path,
                                                            monkeypatch):
    """Ctrl-C while files are being moved into place: the earlier run's files come back."""
    out = tmp_path / "p"
    assert predict(model, out, images).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real, calls = os.replace, []

    def replace_then_interrupt(src, dst):
        calls.append(dst)
        if len(calls) == 5:  # two files already replaced, the third one half-way
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(predictions.os, "replace", replace_then_interrupt)
    r = predict(model, out, images, extra=["--overwrite"])
    assert r.exit_code == 130
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
