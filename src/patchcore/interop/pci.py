"""Import a model folder of amazon-science/patchcore-inspection without executing anything.

patchcore-inspection saves `[PREFIX]nnscorer_search_index.faiss` (the memory bank in a faiss
IndexFlatL2, written with faiss.write_index) and `[PREFIX]patchcore_params.pkl` (a pickled dict:
backbone.name, layers_to_extract_from, input_shape, pretrain_embed_dimension,
target_embed_dimension, patchsize, patchstride, anomaly_scorer_num_nn); ensembles prefix each
member's files with `Ensemble-<i>-<n>_`. The pickle is read by an unpickler that knows no
classes or functions at all, so only plain containers, strings, numbers, booleans and None can
come out of it; anything else (a function reference, a `__reduce__` payload, a numpy array) is
refused before it is built. The faiss file is checked to be a flat L2 index of the size its
header announces before faiss reads it.

Its pipeline is our reference aggregation with the paper's resize + centre crop
(`aggregation="reference"`, `preprocess="crop"`), nearest-neighbour scores averaged over
`anomaly_scorer_num_nn` rows, the image score the largest patch score, maps blurred with sigma 4:
the converted model extracts the same features and searches the same bank rows. One difference
remains: faiss's IndexFlatL2 returns *squared* distances, which patchcore-inspection uses as
scores as they are, whereas our scores are distances; with anomaly_scorer_num_nn=1 our image
score is exactly the square root of theirs (same ranking, same AUROC).
"""

from __future__ import annotations

import io
import logging
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import PatchCoreConfig
from ..engine.bank import MemoryBank
from ..engine.calibration import Calibration
from ..errors import ConfigError, PatchCoreError
from ..storage import ModelState, save_state

log = logging.getLogger(__name__)

PARAMS_FILE = "patchcore_params.pkl"
INDEX_FILE = "nnscorer_search_index.faiss"
MAX_PARAMS_BYTES = 1 << 20  # the real file is ~230 bytes
MAX_INDEX_BYTES = 64 << 30
# patchcore-inspection's backbone names (its backbones.py) -> our registry entries with the same
# architecture and ImageNet weights (its densenet201 is timm's port of torchvision's weights).
BACKBONES = {
    "wideresnet50": "wide_resnet50_2",
    "wideresnet101": "wide_resnet101_2",
    "resnext101": "resnext101_32x8d",
    "resnet50": "resnet50",
    "densenet201": "densenet201",
}
_ENSEMBLE = re.compile(r"^Ensemble-(\d+)-(\d+)_" + re.escape(PARAMS_FILE) + "$")
_FLAT_L2 = b"IxF2"
_FLAT_HEADER = struct.Struct("<4siqqq?iQ")  # fourcc, d, ntotal, 2 dummies, trained, metric, n


class PciImportError(PatchCoreError):
    """A patchcore-inspection folder cannot be converted."""


class _PlainUnpickler(pickle.Unpickler):
    """An unpickler that can build nothing but plain values.

    Dicts, lists, tuples, sets, strings, bytes, numbers, booleans and None come from opcodes;
    every class or function (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*, and hence REDUCE, BUILD,
    NEWOBJ) has to be looked up through `find_class`, which refuses them all but the set and
    frozenset constructors (protocols < 4 write sets as `set([...])`).
    """

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset"):
            return {"set": set, "frozenset": frozenset}[name]
        raise pickle.UnpicklingError(f"it refers to {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it holds a persistent reference")


def read_plain_pickle(path: Path) -> Any:
    """The content of a pickle that holds plain data only; PciImportError for anything else."""
    try:
        size = path.stat().st_size
        if size > MAX_PARAMS_BYTES:
            raise PciImportError(f"{path} is {size} bytes, too large for a parameter file")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PciImportError(f"{path} is missing; is {path.parent} a patchcore-inspection model "
                             "folder?") from None
    try:
        return _PlainUnpickler(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
            MemoryError, RecursionError, struct.error, UnicodeDecodeError) as exc:
        raise PciImportError(f"refusing {path}: {exc}; only plain values (dicts, lists, strings, "
                             "numbers) are read from a parameter pickle, nothing is executed"
                             ) from None


