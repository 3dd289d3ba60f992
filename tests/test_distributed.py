"""patchcore.distributed on a local Ray instance started here (one for the whole module)."""

from __future__ import annotations

import csv
import os
import signal
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import FAST, SHARED, TINY, TINY_CLI

from patchcore import PatchCore, RuntimeSettings, load_dataset
from patchcore.errors import ConfigError
from patchcore.evaluation.evaluate import evaluate_split
from patchcore.reports.predictions import OutputError

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install "
                          "'patchcore[ray]')")
from patchcore import distributed  # noqa: E402
from patchcore.distributed.scoring import ResultCollector  # noqa: E402

SETTINGS = RuntimeSettings(device="cpu", batch_size=1, progress=False)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with 2 CPUs, shut down after the module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(fitted, tmp_path_factory):
    return fitted.save(tmp_path_factory.mktemp("dist") / "model")


def _local(model_dir, files, threads=1, batch_size=1):
    """Local predict with the threads of one Ray worker (float sums depend on thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return PatchCore.load(model_dir, progress=False, batch_size=batch_size).predict(files)
    finally:
        torch.set_num_threads(before)


def test_a_dataset_of_encoded_bytes_scores_like_local_files(cluster, model_dir, split, tmp_path):
    """Local files are read by the actors; a Ray Dataset of bytes (URIs, users' own datasets)
    takes the other path through the actors and must give the same scores."""
    files = [s.path for s in split.test][:6]
    local = _local(model_dir, files)
    # Paths that exist nowhere on disk: only the bytes can be scored.
    uris = [f"s3://bucket/part{i}.png" for i in range(len(files))]
    dataset = ray.data.from_items([{"path": u, "bytes": f.read_bytes()}
                                   for u, f in zip(uris, files, strict=True)])
    result = distributed.predict(model_dir, dataset, tmp_path / "out", settings=SETTINGS,
                                 workers=1)
    table = result.table.to_pydict()
    scores = dict(zip(table["path"], table["score"], strict=True))
    assert sorted(scores) == sorted(uris) and set(table["label"]) != {"error"}
    np.testing.assert_array_equal(np.array([scores[u] for u in uris], np.float32),
                                  local.scores)


def _scoring_pids():
    from ray._private import state  # the GCS actor table; the state API needs the dashboard

    return [a["Pid"] for a in state.actors().values()
            if "MapBatches(Scorer)" in a["ActorClassName"] and a["State"] == "ALIVE"]


def test_distributed_predict_equals_local_predict(cluster, model_dir, split, tmp_path):
    files = [s.path for s in split.test]
    local = _local(model_dir, files)
    result = distributed.predict(model_dir, files, tmp_path / "out", settings=SETTINGS,
                                 maps=True, workers=2)
    table = result.table.to_pydict()
    assert table["path"] == [str(f) for f in files]  # input order, each once
    np.testing.assert_array_equal(np.array(table["score"], np.float32), local.scores)
    np.testing.assert_array_equal(np.array(table["calibrated_score"], np.float32),
                                  local.calibrated)
    assert table["label"] == local.label_names and "anomalous" in table["label"]
    for i in (0, len(files) - 1):
        np.testing.assert_array_equal(np.load(tmp_path / "out" / table["map"][i]),
                                      local.original_map(i))
    with open(tmp_path / "out" / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == table["path"]
    assert float(rows[0]["score"]) == pytest.approx(float(local.scores[0]), rel=1e-6)
    # An earlier run is never replaced silently.
    with pytest.raises(OutputError, match="--overwrite"):
        distributed.predict(model_dir, files, tmp_path / "out", settings=SETTINGS)


def test_killed_worker_loses_and_duplicates_nothing(cluster, model_dir, split, tmp_path):
    files = [s.path for s in split.test + split.train]  # 26 images, 26 batches
    bad = tmp_path / "bad.png"  # and one that is no image: an error row, not a failed run
    bad.write_bytes(b"not an image")
    killed: list[int] = []

    def kill_one(rows: int) -> None:
        if not killed:  # after the first results: the other batches are queued or running
            pid = _scoring_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    result = distributed.predict(model_dir, [*files, bad], tmp_path / "out", settings=SETTINGS,
                                 workers=2, on_rows=kill_one)
    assert killed and killed[0] not in _scoring_pids()
    table = result.table.to_pydict()
    assert table["path"] == [*map(str, files), str(bad)]  # each once, in input order
    local = _local(model_dir, files)
    np.testing.assert_array_equal(np.array(table["score"][:-1], np.float32), local.scores)
    assert table["label"][-1] == "error" and "bad.png" in table["error"][-1]
    assert table["score"][-1] is None or np.isnan(table["score"][-1])
    assert set(table["error"][:-1]) == {None} and "1 unreadable" in result.summary


def test_repeated_rows_of_retried_tasks_are_dropped():
    batch = {"path": np.array(["a.png", "b.png"], dtype=object), "score": np.array([1.0, 2.0]),
             "calibrated_score": np.array([0.1, 0.9]), "label": np.array(["good", "anomalous"]),
             "error": np.array(["", ""])}
    again = {k: v[::-1] for k, v in batch.items()}
    collector = ResultCollector(order={"b.png": 0, "a.png": 1})
    assert collector.add(batch) == 2
    assert collector.add(again) == 0
    assert collector.duplicates == 2
    assert collector.rows()["path"] == ["b.png", "a.png"]
    assert collector.rows()["score"] == [2.0, 1.0]
    assert collector.name("s3://bucket/line 3/x.png") == "bucket/line 3/x"
    assert collector.name("/../../etc/passwd") == "etc/passwd"  # never outside the output


def test_sharded_fit_matches_local_fit(cluster, fitted, split, tmp_path):
    model = distributed.fit(split, tmp_path / "model", shards=2, **FAST, progress=False)
    info = model.fit_info_
    assert info["ray"]["shards"] == 2 and info["train_images"] == len(split.train)
    member = info["members"][0]
    assert member["bank_rows"] == len(fitted.members_[0].bank)  # same bank size as local
    assert member["union_rows"] >= 2 * member["bank_rows"] - 2
    local = evaluate_split(fitted, split)[0]["image_auroc"]
    sharded = evaluate_split(model, split)[0]["image_auroc"]
    assert sharded == pytest.approx(local, abs=0.005) and sharded > 0.9
    # Calibrated as a local fit: leave-one-image-out over the training images.
    assert model.calibration_.calibrated
    assert "leave-one-image-out" in model.calibration_.image_threshold_rule
    assert model.calibration_.image_threshold == pytest.approx(
        fitted.calibration_.image_threshold, rel=0.1)
    # Provenance: each bank row is the feature of the training image and grid cell it names.
    bank = model.members_[0].bank
    assert np.all(np.diff(bank.image_index) >= 0)  # feature order (leave-one-out relies on it)
    assert {int(i) for i in bank.image_index} >= {0, len(split.train) - 1}  # both shards
    for row in np.linspace(0, len(bank) - 1, 5).astype(int):
        image, view = model.training_view(int(bank.image_index[row]))
        feats = model.view_features(model.training_path(image))[view]
        r, c = bank.position[row]
        np.testing.assert_allclose(bank.features[row], feats[r, c], rtol=1e-4, atol=1e-4)
    # The folder written is an ordinary model folder.
    loaded = PatchCore.load(tmp_path / "model", progress=False)
    files = [s.path for s in split.test[:4]]
    np.testing.assert_array_equal(loaded.predict(files).scores, model.predict(files).scores)


@pytest.mark.skipif(not (SHARED / "hazelnut_toy").is_dir(),
                    reason="../shared/data/hazelnut_toy is not on this machine")
def test_sharded_fit_on_real_images(cluster):
    """hazelnut_toy (28 train, 23 test images, real EfficientNet-Lite0 weights)."""
    split = load_dataset(SHARED / "hazelnut_toy")
    config = dict(FAST, progress=False, percentage=0.05)
    local = evaluate_split(PatchCore(**config).fit(split), split)[0]["image_auroc"]
    model = distributed.fit(split, shards=2, **config)
    sharded = evaluate_split(model, split)[0]["image_auroc"]
    assert sharded == pytest.approx(local, abs=0.005)


def test_cli_predict_and_fit_with_ray(cluster, model_dir, dataset_root, split, tmp_path):
    from patchcore.cli import app

    runner = CliRunner()
    files = [str(s.path) for s in split.test[:3]]
    out = runner.invoke(app, ["predict", str(model_dir), *files, "-o", str(tmp_path / "p"),
                              "--batch-size", "1", "--device", "cpu", "--ray"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "p" / "predictions.parquet").is_file()
    assert "3 images scored on Ray" in out.output
    out = runner.invoke(app, ["-q", "fit", str(dataset_root / "carpet"), "-o",
                              str(tmp_path / "r"), "--no-evaluate", *TINY_CLI, "-p", "0.2",
                              "--ray"])
    assert out.exit_code == 0, out.output
    model = PatchCore.load(tmp_path / "r" / "models" / "carpet", progress=False)
    assert model.fit_info_["ray"]["shards"] == 2
    assert model.config.backbone == TINY["backbone"]


def test_missing_ray_is_one_line(monkeypatch):
    from patchcore.distributed.cluster import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'patchcore\[ray\]'"):
        require_ray()
