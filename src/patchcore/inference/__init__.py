"""Torch-free scoring of exported models: `Inferencer(folder).predict(images)`.

Needs only numpy, Pillow, safetensors and onnxruntime (or OpenVINO); `patchcore export` writes
the folders (see docs/deploy.md). `python -m patchcore.inference DIR IMAGES...` scores from the
command line where the full `patchcore` command is not installed.
"""

from .inferencer import Inferencer, predict_files
from .manifest import FORMAT_VERSION, MANIFEST, is_export_folder, read_manifest

__all__ = ["FORMAT_VERSION", "MANIFEST", "Inferencer", "is_export_folder", "predict_files",
           "read_manifest"]
