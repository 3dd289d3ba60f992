"""Graph runtimes of an export: onnxruntime or OpenVINO, each behind `run(images) -> features`."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ModelFileError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "onnxruntime", "openvino")
PRECISIONS = ("f32", "bf16")  # OpenVINO inference precision (onnxruntime: always f32)


def available(runtime: str) -> bool:
    """Whether the Python package of `runtime` is installed."""
    return importlib.util.find_spec(runtime) is not None


def pick_runtime(runtime: str, graph: Path) -> str:
    """The runtime to use for `graph` (`auto`: onnxruntime for .onnx when installed, else
    OpenVINO); ConfigError with the install command when it is missing."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "auto":
        if graph.suffix == ".xml" or not available("onnxruntime"):
            runtime = "openvino"
        else:
            runtime = "onnxruntime"
    if runtime == "onnxruntime" and graph.suffix != ".onnx":
        raise ConfigError(f"{graph.name} is an OpenVINO graph: use runtime openvino")
    if not available(runtime):
        raise ConfigError(f"the {runtime} runtime is not installed: pip install {runtime}")
    return runtime


class GraphRunner:
    """One member's feature graph: raw [0, 1] views (B x 3 x S x S) -> features (B x h x w x D)."""

    def __init__(self, graph: Path, runtime: str = "auto", threads: int | None = None,
                 precision: str = "f32") -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r}; choose one of "
                              f"{', '.join(PRECISIONS)}")
        self.runtime = pick_runtime(runtime, graph)
        self.precision = precision if self.runtime == "openvino" else "f32"
        try:
            if self.runtime == "onnxruntime":
                import onnxruntime as ort

                options = ort.SessionOptions()
                if threads:
                    options.intra_op_num_threads = int(threads)
                options.log_severity_level = 3
                # Idle pool threads must not spin: the numpy search runs right after each call
                # and would share the cores with them (measured 4x slower scoring on 2 cores).
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                # No arena: activations are freed after each run instead of staying reserved
                # on top of the search's memory (peak 1.19 -> 0.9 GB, batch 32, 50k-row bank).
                options.enable_cpu_mem_arena = False
                self.session = ort.InferenceSession(str(graph), options,
                                                    providers=["CPUExecutionProvider"])
                self.input_name = self.session.get_inputs()[0].name
            else:
                import openvino as ov

                core = ov.Core()
                config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
                if threads:
                    config["INFERENCE_NUM_THREADS"] = int(threads)
                self.compiled = core.compile_model(core.read_model(str(graph)), "CPU", config)
                self.request = self.compiled.create_infer_request()
        except (ConfigError, ImportError):
            raise
        except Exception as exc:  # runtimes raise their own types for unreadable graphs
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFileError(f"{graph}: {self.runtime} cannot load this graph ({first[:200]})"
                                 ) from None
        log.debug("%s: %s runtime", graph.name, self.runtime)

    def run(self, images: np.ndarray) -> np.ndarray:
        """Patch features (float32) of a batch of views."""
        x = np.ascontiguousarray(images, dtype=np.float32)
        if self.runtime == "onnxruntime":
            out = self.session.run(None, {self.input_name: x})[0]
        else:
            out = self.request.infer({0: x})[self.compiled.output(0)]
        return np.asarray(out, dtype=np.float32)
