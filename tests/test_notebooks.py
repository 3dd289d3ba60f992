"""The example notebooks run green (on small subsets), are stored without outputs, and the
example shell scripts still work with today's CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import SHARED, TINY_CLI
from nbclient import NotebookClient

from patchcore.data.synthetic import make_synthetic_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
SCRIPTS = ("train_mvtec.sh", "evaluate.sh", "ensemble.sh")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> Path:
    """A jupyter data folder whose "python3" kernel is this interpreter (ipykernel comes with
    the notebooks extra), so that no kernelspec elsewhere on the machine is picked instead."""
    from ipykernel.kernelspec import write_kernel_spec

    folder = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(folder / "kernels" / "python3")
    return folder


def execute(path: Path, work: Path, monkeypatch, jupyter: Path, data: str = ""
            ) -> nbformat.NotebookNode:
    """Run the notebook in examples/ (as a user would) in small mode, outputs under `work`."""
    monkeypatch.setenv("PATCHCORE_EXAMPLES_SMALL", "1")
    monkeypatch.setenv("PATCHCORE_EXAMPLES_WORK", str(work))
    monkeypatch.setenv("PATCHCORE_EXAMPLES_DATA", data)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))  # searched before every other folder
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=240, kernel_name="python3",
                   resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    return book


def test_there_are_the_four_notebooks():
    assert [p.stem for p in NOTEBOOKS] == [
        "01_quickstart", "02_backbone_comparison", "03_ood_groups", "04_tuning"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_stored_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    assert book.metadata.kernelspec.name == "python3"
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    assert any("parameters" in c.metadata.get("tags", []) for c in book.cells)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch, kernels):
    if not (SHARED / "magnetic_tile").is_dir():
        pytest.skip(f"{SHARED} is absent: the generated-data run below covers the notebooks")
    book = execute(path, tmp_path, monkeypatch, kernels)
    text = "\n".join(o.get("text", "") for c in book.cells if c.cell_type == "code"
                     for o in c.outputs)
    assert "using generated" not in text  # the real data was used
    assert not any(o.output_type == "error" for c in book.cells for o in c.get("outputs", []))
    assert (tmp_path / path.stem.split("_", 1)[1]).is_dir()  # outputs went to the work folder


@pytest.mark.slow
def test_notebooks_fall_back_to_generated_data(tmp_path, monkeypatch, kernels):
    """A clone without ../shared: the notebooks generate their own images."""
    book = execute(EXAMPLES / "01_quickstart.ipynb", tmp_path, monkeypatch, kernels,
                   data="generate")
    text = "\n".join(o.get("text", "") for c in book.cells for o in c.get("outputs", []))
    assert "using generated tiles" in text and "reloaded scores match" in text
    if not (SHARED / "magnetic_tile").is_dir():  # CI without ../shared: run the others too
        for path in NOTEBOOKS[1:]:
            execute(path, tmp_path / path.stem, monkeypatch, kernels, data="generate")


# -- example scripts ---------------------------------------------------------------------------

def run_script(name: str, *args: str, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)  # the `patchcore` of this environment
    full_env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                **(env or {})}
    return subprocess.run(["bash", str(EXAMPLES / name), *args], capture_output=True,
                          text=True, env=full_env, timeout=300)


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_explain_themselves(name):
    r = run_script(name, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: examples/" + name)


def test_scripts_say_where_to_get_missing_data(tmp_path):
    r = run_script("train_mvtec.sh", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert r.returncode == 2 and "patchcore download mvtec" in r.stderr


@pytest.mark.slow
def test_scripts_run_on_tiny_data(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", categories=("carpet",), n_train=6,
                                  n_test_good=2, n_test_defect=2, size=48, seed=2)
    i = TINY_CLI.index("-b")  # the scripts take their backbones from the environment
    tiny = TINY_CLI[:i] + TINY_CLI[i + 2:]
    out = tmp_path / "results"
    r = run_script("train_mvtec.sh", str(data), str(out), *tiny, "--no-evaluate",
                   env={"BACKBONE": "resnet18", "LAYERS": "layer2 layer3"})
    assert r.returncode == 0, r.stderr
    assert (out / "models" / "carpet" / "config.json").is_file()
    r = run_script("evaluate.sh", str(out), str(data), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert (out / "reports" / "carpet" / "index.html").is_file()
    assert (out / "segmentation" / "carpet").is_dir() and (out / "scores" / "carpet.csv").is_file()
    r = run_script("ensemble.sh", str(data), str(tmp_path / "ensemble"), *tiny, "-p", "0.5",
                   "--no-evaluate",
                   env={"BACKBONES": "resnet18 resnet18",
                        "LAYERS": "0.layer2 0.layer3 1.layer2 1.layer3"})
    assert r.returncode == 0, r.stderr
    assert "resnet18" in (tmp_path / "ensemble" / "models" / "carpet" / "config.json").read_text()
