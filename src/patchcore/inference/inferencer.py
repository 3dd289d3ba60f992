"""`Inferencer`: score images with an export folder, without torch, scipy or faiss."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.images import load_image, to_pil_image
from ..data.layouts import image_items
from ..data.preprocess import Preprocessor
from ..engine.calibration import Calibration, labels_for, normalise
from ..engine.scoring import image_scores_from_views
from ..errors import DataError, ModelFileError
from ..prediction import Prediction
from .manifest import Manifest, read_manifest, verify_files
from .runtime import GraphRunner
from .search import DEFAULT_BUDGET_MB, Bank, score_views

log = logging.getLogger(__name__)


def load_bank(path: Path, entry_rows: int, entry_dim: int) -> np.ndarray:
    """The `rows` tensor of a bank file, checked against the manifest's shape."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a readable safetensors bank ({exc})") from None
    rows = tensors.get("rows")
    if rows is None or rows.ndim != 2 or rows.shape != (entry_rows, entry_dim):
        shape = None if rows is None else rows.shape
        raise ModelFileError(f"{path}: bank rows have shape {shape}, the manifest says "
                             f"({entry_rows}, {entry_dim})")
    if rows.dtype not in (np.float32, np.float16) or not np.isfinite(rows).all():
        raise ModelFileError(f"{path}: bank rows must be finite float32 or float16")
    return rows


class Inferencer:
    """Scores images with a folder written by `patchcore export`: the same `Prediction`
    (scores, labels, maps) as `PatchCore.predict`, using only numpy, Pillow, safetensors and
    onnxruntime or OpenVINO.

    `runtime` is auto, onnxruntime or openvino; `precision` f32 or bf16 (OpenVINO only);
    `budget_mb` bounds each block of the nearest-neighbour distance matrix; `verify` checks
    every file's SHA-256 against the manifest.
    """

    def __init__(self, path: str | os.PathLike, runtime: str = "auto", batch_size: int = 8,
                 threads: int | None = None, precision: str = "f32",
                 budget_mb: float = DEFAULT_BUDGET_MB, verify: bool = True) -> None:
        self.manifest: Manifest = read_manifest(path)
        if verify:
            verify_files(self.manifest)
        m = self.manifest
        self.config = m.config
        self.calibration_: Calibration = m.calibration
        self.batch_size = max(1, int(batch_size))
        self.budget_mb = float(budget_mb)
        c = self.config
        # As engine.pipeline.preprocessor: raw [0, 1] views; the graphs normalise per member.
        self.preprocessor = Preprocessor(c.resize, c.imagesize, mean=(0.0, 0.0, 0.0),
                                         std=(1.0, 1.0, 1.0), mode=c.preprocess,
                                         tile_size=c.tile_size, tile_stride=c.tile_stride,
                                         standardize=c.standardize)
        self.banks = [Bank(load_bank(m.folder / e.bank, e.rows, e.dim), c.distance,
                           e.norm if len(m.members) > 1 else None) for e in m.members]
        self.runners = [GraphRunner(m.folder / e.graph, runtime, threads, precision)
                        for e in m.members]
        self.runtime = self.runners[0].runtime
        self.feature_grid = m.members[0].grid

    def features(self, views: np.ndarray) -> list[np.ndarray]:
        """Every member's patch features (V x h x w x D) of raw [0, 1] views."""
        out = []
        for entry, runner in zip(self.manifest.members, self.runners, strict=True):
            parts = [runner.run(views[a : a + self.batch_size])
                     for a in range(0, len(views), self.batch_size)]
            feats = np.concatenate(parts) if len(parts) > 1 else parts[0]
            if feats.shape[1:] != (*entry.grid, entry.dim):
                raise ModelFileError(f"{entry.graph} gives features of shape {feats.shape[1:]}, "
                                     f"the manifest says {(*entry.grid, entry.dim)}")
            out.append(feats)
        return out

    def score_views(self, views: np.ndarray) -> tuple[np.ndarray, ...]:
        """(view scores, maps, patch scores, nearest rows) of raw [0, 1] views."""
        return score_views(self.features(views), self.banks, self.config, self.budget_mb)

    def predict(self, images: Any) -> Prediction:
        """Scores, labels and maps for paths, PIL images, HxWxC arrays or encoded bytes."""
        items = image_items(images)
        pre = self.preprocessor
        paths: list[Path | None] = []
        sizes: list[tuple[int, int]] = []
        groups: list[str] = []
        counts: list[int] = []
        parts: list[tuple[np.ndarray, ...]] = []
        for start in range(0, len(items), self.batch_size):
            views = []
            for k, item in enumerate(items[start : start + self.batch_size]):
                path, pil = self._open(item, start + k)
                v = pre.view_arrays(pil, name=f"image {path}" if path is not None else
                                    f"input image {start + k}")
                views.append(v)
                paths.append(path)
                sizes.append(pil.size)
                groups.append(path.absolute().parent.name if path is not None else "")
                counts.append(len(v))
            parts.append(self.score_views(np.concatenate(views)))
            log.debug("scored images %d-%d", start, start + len(views) - 1)
        view_scores = np.concatenate([p[0] for p in parts])
        scores = image_scores_from_views(view_scores, counts)
        return Prediction(
            paths=paths, scores=scores, calibrated=normalise(scores, self.calibration_, "image"),
            labels=labels_for(scores, self.calibration_),
            maps=np.concatenate([p[1] for p in parts]), sizes=sizes,
            patch_scores=np.concatenate([p[2] for p in parts]),
            nearest=np.concatenate([p[3] for p in parts]),
            true_labels=np.full(len(items), -1), masks=None, groups=groups,
            preprocessor=pre, view_image=np.repeat(np.arange(len(counts)), counts))

    @staticmethod
    def _open(item: Any, k: int) -> tuple[Path | None, Image.Image]:
        if isinstance(item, (str, os.PathLike)):
            return Path(item), load_image(item)
        if item is None:
            raise DataError(f"item {k} of the image list is None")
        return None, to_pil_image(item)


def predict_files(path: str | os.PathLike, files: Sequence[str | os.PathLike],
                  **options: Any) -> Prediction:
    """One-shot: load an export folder and score image files."""
    return Inferencer(path, **options).predict(list(files))