def _need(params: dict, key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    value = params.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise PciImportError(f"{path}: {key!r} is missing or of the wrong type "
                             f"(got {value!r:.60})")
    return value


@dataclass
class PciParams:
    """The settings of one patchcore-inspection model, checked."""

    backbone: str
    layers: tuple[str, ...]
    imagesize: int
    pretrain_embed_dimension: int
    target_embed_dimension: int
    patchsize: int
    patchstride: int
    num_nn: int
    raw: dict[str, Any]


def read_params(path: Path) -> PciParams:
    """patchcore_params.pkl, read safely and checked field by field."""
    params = read_plain_pickle(path)
    if not isinstance(params, dict):
        raise PciImportError(f"{path} holds a {type(params).__name__}, not a parameter dict")
    layers = _need(params, "layers_to_extract_from", (list, tuple), path)
    if not layers or not all(isinstance(x, str) and x for x in layers):
        raise PciImportError(f"{path}: layers_to_extract_from must be a list of layer names")
    shape = _need(params, "input_shape", (list, tuple), path)
    if (len(shape) != 3 or not all(isinstance(s, int) for s in shape) or shape[0] != 3
            or shape[1] != shape[2]):
        raise PciImportError(f"{path}: input_shape {shape!r} is not a square RGB shape (3, S, S)")
    ints = {k: _need(params, k, int, path) for k in (
        "pretrain_embed_dimension", "target_embed_dimension", "patchsize", "patchstride",
        "anomaly_scorer_num_nn")}
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()
             if isinstance(k, str) and isinstance(v, (str, int, float, list, tuple))}
    return PciParams(_need(params, "backbone.name", str, path), tuple(layers), shape[1],
                     ints["pretrain_embed_dimension"], ints["target_embed_dimension"],
                     ints["patchsize"], ints["patchstride"], ints["anomaly_scorer_num_nn"], plain)


