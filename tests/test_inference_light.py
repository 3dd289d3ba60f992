"""The light install, for real: a separate venv made by `scripts/install.sh light` (numpy,
Pillow, safetensors, onnxruntime and patchcore without dependencies) has no torch, scipy,
scikit-learn or faiss, and its Inferencer reproduces the torch model's scores and maps."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from patchcore.export import export_model

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "scripts" / "install.sh"

CHECK = r"""
import importlib.util, json, sys
import numpy as np
heavy = [m for m in ("torch", "torchvision", "scipy", "sklearn", "faiss", "timm")
         if importlib.util.find_spec(m) is not None]
assert not heavy, f"the light install has {heavy}"
from patchcore.inference import Inferencer
export, expected = sys.argv[1], np.load(sys.argv[2])
files = json.loads(sys.argv[3])
pred = Inferencer(export).predict(files)
assert "torch" not in sys.modules
def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
errors = {"scores": rel(pred.scores, expected["scores"]), "maps": rel(pred.maps, expected["maps"]),
          "original": max(rel(pred.original_map(i), expected[f"original_{i}"])
                          for i in range(len(files)))}
same_labels = pred.labels.tolist() == expected["labels"].tolist()
print(json.dumps({"errors": errors, "same_labels": same_labels}))
"""


def light_venv() -> Path:
    """The light venv (inside the main venv; rebuilt when the install recipe or the package's
    source changes: it holds a copy of patchcore, not a link to the working tree)."""
    venv = Path(sys.prefix) / "light-inference"
    digest = hashlib.sha256(INSTALL.read_bytes() + (ROOT / "pyproject.toml").read_bytes())
    for path in sorted((ROOT / "src" / "patchcore").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    stamp = venv / ".installed"
    if stamp.is_file() and stamp.read_text() == digest.hexdigest():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # "-": into $PYTHON's environment, exactly as Dockerfile.inference runs it.
    env = {**os.environ, "PYTHON": str(venv / "bin" / "python"), "PATCHCORE_EDITABLE": "0"}
    proc = subprocess.run(["bash", str(INSTALL), "light", "-"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"scripts/install.sh light failed:\n{proc.stderr[-2000:]}"
    stamp.write_text(digest.hexdigest())
    return venv


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PATCHCORE_SKIP_LIGHT_VENV") == "1",
                    reason="PATCHCORE_SKIP_LIGHT_VENV=1 (offline machine)")
def test_light_install_has_no_torch_and_reproduces_the_model(fitted, split, tmp_path):
    folder = export_model(fitted, tmp_path / "export", check=False)
    files = [str(s.path) for s in split.test[:4]]
    pred = fitted.predict(files)
    np.savez(tmp_path / "expected.npz", scores=pred.scores, maps=pred.maps, labels=pred.labels,
             **{f"original_{i}": pred.original_map(i) for i in range(len(files))})
    python = light_venv() / "bin" / "python"
    proc = subprocess.run([str(python), "-c", CHECK, str(folder), str(tmp_path / "expected.npz"),
                           json.dumps(files)], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same_labels"]
    assert all(err <= 1e-4 for err in result["errors"].values()), result
    # torch really is absent: importing it fails in that interpreter.
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True, timeout=60)
    assert probe.returncode != 0


def test_dockerfiles_install_with_the_ci_script_and_run_unprivileged():
    """No Docker daemon in CI: the images must at least use the install CI runs (make install:
    `install.sh full`; the light venv above: `install.sh light -`) and copy files that exist."""
    assert "scripts/install.sh full" in (ROOT / "Makefile").read_text()
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for name, mode in (("Dockerfile", "full"), ("Dockerfile.inference", "light")):
        text = (ROOT / name).read_text()
        assert f"bash scripts/install.sh {mode} -" in text
        assert text.startswith("#") and "FROM python:3.11-slim" in text
        copies = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
        for source in (s for c in copies for s in c):
            assert (ROOT / source).exists(), f"{name} copies missing {source}"
            assert f"!{source}" in ignore or f"!{source}/" in ignore, source
        assert "\nUSER patchcore\n" in text and "useradd" in text and "HEALTHCHECK" in text
    service = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["patchcore", "serve"]' in service and "/healthz" in service
    assert '"patchcore.inference", "/model"' in (ROOT / "Dockerfile.inference").read_text()
