"""`export_model`: a fitted model as an export folder for `patchcore.inference.Inferencer`.

Per member: the feature graph (ONNX, or OpenVINO IR) and the bank rows (safetensors); beside
them export.json with the hyperparameters, calibration, ensemble norms and every file's
SHA-256 (format in `inference.manifest`). Search, image scores, map upsampling and blur run in
the inferencer's numpy step (`inference.search`), in memory-bounded blocks. The folder is
written next to its destination and swapped in at the end, and checked end to end first:
features and scores of random views must match the torch model's.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..engine import pipeline
from ..engine.pipeline import Member
from ..errors import ModelFileError, NotFittedError
from ..inference.inferencer import Inferencer
from ..inference.manifest import MANIFEST, Manifest, MemberEntry, is_export_folder, write_manifest
from ..model import PatchCore
from .graph import EXPORTERS, FeatureGraph, check_graph, export_onnx, to_openvino

log = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino")
TOLERANCE = 1e-4

__all__ = ["EXPORTERS", "FORMATS", "export_model"]


def _destination(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ModelFileError(f"{output} is a file; choose a new folder for the export")
    if output.is_dir() and any(output.iterdir()):
        if not is_export_folder(output):
            raise ModelFileError(f"{output} exists and is not an export folder (no {MANIFEST}); "
                                 "refusing to replace it: choose a new folder")
        if not overwrite:
            raise ModelFileError(f"{output} already holds an export; pass --overwrite to "
                                 "replace it")


def _member_graph(model: PatchCore, member: Member) -> FeatureGraph:
    """A fresh CPU float32 extractor of the member (seeded: random weights equal the model's)."""
    fresh = Member(member.backbone, member.layers)
    config = model.config.replace(backbone_dtype="float32")
    extractor = pipeline.make_extractor(fresh, config, torch.device("cpu"))
    return FeatureGraph(extractor, extractor.spec.mean, extractor.spec.std)


def _check_scores(model: PatchCore, folder: Path) -> float:
    """Relative difference of exported vs torch view scores and maps on random views."""
    c = model.config
    rng = np.random.default_rng(1)
    views = rng.random((2, 3, c.imagesize, c.imagesize), dtype=np.float32)
    for member in model.members_:
        pipeline.make_extractor(member, c, model.device)
    ref = pipeline.score_batch(model.members_, torch.from_numpy(views), c)
    got = Inferencer(folder, verify=False).score_views(views)
    err = 0.0
    for r, g in zip(ref[:2], got[:2], strict=True):
        err = max(err, float(np.abs(r - g).max() / max(float(np.abs(r).max()), 1e-12)))
    if not err <= TOLERANCE:
        raise ModelFileError(f"exported scores differ from the model's by {err:.2e} (relative, "
                             f"above {TOLERANCE:g}); the export is not faithful")
    return err


def export_model(model: PatchCore | str | os.PathLike, output: str | os.PathLike,
                 format: str = "onnx", exporter: str = "auto", overwrite: bool = False,
                 check: bool = True) -> Path:
    """Export a fitted model (or a model folder) to the folder `output`; returns it.

    `format` is onnx or openvino; `exporter` auto, torchscript or dynamo (see
    `graph.export_onnx`); `check` compares the export's features and scores with the torch
    model's on random views (relative error at most 1e-4) before the folder is kept.
    """
    from safetensors.numpy import save_file

    if format not in FORMATS:
        raise ModelFileError(f"unknown export format {format!r}; choose one of "
                             f"{', '.join(FORMATS)}")
    if not isinstance(model, PatchCore):
        model = PatchCore.load(model, device="cpu", progress=False)
    if not model.members_ or model.members_[0].bank is None:
        raise NotFittedError("this PatchCore model is not fitted: call fit() or load() first")
    output = Path(output)
    _destination(output, overwrite)
    c = model.config
    exact = c.index == "flat" and c.backbone_dtype == "float32"
    if c.index != "flat":
        log.warning("the model searches with an approximate %s index; the export searches "
                    "exactly, so its scores can differ slightly (and be more accurate)", c.index)
    if c.backbone_dtype != "float32":
        log.warning("the model runs its backbone in %s; the exported graph is float32, so its "
                    "scores differ slightly from the model's", c.backbone_dtype)
    tmp = output.parent / f".{output.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        entries = []
        for i, member in enumerate(model.members_):
            bank = member.bank
            assert bank is not None
            graph = _member_graph(model, member)
            onnx_path = tmp / f"member_{i}.onnx"
            used = export_onnx(graph, c.imagesize, onnx_path, exporter)
            graph_path = onnx_path
            if format == "openvino":
                graph_path = tmp / f"member_{i}.xml"
                to_openvino(onnx_path, graph_path)
                onnx_path.unlink()
            if check:
                check_graph(graph, graph_path, c.imagesize, TOLERANCE)
            save_file({"rows": np.ascontiguousarray(bank.features)},
                      str(tmp / f"bank_{i}.safetensors"), metadata={"backbone": bank.backbone})
            extractor = graph.extractor
            entries.append(MemberEntry(
                bank.backbone, tuple(bank.layers), graph_path.name, f"bank_{i}.safetensors",
                len(bank.features), int(bank.features.shape[1]),
                tuple(extractor.feature_grid),
                tuple(float(v) for v in bank.norm) if len(model.members_) > 1 else None))
            log.info("member %d (%s): graph by the %s exporter, bank %d x %d", i,
                     bank.backbone, used, *bank.features.shape)
        files = {p.name: {} for p in tmp.iterdir() if p.is_file()}
        write_manifest(Manifest(tmp, format, c, model.calibration_, tuple(entries), files,
                                __version__))
        if check and exact:  # (the features were checked against a float32 extractor)
            err = _check_scores(model, tmp)
            log.info("exported scores match the model within %.1e", err)
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        if output.exists():
            output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
