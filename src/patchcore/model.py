"""The PatchCore estimator: `fit` on normal images, `predict` scores and maps, `save` / `load`."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .backbones import get_backbone
from .config import PatchCoreConfig
from .data.images import Preprocessor, to_rgb
from .data.layouts import DatasetSplit, Sample
from .data.loader import Batch, batches, samples_from_paths
from .engine.features import FeatureExtractor, resolve_device
from .engine.index import NearestNeighbourIndex
from .engine.memory import FeatureStore
from .engine.sampling import get_sampler
from .engine.scoring import anomaly_maps, image_scores, patch_scores
from .errors import ConfigError, DataError, NotFittedError
from .evaluation import metrics

log = logging.getLogger(__name__)

ImageInput = str | Path | Sample | Image.Image | np.ndarray


@dataclass
class Member:
    """One backbone of the model with its own memory bank (an ensemble has several)."""

    backbone: str
    layers: tuple[str, ...]
    bank: np.ndarray | None = None  # M x D
    image_index: np.ndarray | None = None  # M: which training image each row came from
    position: np.ndarray | None = None  # M x 2: (row, col) on the feature grid
    norm: tuple[float, float] = (0.0, 1.0)  # mean, std of bank self-distances (ensembles)
    extractor: FeatureExtractor | None = None
    index: NearestNeighbourIndex | None = None


@dataclass
class Prediction:
    """Scores and maps of a batch of images, in input order."""

    paths: list[Path | None]
    scores: np.ndarray  # raw image scores
    calibrated: np.ndarray  # 0-1, 0.5 at the image threshold
    labels: np.ndarray  # 1 = anomalous, by the calibrated image threshold
    maps: np.ndarray  # N x S x S anomaly maps at the model's input size (center crop)
    sizes: list[tuple[int, int]]  # original (W, H)
    patch_scores: np.ndarray  # N x h x w patch scores (first member's grid)
    nearest: np.ndarray  # N x h x w index of the nearest bank row (first member)
    true_labels: np.ndarray | None = None
    masks: np.ndarray | None = None  # N x S x S ground truth, when requested
    groups: list[str] = field(default_factory=list)
    _pre: Preprocessor | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def original_map(self, i: int) -> np.ndarray:
        """Anomaly map of image i at its original size (H x W)."""
        assert self._pre is not None
        return self._pre.to_original(self.maps[i], self.sizes[i])

    def calibrated_map(self, i: int, calibration: dict[str, float]) -> np.ndarray:
        """Map of image i at original size, scaled to 0-1 with 0.5 at the pixel threshold."""
        return normalise(self.original_map(i), calibration, "pixel")


def normalise(values: np.ndarray, calibration: dict[str, Any], kind: str) -> np.ndarray:
    """Min-max scaling that puts the `kind` (image/pixel) threshold at 0.5, clipped to [0, 1]."""
    thr = calibration.get(f"{kind}_threshold")
    lo, hi = calibration.get(f"{kind}_min"), calibration.get(f"{kind}_max")
    if thr is None or lo is None or hi is None:
        return np.full_like(np.asarray(values, dtype=np.float32), np.nan)
    span = max(float(hi) - float(lo), 1e-12)
    return np.clip((np.asarray(values, dtype=np.float32) - thr) / span + 0.5, 0.0, 1.0)


def parse_members(backbones: str | Sequence[str], layers: Sequence[str] | None) -> list[Member]:
    """Backbones and layers, `-le 0.layer2 -le 1.features.denseblock2` style for ensembles."""
    names = [backbones] if isinstance(backbones, str) else list(backbones)
    if not names:
        raise ConfigError("at least one backbone is needed")
    per: list[list[str]] = [[] for _ in names]
    for layer in layers or []:
        head, _, rest = layer.partition(".")
        if len(names) > 1:
            if not head.isdigit() or int(head) >= len(names) or not rest:
                raise ConfigError(
                    f"with {len(names)} backbones, layers need a member prefix such as "
                    f"0.layer2 or 1.features.denseblock2; got {layer!r}"
                )
            per[int(head)].append(rest)
        else:
            per[0].append(layer)
    members = []
    for name, own in zip(names, per, strict=True):
        spec = get_backbone(name)
        members.append(Member(name, tuple(own) if own else spec.default_layers))
    return members


class PatchCore:
    """PatchCore anomaly detector (Roth et al., 2022).

    Configuration goes in the constructor; `fit` learns the memory bank(s) and calibration;
    learned attributes end with an underscore.
    """

    def __init__(self, config: PatchCoreConfig | None = None, **overrides: Any) -> None:
        config = config or PatchCoreConfig()
        self.config = config.replace(**overrides) if overrides else config
        self.members_: list[Member] = []
        self.calibration_: dict[str, Any] = {}
        self.train_paths_: list[str] = []
        self.feature_grid_: tuple[int, int] | None = None
        self.fit_info_: dict[str, Any] = {}
        self.calibration_prediction_: Prediction | None = None
        self.progress = True
        self._device: torch.device | None = None

    # -- set-up -----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The torch device in use (resolved from config.device)."""
        if self._device is None:
            self._device = resolve_device(self.config.device)
        return self._device

    @property
    def preprocessor(self) -> Preprocessor:
        """Resize / crop / normalisation of the first backbone."""
        spec = get_backbone(self._members_or_parse()[0].backbone)
        return Preprocessor(self.config.resize, self.config.imagesize, spec.mean, spec.std)

    def _members_or_parse(self) -> list[Member]:
        if not self.members_:
            self.members_ = parse_members(self.config.backbone, self.config.layers)
        return self.members_

    def _extractor(self, member: Member) -> FeatureExtractor:
        if member.extractor is None:
            c = self.config
            # Seeded so that random-weight backbones (pretrained=False) are the same after load.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(c.seed)
                member.extractor = FeatureExtractor(
                    member.backbone, member.layers, pretrained=c.pretrained, weights=c.weights,
                    pretrain_embed_dimension=c.pretrain_embed_dimension,
                    target_embed_dimension=c.target_embed_dimension, patchsize=c.patchsize,
                    patchstride=c.patchstride, imagesize=c.imagesize, device=self.device,
                    dtype=c.backbone_dtype,
                )
        return member.extractor

    def _for_member(self, images: torch.Tensor, member: Member) -> torch.Tensor:
        """Re-normalise images (normalised for the first backbone) for `member`'s mean / std."""
        first = get_backbone(self.members_[0].backbone)
        spec = get_backbone(member.backbone)
        if (spec.mean, spec.std) == (first.mean, first.std):
            return images

        def col(v: tuple[float, ...]) -> torch.Tensor:
            return torch.tensor(v, dtype=images.dtype).view(1, -1, 1, 1)

        raw = images * col(first.std) + col(first.mean)
        return (raw - col(spec.mean)) / col(spec.std)

    def _threads(self) -> None:
        if self.device.type == "cpu":
            import faiss

            faiss.omp_set_num_threads(torch.get_num_threads())

    # -- fit --------------------------------------------------------------------------------

    def fit(
        self,
        train: DatasetSplit | Iterable[str | Path | Sample],
        val: Iterable[str | Path | Sample] | None = None,
    ) -> PatchCore:
        """Build the memory bank from normal images and calibrate thresholds.

        `train` is a DatasetSplit (its validation images are used when `val` is None) or paths.
        Without validation images, `calibration_holdout` of the training images are held out.
        """
        c = self.config
        if isinstance(train, DatasetSplit):
            val = train.val if val is None else val
            train = train.train
        train_samples = _as_samples(train)
        val_samples = _as_samples(val) if val is not None else []
        if not train_samples:
            raise DataError("no training images were given")
        if not val_samples and c.calibration_holdout > 0 and len(train_samples) >= 4:
            rng = np.random.default_rng(c.seed)
            order = rng.permutation(len(train_samples))
            n_hold = max(1, int(round(len(train_samples) * c.calibration_holdout)))
            hold = set(order[:n_hold].tolist())
            val_samples = [s for i, s in enumerate(train_samples) if i in hold]
            train_samples = [s for i, s in enumerate(train_samples) if i not in hold]
            log.info("holding out %d training images for calibration", len(val_samples))
        torch.manual_seed(c.seed)
        self._threads()
        self.members_ = parse_members(c.backbone, c.layers)
        self.train_paths_ = [str(s.path) for s in train_samples]
        info: dict[str, Any] = {"train_images": len(train_samples),
                                "calibration_images": len(val_samples), "members": []}
        for m, member in enumerate(self.members_):
            info["members"].append(self._fit_member(member, train_samples, m))
        self.feature_grid_ = self.members_[0].extractor.feature_grid
        if len(self.members_) > 1:
            for member in self.members_:
                member.norm = _self_distance_stats(member, c.seed)
        self.fit_info_ = info
        self.calibration_ = {}
        self.calibration_prediction_ = None
        if val_samples:
            self.calibrate(val_samples, threshold_fpr=c.threshold_fpr,
                           threshold_percentile=c.threshold_percentile)
        return self

    def _fit_member(self, member: Member, samples: list[Sample], m: int) -> dict[str, Any]:
        c = self.config
        extractor = self._extractor(member)
        h, w = extractor.feature_grid
        t0 = time.perf_counter()
        store = FeatureStore(len(samples) * h * w, extractor.feature_dim, c.max_memory_mb)
        try:
            for batch in tqdm(
                batches(samples, self.preprocessor, c.batch_size, num_workers=c.num_workers),
                total=-(-len(samples) // c.batch_size), desc=f"features [{member.backbone}]",
                unit="batch", disable=not self.progress, leave=False,
            ):
                feats = extractor(self._for_member(batch.images, member))
                store.append(feats.reshape(-1, feats.shape[-1]).cpu().numpy())
            t1 = time.perf_counter()
            total = store.rows
            n = total if c.sampler == "identity" else max(1, int(total * c.percentage))
            sampler = get_sampler(
                c.sampler, c.projection_dim, c.num_starting_points, self.device, self.progress
            )
            idx = sampler.select(store, n, c.seed + m)
            t2 = time.perf_counter()
            bank = store.gather(idx)
            on_disk = store.on_disk
        finally:
            store.close()
        per_image = h * w
        member.bank = bank.astype(np.float16) if c.bank_dtype == "float16" else bank
        member.image_index = (idx // per_image).astype(np.int32)
        member.position = np.stack([(idx % per_image) // w, idx % w], axis=1).astype(np.int16)
        member.index = self._build_index(member.bank)
        log.info("%s: %d patches -> bank %d x %d (features %.1fs, coreset %.1fs)",
                 member.backbone, total, len(bank), bank.shape[1], t1 - t0, t2 - t1)
        return {"backbone": member.backbone, "layers": list(member.layers), "patches": total,
                "bank_rows": int(len(bank)), "feature_seconds": round(t1 - t0, 3),
                "coreset_seconds": round(t2 - t1, 3), "features_on_disk": on_disk}

    def _build_index(self, bank: np.ndarray) -> NearestNeighbourIndex:
        index = NearestNeighbourIndex(
            self.config.distance, self.config.index, use_gpu=self.device.type == "cuda"
        )
        return index.add(bank.astype(np.float32))

    # -- scoring ----------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not self.members_ or self.members_[0].bank is None:
            raise NotFittedError("this PatchCore model is not fitted: call fit() or load() first")

    def _score_batch(self, images: torch.Tensor) -> tuple[np.ndarray, ...]:
        """Raw image scores, maps (B x S x S), first member's patch scores and nearest rows."""
        c = self.config
        total_patch, first = None, None
        ensemble = len(self.members_) > 1
        img_total = np.zeros(images.shape[0], dtype=np.float32)
        for member in self.members_:
            feats = self._extractor(member)(self._for_member(images, member)).cpu().numpy()
            ps, nearest = patch_scores(member.index, feats, c.anomaly_scorer_num_nn)
            b = c.reweight_neighbourhood if c.reweight else 0
            img = image_scores(ps, feats, nearest, member.bank, member.index, b)
            if ensemble:
                mu, sd = member.norm
                ps, img = (ps - mu) / sd, (img - mu) / sd
            if first is None:
                first = (ps, nearest)
            if total_patch is None:
                total_patch = np.zeros_like(ps)
            if total_patch.shape != ps.shape:
                ps = _resize_grid(ps, total_patch.shape[1:])
            total_patch += ps / len(self.members_)
            img_total += img / len(self.members_)
        maps = anomaly_maps(total_patch, c.imagesize, c.blur_sigma)
        return img_total, maps, first[0], first[1]

    def score(
        self, samples: Sequence[Sample], masks: bool = False, desc: str = "scoring"
    ) -> Prediction:
        """Score samples from disk (with ground-truth masks when `masks`)."""
        self._check_fitted()
        self._threads()
        parts = []
        for batch in tqdm(
            batches(samples, self.preprocessor, self.config.batch_size, masks=masks,
                    num_workers=self.config.num_workers),
            total=-(-len(samples) // self.config.batch_size), desc=desc, unit="batch",
            disable=not self.progress, leave=False,
        ):
            parts.append((batch, *self._score_batch(batch.images)))
        return self._assemble(parts, samples)

    def _assemble(self, parts: list[tuple], samples: Sequence[Sample] | None) -> Prediction:
        if not parts:
            raise DataError("no images to score")
        batches_: list[Batch] = [p[0] for p in parts]
        scores = np.concatenate([p[1] for p in parts])
        pred = Prediction(
            paths=[p for b in batches_ for p in b.paths],
            scores=scores,
            calibrated=normalise(scores, self.calibration_, "image"),
            labels=np.zeros(len(scores), dtype=np.int64),
            maps=np.concatenate([p[2] for p in parts]),
            sizes=[s for b in batches_ for s in b.sizes],
            patch_scores=np.concatenate([p[3] for p in parts]),
            nearest=np.concatenate([p[4] for p in parts]),
            true_labels=np.array([lab for b in batches_ for lab in b.labels]),
            masks=(np.concatenate([b.masks.numpy() for b in batches_])
                   if batches_[0].masks is not None else None),
            groups=[g for b in batches_ for g in b.groups],
            _pre=self.preprocessor,
        )
        thr = self.calibration_.get("image_threshold")
        if thr is not None:
            pred.labels = (scores >= thr).astype(np.int64)
        return pred

    def predict(self, images: ImageInput | Sequence[ImageInput]) -> Prediction:
        """Scores, labels and anomaly maps for paths, Samples, PIL images or HxWxC arrays."""
        self._check_fitted()
        if isinstance(images, (str, Path, Sample, Image.Image)) or (
            isinstance(images, np.ndarray) and images.ndim in (2, 3)
        ):
            images = [images]
        items = list(images)
        if all(isinstance(x, (str, Path, Sample)) for x in items):
            return self.score(_as_samples(items), desc="predict")
        pre = self.preprocessor
        parts = []
        bs = self.config.batch_size
        for start in range(0, len(items), bs):
            pil = [_to_pil(x) for x in items[start : start + bs]]
            batch = Batch(torch.stack([pre.image(p) for p in pil]), [None] * len(pil),
                          [p.size for p in pil], [-1] * len(pil), [""] * len(pil), None)
            parts.append((batch, *self._score_batch(batch.images)))
        return self._assemble(parts, None)

    # -- calibration ------------------------------------------------------------------------

    def calibrate(
        self, samples: Sequence[Sample], good_percentile: float = 99.0,
        threshold_fpr: float | None = None, threshold_percentile: float | None = None,
    ) -> dict:
        """Thresholds and min/max from validation samples (normal, optionally anomalous too).

        With anomalous images the image threshold maximises F1; with normal images only it is the
        `good_percentile` of their scores. `threshold_fpr` (a false-positive rate) or
        `threshold_percentile` (0-100) pick the threshold from the normal scores alone (production
        rule), even when anomalous images are present. Pixel thresholds likewise use masks when
        present. The calibration Prediction is kept in `calibration_prediction_`.
        """
        samples = _as_samples(samples)
        has_masks = any(s.mask is not None for s in samples)
        pred = self.score(samples, masks=has_masks, desc="calibration")
        self.calibration_prediction_ = pred
        labels = np.array([max(s.label, 0) for s in samples])
        cal: dict[str, Any] = {"source_images": len(samples),
                               "anomalous_images": int(labels.sum())}
        good_scores = pred.scores[labels == 0] if (labels == 0).any() else pred.scores
        if threshold_fpr is not None:
            thr = metrics.threshold_at_fpr(good_scores, threshold_fpr)
            # Scores are float32 and compared in float32: round the threshold up, not down.
            t32 = np.float32(thr)
            thr = float(np.nextafter(t32, np.float32(np.inf)) if float(t32) < thr else t32)
            cal["image_threshold_rule"] = f"{threshold_fpr:g} false-positive rate on normal scores"
        elif threshold_percentile is not None:
            thr = metrics.threshold_at_percentile(good_scores, threshold_percentile)
            cal["image_threshold_rule"] = f"{threshold_percentile:g}th percentile of normal scores"
        elif labels.min() != labels.max():
            _, thr = metrics.f1_max(labels, pred.scores)
            cal["image_threshold_rule"] = "f1_max on validation"
        else:
            # Few held-out normal images make a bare percentile optimistic: keep a 3-sigma margin.
            thr = max(metrics.threshold_at_percentile(pred.scores, good_percentile),
                      float(pred.scores.mean() + 3 * pred.scores.std()))
            cal["image_threshold_rule"] = (
                f"max({good_percentile:g}th percentile, mean + 3 std) of normal scores")
        cal["image_threshold"] = float(thr)
        cal["image_min"], cal["image_max"] = float(pred.scores.min()), float(pred.scores.max())
        if has_masks and pred.masks is not None and pred.masks.any():
            sub = _pixel_subsample(pred.maps, pred.masks, self.config.seed)
            _, pthr = metrics.f1_max(sub[1], sub[0])
            cal["pixel_threshold_rule"] = "f1_max on validation masks"
        else:
            good = pred.maps[labels == 0] if (labels == 0).any() else pred.maps
            pthr = float(np.percentile(good, 99.9))
            cal["pixel_threshold_rule"] = "99.9th percentile of normal pixels"
        cal["pixel_threshold"] = float(pthr)
        cal["pixel_min"], cal["pixel_max"] = float(pred.maps.min()), float(pred.maps.max())
        self.calibration_ = cal
        return cal

    # -- persistence ------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the model folder (config.json + memory_bank.safetensors) atomically."""
        from .storage import save_model

        self._check_fitted()
        return save_model(self, Path(path))

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> PatchCore:
        """Read a model folder written by `save`; nothing executable is loaded."""
        from .storage import load_model

        return load_model(Path(path), device=device)


def _as_samples(items: Iterable[str | Path | Sample]) -> list[Sample]:
    items = list(items)
    return [x if isinstance(x, Sample) else samples_from_paths([x])[0] for x in items]


def _to_pil(x: ImageInput) -> Image.Image:
    if isinstance(x, Image.Image):
        return to_rgb(x)
    if isinstance(x, np.ndarray):
        if x.ndim == 3 and x.shape[2] not in (1, 3, 4):
            raise DataError(f"an image array needs 1, 3 or 4 channels, got shape {x.shape}")
        arr = x[..., 0] if x.ndim == 3 and x.shape[2] == 1 else x
        if arr.dtype != np.uint8:
            from .data.images import _to_uint8

            arr = _to_uint8(arr)
        return to_rgb(Image.fromarray(arr))
    raise DataError(f"cannot score an object of type {type(x).__name__}")


def _resize_grid(ps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch.nn.functional as F

    t = torch.from_numpy(ps)[:, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


def _pixel_subsample(
    maps: np.ndarray, masks: np.ndarray, seed: int, limit: int = 2_000_000
) -> tuple[np.ndarray, np.ndarray]:
    flat_maps, flat_masks = maps.reshape(-1), masks.reshape(-1).astype(np.int64)
    if len(flat_maps) > limit:
        idx = np.random.default_rng(seed).choice(len(flat_maps), limit, replace=False)
        flat_maps, flat_masks = flat_maps[idx], flat_masks[idx]
    return flat_maps, flat_masks


def _self_distance_stats(member: Member, seed: int, limit: int = 5000) -> tuple[float, float]:
    """Mean and std of bank rows' distances to their nearest other row (ensemble scaling)."""
    bank = member.bank.astype(np.float32)
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(bank), min(limit, len(bank)), replace=False)
    dist, _ = member.index.search(bank[rows], min(2, len(bank)))
    d = dist[:, -1]
    return float(d.mean()), float(max(d.std(), 1e-6))
