"""Memory-flat fit: features past the budget go to disk, with the same model as in RAM."""

from __future__ import annotations

import numpy as np
from conftest import FAST

from patchcore import PatchCore
from patchcore.engine.memory import FeatureStore


def test_disk_store_matches_ram_store(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(1000, 7)).astype(np.float32)
    ram = FeatureStore(1000, 7)
    disk = FeatureStore(1000, 7, max_memory_mb=0.001, tmpdir=str(tmp_path))
    assert disk.on_disk and not ram.on_disk
    for start in range(0, 1000, 96):
        ram.append(data[start : start + 96])
        disk.append(data[start : start + 96])
    np.testing.assert_array_equal(disk[100:300], data[100:300])
    idx = rng.choice(1000, 50, replace=False)
    np.testing.assert_array_equal(disk.gather(idx, chunk=128), data[np.sort(idx)])
    np.testing.assert_array_equal(ram.gather(idx), data[np.sort(idx)])
    disk.close()
    assert list(tmp_path.iterdir()) == []


def test_fit_past_the_memory_budget_gives_the_same_model(split):
    kwargs = dict(FAST, calibration_holdout=0.0, seed=4)
    ram = PatchCore(**kwargs)
    disk = PatchCore(**kwargs, max_memory_mb=0.5)
    ram.progress = disk.progress = False
    ram.fit(split.train[:6])
    disk.fit(split.train[:6])
    assert disk.fit_info_["members"][0]["features_on_disk"]
    assert not ram.fit_info_["members"][0]["features_on_disk"]
    np.testing.assert_array_equal(ram.members_[0].bank.features, disk.members_[0].bank.features)
    np.testing.assert_array_equal(ram.members_[0].bank.image_index,
                                  disk.members_[0].bank.image_index)
