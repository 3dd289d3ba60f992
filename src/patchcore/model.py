"""The PatchCore estimator: `fit` on normal images, `predict` scores and maps, `save` / `load`."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import PatchCoreConfig, RuntimeSettings, split_overrides
from .data.images import to_pil_image
from .data.layouts import DatasetSplit, Sample, image_items, load_dataset
from .data.loader import Batch, as_samples, batches
from .data.preprocess import Preprocessor
from .engine import pipeline
from .engine.bank import bank_index
from .engine.calibration import (
    MIN_CALIBRATION_IMAGES,
    Calibration,
    calibrate,
    holdout_split,
    labels_for,
    normalise,
)
from .engine.features import resolve_device
from .engine.index import set_search_threads
from .engine.pipeline import Member
from .engine.scoring import image_scores_from_views
from .errors import ConfigError, DataError, NotFittedError
from .prediction import Prediction
from .storage import ModelState, load_state, save_state

log = logging.getLogger(__name__)

ImageInput = str | Path | Sample | Image.Image | np.ndarray | bytes

__all__ = ["ImageInput", "PatchCore", "Prediction"]


class PatchCore:
    """PatchCore anomaly detector (Roth et al., 2022).

    Hyperparameters (`config`, saved with the model) and runtime settings (`settings`: device,
    batch size, workers, memory budget, progress bars) go in the constructor; keyword arguments
    of either kind are accepted too. `fit` learns the memory bank(s) and calibration; learned
    attributes end with an underscore.
    """

    def __init__(
        self, config: PatchCoreConfig | None = None, settings: RuntimeSettings | None = None,
        **overrides: Any,
    ) -> None:
        hyper, runtime = split_overrides(overrides)
        config = config or PatchCoreConfig()
        self.config = config.replace(**hyper) if hyper else config
        settings = settings or RuntimeSettings()
        self.settings = settings.replace(**runtime) if runtime else settings
        self.members_: list[Member] = []
        self.calibration_ = Calibration()
        self.train_paths_: list[str] = []  # relative to train_root_ when that is known
        self.train_root_: str | None = None
        self.train_sizes_: list[tuple[int, int]] = []  # (W, H) of each training image
        self.feature_grid_: tuple[int, int] | None = None
        self.fit_info_: dict[str, Any] = {}
        self.calibration_prediction_: Prediction | None = None

    # -- set-up -----------------------------------------------------------------------------

    @property
    def progress(self) -> bool:
        """Whether progress bars are shown."""
        return self.settings.progress

    @progress.setter
    def progress(self, value: bool) -> None:
        self.settings = self.settings.replace(progress=bool(value))

    @property
    def device(self) -> torch.device:
        """The torch device in use (resolved from settings.device)."""
        return resolve_device(self.settings.device)

    @property
    def preprocessor(self) -> Preprocessor:
        """Views (`config.preprocess`) as [0, 1] RGB tensors; each member normalises on its own."""
        return pipeline.preprocessor(self.config)

    def _ready(self) -> list[Member]:
        """Fitted members with their feature extractors built."""
        if not self.members_ or self.members_[0].bank is None:
            raise NotFittedError("this PatchCore model is not fitted: call fit() or load() first")
        for member in self.members_:
            pipeline.make_extractor(member, self.config, self.device)
        if self.device.type == "cpu":
            set_search_threads(torch.get_num_threads())
        return self.members_

    def training_view(self, v: int) -> tuple[int, int]:
        """(training image, view of that image) of bank provenance view `v`."""
        starts = self._view_starts()
        if starts is None:
            return v, 0  # one view per image (and models saved before views existed)
        image = int(_images_of(np.array([v]), starts)[0])
        return image, v - int(starts[image])

    def training_images(self, views: np.ndarray) -> np.ndarray:
        """The training image of each bank provenance view in `views` (int64 array)."""
        views = np.asarray(views, dtype=np.int64)
        starts = self._view_starts()
        return views if starts is None else _images_of(views, starts)

    def _view_starts(self) -> np.ndarray | None:
        """First view of each training image, then the total (None: one view per image)."""
        pre = self.preprocessor
        if not self.train_sizes_ or pre.mode in ("crop", "square"):
            return None
        counts = [pre.num_views(size) for size in self.train_sizes_]
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def training_path(self, i: int) -> Path:
        """The file of training image `i` (bank provenance), resolved against `train_root_`."""
        if not 0 <= i < len(self.train_paths_):
            raise DataError(f"training image index {i} is out of range (the model has "
                            f"{len(self.train_paths_)} training paths)")
        path = Path(self.train_paths_[i])
        return path if path.is_absolute() or self.train_root_ is None else Path(
            self.train_root_) / path

    # -- fit --------------------------------------------------------------------------------

    def fit(
        self,
        train: DatasetSplit | str | Path | Iterable[str | Path | Sample],
        val: Iterable[str | Path | Sample] | None = None,
    ) -> PatchCore:
        """Build the memory bank(s) from normal training images and calibrate thresholds.

        `train` is a DatasetSplit (its validation images are used when `val` is None), a dataset
        category folder, or image paths. Without validation images, thresholds come from
        leave-one-image-out scores of the training images (every image stays in the bank), or,
        with `calibration_holdout` > 0, from that share of the images held out of the bank.
        """
        self.config = pipeline.with_fitted_tiles(self.config)
        c = self.config
        train_samples, val_samples = training_samples(train, val, c)
        torch.manual_seed(c.seed)
        self.members_ = pipeline.parse_members(c.backbone, c.layers)
        self.train_root_, self.train_paths_ = relative_paths(train_samples)
        info: dict[str, Any] = {"train_images": len(train_samples),
                                "calibration_images": len(val_samples), "members": []}
        sizes: list[tuple[int, int]] = []
        for m, member in enumerate(self.members_):
            info["members"].append(pipeline.fit_member(
                member, train_samples, c, self.settings, self.device, c.seed + m,
                sizes=sizes if m == 0 else None))
        self.train_sizes_ = [(int(w), int(h)) for w, h in sizes]
        self.feature_grid_ = self.members_[0].extractor.feature_grid
        pipeline.set_ensemble_norms(self.members_, c.seed)
        self.fit_info_ = info
        self.calibrate_from(train_samples, val_samples)
        return self

    def calibrate_from(self, train_samples: Sequence[Sample], val_samples: Sequence[Sample]
                       ) -> None:
        """Thresholds as `fit` sets them: from validation images when there are any, else from
        leave-one-image-out scores of the training images (all of them in the bank); too few
        images leave the model uncalibrated (labels -1)."""
        c = self.config
        self.calibration_ = Calibration()
        self.calibration_prediction_ = None
        if val_samples:
            self.calibrate(val_samples, threshold_fpr=c.threshold_fpr,
                           threshold_percentile=c.threshold_percentile)
        elif len(train_samples) >= MIN_CALIBRATION_IMAGES:
            scores, maps = pipeline.leave_one_out(self._ready(), train_samples, c,
                                                  self.settings, self.train_sizes_)
            self.calibration_ = calibrate(scores, maps, np.zeros(len(scores), dtype=int), None,
                                          c.threshold_fpr, c.threshold_percentile, c.seed)
            self.calibration_.image_threshold_rule += (
                f" (leave-one-image-out scores of {len(scores)} training images)")
        else:
            log.warning("%d training image(s) and no validation set: too few to calibrate a "
                        "threshold; predictions will be labelled 'uncalibrated'",
                        len(train_samples))

    # -- scoring ----------------------------------------------------------------------------

    def score(
        self, samples: Sequence[Sample], masks: bool = False, desc: str = "scoring"
    ) -> Prediction:
        """Score samples from disk (with ground-truth masks when `masks`)."""
        members = self._ready()
        s = self.settings
        parts = []
        for batch in tqdm(
            batches(samples, self.preprocessor, s.batch_size, masks=masks,
                    num_workers=s.num_workers),
            total=-(-len(samples) // s.batch_size), desc=desc, unit="batch",
            disable=not s.progress, leave=False,
        ):
            parts.append(self._score_views(members, batch))
        return self._assemble(parts)

    def _score_views(self, members: list[Member], batch: Batch) -> tuple:
        chunk = self.settings.batch_size
        pieces = [pipeline.score_batch(members, batch.images[a : a + chunk], self.config)
                  for a in range(0, len(batch.images), chunk)]
        return (batch, *(np.concatenate([p[k] for p in pieces]) for k in range(4)))

    def _assemble(self, parts: list[tuple]) -> Prediction:
        if not parts:
            raise DataError("no images to score")
        batches_: list[Batch] = [p[0] for p in parts]
        counts = np.array([c for b in batches_ for c in b.view_counts])
        view_scores = np.concatenate([p[1] for p in parts])
        scores = image_scores_from_views(view_scores, counts)
        return Prediction(
            paths=[p for b in batches_ for p in b.paths],
            scores=scores,
            calibrated=normalise(scores, self.calibration_, "image"),
            labels=labels_for(scores, self.calibration_),
            maps=np.concatenate([p[2] for p in parts]),
            sizes=[s for b in batches_ for s in b.sizes],
            patch_scores=np.concatenate([p[3] for p in parts]),
            nearest=np.concatenate([p[4] for p in parts]),
            true_labels=np.array([lab for b in batches_ for lab in b.labels]),
            masks=([m for b in batches_ for m in b.masks]
                   if batches_[0].masks is not None else None),
            groups=[g for b in batches_ for g in b.groups],
            preprocessor=self.preprocessor,
            view_image=np.repeat(np.arange(len(counts)), counts),
        )

    def predict(self, images: ImageInput | Sequence[ImageInput]) -> Prediction:
        """Scores, labels and anomaly maps for paths, Samples, PIL images or HxWxC arrays."""
        members = self._ready()
        items = image_items(images)
        if all(isinstance(x, (str, os.PathLike, Sample)) for x in items):
            return self.score(as_samples(items), desc="predict")
        pre = self.preprocessor
        parts = []
        bs = self.settings.batch_size
        for start in range(0, len(items), bs):
            pil = [to_pil_image(x) for x in items[start : start + bs]]
            views = [pre.views(p, name=f"input image {start + k}") for k, p in enumerate(pil)]
            batch = Batch(torch.cat(views), [None] * len(pil), [p.size for p in pil],
                          [-1] * len(pil), [""] * len(pil), None, [len(v) for v in views])
            parts.append(self._score_views(members, batch))
        return self._assemble(parts)

    def patch_features(self, image: ImageInput) -> np.ndarray:
        """Patch features (h x w x D) of one image's first view from the first member."""
        return self.view_features(image)[0]

    def view_features(self, image: ImageInput) -> np.ndarray:
        """Patch features (V x h x w x D) of every view of one image from the first member."""
        member = self._ready()[0]
        pil = to_pil_image(image.path if isinstance(image, Sample) else image)
        views = self.preprocessor.views(pil, name="input image")
        return pipeline.member_features(member, views, self.settings.batch_size)

    # -- calibration ------------------------------------------------------------------------

    def calibrate(
        self, samples: Sequence[Sample], threshold_fpr: float | None = None,
        threshold_percentile: float | None = None,
    ) -> Calibration:
        """Thresholds and score ranges from validation samples (normal, optionally anomalous).

        See `engine.calibration.calibrate` for the rules. The calibration Prediction is kept in
        `calibration_prediction_`.
        """
        samples = as_samples(samples)
        has_masks = any(s.mask is not None for s in samples)
        pred = self.score(samples, masks=has_masks, desc="calibration")
        self.calibration_prediction_ = pred
        labels = np.array([max(s.label, 0) for s in samples])
        self.calibration_ = calibrate(pred.scores, pred.original_maps(), labels,
                                      pred.masks if has_masks else None, threshold_fpr,
                                      threshold_percentile, self.config.seed)
        return self.calibration_

    # -- persistence ------------------------------------------------------------------------

    def state(self) -> ModelState:
        """The plain state that `save` writes."""
        if not self.members_ or self.members_[0].bank is None:
            raise NotFittedError("this PatchCore model is not fitted: call fit() or load() first")
        return ModelState(self.config, [m.bank for m in self.members_], self.feature_grid_,
                          self.calibration_, list(self.train_paths_), self.train_root_,
                          dict(self.fit_info_), list(self.train_sizes_))

    @classmethod
    def from_state(cls, state: ModelState, settings: RuntimeSettings | None = None,
                   **runtime: Any) -> PatchCore:
        """A ready-to-score model from a plain state (indexes are rebuilt)."""
        model = cls(state.config, settings, **runtime)
        banks = state.banks
        if model.config.anomaly_scorer_num_nn > min(len(b) for b in banks):
            raise ConfigError(
                f"anomaly_scorer_num_nn={model.config.anomaly_scorer_num_nn} is larger than the "
                f"memory bank ({min(len(b) for b in banks)} rows)")
        model.members_ = [Member(b.backbone, b.layers, bank=b,
                                 index=bank_index(b.features, model.config, model.device))
                          for b in banks]
        model.feature_grid_ = tuple(state.feature_grid)
        model.calibration_ = state.calibration
        model.train_paths_ = list(state.train_paths)
        model.train_root_ = state.train_root
        model.train_sizes_ = [tuple(s) for s in state.train_sizes]
        model.fit_info_ = dict(state.fit_info)
        return model

    def save(self, path: str | Path) -> Path:
        """Write the model folder (config.json + memory_bank.safetensors) atomically."""
        return save_state(self.state(), Path(path))

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, **runtime: Any) -> PatchCore:
        """Read a model folder written by `save`; nothing executable is loaded."""
        if device is not None:
            runtime["device"] = device
        return cls.from_state(load_state(Path(path)), **runtime)


