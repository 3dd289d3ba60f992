"""`patchcore import-pci`: patchcore-inspection folders converted without executing anything."""

from __future__ import annotations

import os
import pickle

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

from patchcore import PatchCore, load_dataset
from patchcore.cli import app
from patchcore.data.synthetic import make_synthetic_dataset
from patchcore.interop import PciImportError, convert, import_pci, read_plain_pickle

# patchcore-inspection's pipeline in our terms, small: random-weight ResNet-50 at 64 px.
PCI_LIKE = dict(backbone="resnet50", layers=("layer2", "layer3"), pretrained=False,
                aggregation="reference", preprocess="crop", standardize=False, resize=72,
                imagesize=64,
                pretrain_embed_dimension=64, target_embed_dimension=32, sampler="random",
                percentage=0.5, device="cpu", progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("pci"), n_train=6, n_test_good=3,
                                  n_test_defect=3, size=72, seed=3)
    return load_dataset(root / "carpet")


@pytest.fixture(scope="module")
def original(data) -> PatchCore:
    return PatchCore(**PCI_LIKE).fit(data.train)


def write_pci_folder(folder, model: PatchCore, k: int = 1, prefix: str = "",
                     backbone: str = "resnet50"):
    """A model folder as patchcore-inspection's save_to_path writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    bank = model.members_[0].bank.features
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    faiss.write_index(index, str(folder / f"{prefix}nnscorer_search_index.faiss"))
    params = {"backbone.name": backbone, "layers_to_extract_from": ["layer2", "layer3"],
              "input_shape": (3, 64, 64), "pretrain_embed_dimension": 64,
              "target_embed_dimension": 32, "patchsize": 3, "patchstride": 1,
              "anomaly_scorer_num_nn": k}
    with open(folder / f"{prefix}patchcore_params.pkl", "wb") as fh:
        pickle.dump(params, fh, pickle.HIGHEST_PROTOCOL)
    return folder


def pci_image_scores(folder, model: PatchCore, paths, k: int) -> np.ndarray:
    """patchcore-inspection's scoring on our features: mean of the k squared L2 distances that
    its faiss IndexFlatL2 returns, largest over the patches."""
    index = faiss.read_index(str(folder / "nnscorer_search_index.faiss"))
    out = []
    for p in paths:
        feats = model.view_features(p)[0]
        dist, _ = index.search(feats.reshape(-1, feats.shape[-1]), k)
        out.append(dist.mean(axis=1).max())
    return np.array(out)


@pytest.mark.parametrize("k", [1, 3])
def test_converted_model_scores_exactly_like_the_model_it_came_from(data, original, tmp_path,
                                                                    k):
    pci = write_pci_folder(tmp_path / "pci", original, k=k)
    path = import_pci(pci, tmp_path / "model", pretrained=False, resize=72)
    converted = PatchCore.load(path, device="cpu", progress=False)
    cfg = converted.config
    assert (cfg.aggregation, cfg.preprocess, cfg.standardize, cfg.resize, cfg.imagesize,
            cfg.anomaly_scorer_num_nn, cfg.layers) == ("reference", "crop", False, 72, 64, k,
                                                       ("layer2", "layer3"))
    reference = PatchCore(**{**PCI_LIKE, "anomaly_scorer_num_nn": k})
    reference.members_, reference.feature_grid_ = original.members_, original.feature_grid_
    paths = [s.path for s in data.test]
    ours, theirs = converted.predict(paths), reference.predict(paths)
    np.testing.assert_array_equal(ours.scores, theirs.scores)
    np.testing.assert_array_equal(ours.maps, theirs.maps)
    assert list(ours.labels) == [-1] * len(paths)  # no calibration in a pci folder
    if k == 1:  # our distance is the square root of faiss's squared L2 score, nothing else
        pci_scores = pci_image_scores(pci, converted, paths, k)
        np.testing.assert_allclose(ours.scores, np.sqrt(pci_scores), rtol=1e-5)
        assert np.array_equal(np.argsort(ours.scores), np.argsort(pci_scores))


def _pickle_file(tmp_path, payload: bytes):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "patchcore_params.pkl").write_bytes(payload)
    (folder / "nnscorer_search_index.faiss").write_bytes(b"")
    return folder


class _Reduce:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Opens:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("make", [
    lambda m: pickle.dumps({"backbone.name": os.system}),
    lambda m: pickle.dumps({"backbone.name": "resnet50", "x": _Reduce(m)}, protocol=2),
    lambda m: pickle.dumps([_Opens(m)], protocol=pickle.HIGHEST_PROTOCOL),
    lambda m: f"(S'touch {m}'\nios\nsystem\n.".encode(),  # protocol 0 INST opcode
    lambda m: pickle.dumps({"input_shape": np.array([3, 64, 64])}),
], ids=["function-reference", "reduce-os-system", "reduce-open", "inst-opcode", "numpy-array"])
def test_pickles_with_code_are_refused_and_nothing_runs(tmp_path, make):
    marker = tmp_path / "executed"
    folder = _pickle_file(tmp_path, make(marker))
    with pytest.raises(PciImportError, match="refusing .*patchcore_params.pkl: it refers to "
                                              r".*nothing is executed"):
        convert(folder)
    assert not marker.exists()
    r = CliRunner().invoke(app, ["-q", "import-pci", str(folder), "-o", str(tmp_path / "m")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "refusing" in r.output
    assert not marker.exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_plain_pickle_values_come_through(tmp_path, protocol):
    value = {"a": [1, 2.5, "x", None, True], "b": (3, 4), "c": {"d": -3, 7: {1, 2}},
             "e": frozenset({"x"})}
    if protocol >= 3:
        value["f"] = b"raw"
    (tmp_path / "p.pkl").write_bytes(pickle.dumps(value, protocol))
    assert read_plain_pickle(tmp_path / "p.pkl") == value


def test_faiss_files_other_than_a_flat_l2_index_are_refused(original, tmp_path):
    pci = write_pci_folder(tmp_path / "pci", original)
    index_file = pci / "nnscorer_search_index.faiss"
    ip = faiss.IndexFlatIP(32)
    ip.add(np.ones((4, 32), np.float32))
    faiss.write_index(ip, str(index_file))
    with pytest.raises(PciImportError, match="type 'IxFI', not the exact flat L2"):
        convert(pci, pretrained=False)
    write_pci_folder(pci, original)
    index_file.write_bytes(index_file.read_bytes()[:-8])
    with pytest.raises(PciImportError, match="damaged: its header"):
        convert(pci, pretrained=False)


def test_ensemble_folders_and_unknown_backbones(original, tmp_path):
    folder = tmp_path / "ens"
    for i in (1, 2):
        write_pci_folder(folder, original, prefix=f"Ensemble-{i}-2_", backbone="vgg11")
    with pytest.raises(PciImportError, match="ensemble of 2 models.*--member 1..2"):
        convert(folder)
    with pytest.raises(PciImportError, match="'vgg11' has no known counterpart.*--backbone"):
        convert(folder, member=2)
    state = convert(folder, member=2, backbone="resnet50", pretrained=False)
    assert state.fit_info["member"] == "Ensemble-2-2" and len(state.banks[0]) == len(
        original.members_[0].bank)
    with pytest.raises(PciImportError, match="no ensemble member 3"):
        convert(folder, member=3)


def test_cli_imports_and_calibrates_on_given_data(data, original, tmp_path):
    pci = write_pci_folder(tmp_path / "pci", original)
    out = tmp_path / "model"
    r = CliRunner().invoke(app, ["-q", "import-pci", str(pci), "-o", str(out),
                                 "--random-weights", "--resize", "72", "--device", "cpu",
                                 "--calibrate", str(data.root)])
    assert r.exit_code == 0, r.output
    model = PatchCore.load(out, device="cpu", progress=False)
    assert model.calibration_.calibrated
    assert set(model.predict([s.path for s in data.test]).labels) <= {0, 1}
