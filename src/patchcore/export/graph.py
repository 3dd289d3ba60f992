"""One member's feature graph (mean/std normalisation + backbone + fused patch-feature step)
written as ONNX or OpenVINO IR, and checked against the torch features."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import BackboneError, ConfigError
from ..inference.runtime import GraphRunner

log = logging.getLogger(__name__)

EXPORTERS = ("auto", "torchscript", "dynamo")
OPSET = 18
MAX_BATCH = 4096


class FeatureGraph(nn.Module):
    """Raw [0, 1] RGB views (B x 3 x S x S) -> patch features (B x h x w x D), as
    `engine.pipeline.member_features` computes them."""

    def __init__(self, extractor: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]
                 ) -> None:
        super().__init__()
        self.extractor = extractor
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features of raw views."""
        return self.extractor((images - self.mean) / self.std)


def _export_torchscript(graph: FeatureGraph, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer notes: the result is checked
        torch.onnx.export(graph, (example,), str(path), input_names=["images"],
                          output_names=["features"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})


def _export_dynamo(graph: FeatureGraph, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), str(path), input_names=["images"],
                          output_names=["features"], opset_version=OPSET, dynamo=True,
                          dynamic_shapes=({0: batch},), external_data=False, verbose=False)


def export_onnx(graph: FeatureGraph, imagesize: int, path: Path, exporter: str = "auto") -> str:
    """Write `graph` as an ONNX file with a dynamic batch axis; returns the exporter used.

    `auto` tries the TorchScript tracer (about a second) and falls back to the dynamo exporter
    (torch.export + onnxscript, slower) for graphs the tracer cannot express (e.g. timm ViTs'
    antialiased position-embedding resize).
    """
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    example = torch.rand(2, 3, imagesize, imagesize, generator=torch.Generator().manual_seed(0))
    graph.eval()
    if exporter in ("auto", "torchscript"):
        try:
            _export_torchscript(graph, example, path)
            return "torchscript"
        except Exception as exc:  # the tracer raises many types for unsupported operators
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            if exporter == "torchscript":
                raise BackboneError(f"the TorchScript exporter cannot export this backbone "
                                    f"({first}); use --exporter dynamo") from None
            log.info("TorchScript exporter failed (%s); using the dynamo exporter", first)
            path.unlink(missing_ok=True)
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise ConfigError("this backbone needs the dynamo ONNX exporter, which needs "
                          "onnxscript: pip install 'patchcore[export]'") from None
    try:
        _export_dynamo(graph, example, path)
    except Exception as exc:  # torch.export / onnxscript failures
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise BackboneError(f"this backbone cannot be exported to ONNX ({first})") from None
    return "dynamo"


def to_openvino(onnx_path: Path, xml_path: Path) -> None:
    """Convert an ONNX graph to OpenVINO IR (.xml + .bin), weights kept in float32."""
    try:
        import openvino as ov
    except ImportError:
        raise ConfigError("--format openvino needs OpenVINO: pip install openvino") from None
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)


def check_graph(graph: FeatureGraph, path: Path, imagesize: int, tolerance: float = 1e-4
                ) -> float:
    """Relative error (max |difference| / max |torch|) of the exported graph's features on
    two random views, per the runtime that reads the file; BackboneError above `tolerance`."""
    rng = np.random.default_rng(0)
    images = rng.random((2, 3, imagesize, imagesize), dtype=np.float32)
    with torch.inference_mode():
        ref = graph(torch.from_numpy(images)).numpy()
    runner = GraphRunner(path, "openvino" if path.suffix == ".xml" else "auto")
    out = runner.run(images)
    if out.shape != ref.shape:
        raise BackboneError(f"the exported graph gives features of shape {out.shape}, torch "
                            f"{ref.shape}")
    err = float(np.abs(out - ref).max() / max(float(np.abs(ref).max()), 1e-12))
    if not err <= tolerance:
        raise BackboneError(f"the exported graph's features differ from torch's by {err:.2e} "
                            f"(relative, above {tolerance:g}); the export is not faithful")
    log.info("%s: features match torch within %.1e (%s)", path.name, err, runner.runtime)
    return err