def _images_of(views: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Training image of each provenance view, from each image's first view (`starts`)."""
    if views.size and (views.min() < 0 or views.max() >= starts[-1]):
        raise DataError("the memory bank names a view beyond this model's training images; "
                        "the model file is inconsistent")
    return np.searchsorted(starts, views, side="right") - 1


def training_samples(
    train: DatasetSplit | str | Path | Iterable[str | Path | Sample],
    val: Iterable[str | Path | Sample] | None, config: PatchCoreConfig,
) -> tuple[list[Sample], list[Sample]]:
    """(bank images, calibration images) as `PatchCore.fit` takes them from its arguments: a
    split's validation images, or a `calibration_holdout` share of the training images."""
    if isinstance(train, (str, Path)) and Path(train).is_dir():
        train = load_dataset(train)
    if isinstance(train, DatasetSplit):
        val = train.val if val is None else val
        train = train.train
    train_samples = as_samples(train)
    val_samples = as_samples(val) if val is not None else []
    if not train_samples:
        raise DataError("no training images were given")
    if not val_samples:
        train_samples, val_samples = holdout_split(train_samples, config.calibration_holdout,
                                                   config.seed)
        if val_samples:
            log.info("holding out %d training images for calibration", len(val_samples))
    return train_samples, val_samples


def relative_paths(samples: Sequence[Sample]) -> tuple[str | None, list[str]]:
    """(common root, paths relative to it) of the training images, for bank provenance."""
    absolute = [os.path.abspath(s.path) for s in samples]
    try:
        root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    except ValueError:  # different drives (Windows)
        return None, absolute
    return root, [os.path.relpath(p, root) for p in absolute]