def read_bank(path: Path) -> np.ndarray:
    """The rows of a faiss IndexFlatL2 file (N x D float32), after checking its layout."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(_FLAT_HEADER.size)
    except FileNotFoundError:
        raise PciImportError(f"{path} is missing; is {path.parent} a patchcore-inspection model "
                             "folder?") from None
    if len(head) < _FLAT_HEADER.size:
        raise PciImportError(f"{path} is too short to be a faiss index")
    fourcc, d, ntotal, _, _, _, metric, n_values = _FLAT_HEADER.unpack(head)
    if fourcc != _FLAT_L2:
        kind = fourcc.decode("ascii", "replace")
        raise PciImportError(f"{path} is a faiss index of type {kind!r}, not the exact flat L2 "
                             "index (IxF2) patchcore-inspection writes by default; approximate "
                             "indexes keep compressed rows, from which the bank cannot be rebuilt")
    if (d < 1 or ntotal < 1 or metric != 1 or n_values != d * ntotal
            or size != _FLAT_HEADER.size + 4 * d * ntotal or size > MAX_INDEX_BYTES):
        raise PciImportError(f"{path} is damaged: its header (d={d}, rows={ntotal}) does not "
                             f"match its size of {size} bytes")
    import faiss

    index = faiss.read_index(str(path))
    return np.ascontiguousarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)


def find_member(folder: Path, member: int | None) -> tuple[str, int]:
    """(file prefix, ensemble size) of the model to read in `folder`."""
    if (folder / PARAMS_FILE).is_file():
        return "", 1
    found = sorted((int(m[1]), int(m[2])) for p in folder.glob("Ensemble-*_" + PARAMS_FILE)
                   if (m := _ENSEMBLE.match(p.name)))
    if not found:
        raise PciImportError(f"{folder} holds no {PARAMS_FILE}; pass a patchcore-inspection "
                             "model folder (e.g. .../models/mvtec_bottle)")
    n = found[0][1]
    if member is None:
        raise PciImportError(f"{folder} holds an ensemble of {n} models; patchcore-inspection "
                             "combines their scores with min-max normalisation over the test set, "
                             "which a single-image model cannot reproduce: import one member with "
                             f"--member 1..{n}")
    if (member, n) not in found:
        raise PciImportError(f"{folder} has no ensemble member {member} (members 1..{n})")
    return f"Ensemble-{member}-{n}_", n


def convert(folder: str | Path, *, member: int | None = None, backbone: str | None = None,
            resize: int | None = None, pretrained: bool = True, weights: str | None = None,
            seed: int = 0) -> ModelState:
    """A patchcore-inspection model folder as our plain `ModelState` (uncalibrated).

    `backbone` names our registry entry when its own name is not in `BACKBONES`; `resize` is the
    shorter side before the centre crop, which patchcore-inspection does not save (default:
    256 for 224-pixel inputs, as in its published runs, and in the same ratio otherwise).
    `pretrained`/`weights` choose the backbone weights as for `fit`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PciImportError(f"{folder} is not a folder; pass a patchcore-inspection model folder")
    prefix, _ = find_member(folder, member)
    params = read_params(folder / f"{prefix}{PARAMS_FILE}")
    bank = read_bank(folder / f"{prefix}{INDEX_FILE}")
    ours = backbone or BACKBONES.get(params.backbone)
    if ours is None:
        raise PciImportError(f"patchcore-inspection backbone {params.backbone!r} has no known "
                             f"counterpart here (known: {', '.join(sorted(BACKBONES))}); name the "
                             "registry entry with the same architecture and weights with "
                             "--backbone")
    if bank.shape[1] != params.target_embed_dimension:
        raise PciImportError(f"{folder}: the bank has {bank.shape[1]} values per row but "
                             f"target_embed_dimension is {params.target_embed_dimension}")
    size = params.imagesize
    try:
        config = PatchCoreConfig(
            backbone=ours, layers=params.layers, pretrained=pretrained, weights=weights,
            aggregation="reference", preprocess="crop", standardize=False, imagesize=size,
            resize=resize or round(size * 256 / 224),
            pretrain_embed_dimension=params.pretrain_embed_dimension,
            target_embed_dimension=params.target_embed_dimension,
            patchsize=params.patchsize, patchstride=params.patchstride,
            anomaly_scorer_num_nn=params.num_nn, sampler="identity", percentage=1.0,
            distance="euclidean", reweight=False, blur_sigma=4.0, index="flat", seed=seed)
    except ConfigError as exc:
        raise PciImportError(f"{folder}: {exc}") from None
    if params.num_nn > len(bank):
        raise PciImportError(f"{folder}: anomaly_scorer_num_nn={params.num_nn} exceeds the "
                             f"{len(bank)} bank rows")
    grid = _feature_grid(config)
    # No provenance survives in a faiss index: every row points at "image 0, cell (0, 0)" of an
    # empty training list, which storage accepts and `explain` reports as unknown.
    rows = len(bank)
    state = ModelState(
        config, [MemoryBank(ours, params.layers, bank, np.zeros(rows, np.int32),
                            np.zeros((rows, 2), np.int16))], grid, Calibration(), [],
        fit_info={"imported_from": "patchcore-inspection", "source": str(folder.resolve()),
                  "member": prefix.rstrip("_") or None, "params": params.raw,
                  "bank_rows": rows, "provenance": False})
    log.info("converted %s: %s %s, %d bank rows of %d values", folder, ours,
             "+".join(params.layers), rows, bank.shape[1])
    return state


def _feature_grid(config: PatchCoreConfig) -> tuple[int, int]:
    """The patch grid of the first layer at config.imagesize (random weights: shapes only)."""
    import torch

    from ..engine.features import FeatureExtractor

    with torch.random.fork_rng(devices=[]):
        extractor = FeatureExtractor(
            config.backbone if isinstance(config.backbone, str) else config.backbones[0],
            config.layers, pretrained=False, patchsize=config.patchsize,
            patchstride=config.patchstride, imagesize=config.imagesize,
            pretrain_embed_dimension=config.pretrain_embed_dimension,
            target_embed_dimension=config.target_embed_dimension, aggregation="reference")
    return (int(extractor.feature_grid[0]), int(extractor.feature_grid[1]))


def import_pci(folder: str | Path, output: str | Path, *, calibrate: Any = None,
               threshold_fpr: float | None = None, threshold_percentile: float | None = None,
               settings: Any = None, **options: Any) -> Path:
    """Convert a patchcore-inspection folder (see `convert` for `options`) into our model folder
    `output`. Without `calibrate` the model is uncalibrated (labels -1); with a dataset split or
    a list of samples (normal, optionally anomalous), thresholds are set from its scores.
    """
    state = convert(folder, **options)
    output = Path(output)
    if calibrate is None:
        return save_state(state, output)
    from ..model import PatchCore

    model = PatchCore.from_state(state, settings)
    model.calibrate(calibrate, threshold_fpr, threshold_percentile)
    return model.save(output)
