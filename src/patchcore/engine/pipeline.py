"""One fit path and one scoring path, shared by the estimator, tuning and explanations.

Images arrive as raw RGB in [0, 1] (B x 3 x S x S); each member normalises them with its own
backbone's mean and std, extracts patch features, and either fills a feature store (fit) or
searches its memory bank (scoring). Ensemble members' scores are z-normalised and averaged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbones import get_backbone
from ..config import PatchCoreConfig, RuntimeSettings
from ..data.images import image_size
from ..data.layouts import Sample
from ..data.loader import batches
from ..data.preprocess import Preprocessor
from ..errors import ConfigError, DataError
from .bank import MemoryBank, bank_index, build_bank
from .calibration import member_norm
from .features import FeatureExtractor
from .index import NearestNeighbourIndex
from .memory import FeatureStore
from .scoring import anomaly_maps, image_scores, patch_scores, resize_grid

log = logging.getLogger(__name__)


@dataclass
class Member:
    """Runtime objects of one backbone: its feature extractor and, once fitted, bank and index."""

    backbone: str
    layers: tuple[str, ...]
    extractor: FeatureExtractor | None = None
    bank: MemoryBank | None = None
    index: NearestNeighbourIndex | None = None


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
    return [Member(name, tuple(own) if own else get_backbone(name).default_layers)
            for name, own in zip(names, per, strict=True)]


def preprocessor(config: PatchCoreConfig) -> Preprocessor:
    """Views as [0, 1] RGB tensors (members normalise with their own mean and std)."""
    return Preprocessor(config.resize, config.imagesize, mean=(0.0, 0.0, 0.0),
                        std=(1.0, 1.0, 1.0), mode=config.preprocess, tile_size=config.tile_size,
                        tile_stride=config.tile_stride, standardize=config.standardize)


def with_fitted_tiles(config: PatchCoreConfig) -> PatchCoreConfig:
    """The config with its tile geometry made explicit (tile mode): the default tile follows
    imagesize, so a model records the tiles it was fitted on and keeps them at another size."""
    if config.preprocess != "tile":
        return config
    pre = preprocessor(config)
    return config.replace(tile_size=pre.tile_size, tile_stride=pre.tile_stride)


def view_counts(samples: Sequence[Sample], pre: Preprocessor) -> list[int]:
    """Views per image (read from the headers only where the mode's count depends on size)."""
    if pre.mode in ("crop", "square"):
        return [1] * len(samples)
    return [pre.num_views(image_size(s.path)) for s in samples]


def make_extractor(member: Member, config: PatchCoreConfig, device: torch.device
                   ) -> FeatureExtractor:
    """The member's feature extractor (built once; seeded so random weights reload equal)."""
    if member.extractor is None:
        c = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            member.extractor = FeatureExtractor(
                member.backbone, member.layers, pretrained=c.pretrained, weights=c.weights,
                pretrain_embed_dimension=c.pretrain_embed_dimension,
                target_embed_dimension=c.target_embed_dimension, patchsize=c.patchsize,
                patchstride=c.patchstride, imagesize=c.imagesize, device=device,
                dtype=c.backbone_dtype, aggregation=c.aggregation,
            )
    return member.extractor


def member_features(member: Member, images: torch.Tensor, chunk: int | None = None
                    ) -> np.ndarray:
    """Patch features (B x h x w x D, float32) of raw [0, 1] images for one member.

    `chunk` bounds the images per forward pass (a batch of tiled images has many views).
    """
    assert member.extractor is not None
    spec = member.extractor.spec
    mean = torch.tensor(spec.mean, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=images.dtype).view(1, -1, 1, 1)
    step = chunk or len(images)
    parts = [member.extractor((images[a : a + step] - mean) / std).cpu().numpy()
             for a in range(0, len(images), step)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def extract_features(
    member: Member, samples: Sequence[Sample], pre: Preprocessor, settings: RuntimeSettings,
    desc: str = "features", sizes: list[tuple[int, int]] | None = None,
) -> FeatureStore:
    """All patch features of `samples` (view-major rows) in a store bounded by max_memory_mb.

    The (W, H) of every image is appended to `sizes` when given.
    """
    extractor = member.extractor
    assert extractor is not None
    h, w = extractor.feature_grid
    counts = view_counts(samples, pre)
    store = FeatureStore(sum(counts) * h * w, extractor.feature_dim, settings.max_memory_mb)
    done = 0
    try:
        for batch in tqdm(
            batches(samples, pre, settings.batch_size, num_workers=settings.num_workers),
            total=-(-len(samples) // settings.batch_size), desc=f"{desc} [{member.backbone}]",
            unit="batch", disable=not settings.progress, leave=False,
        ):
            expected = counts[done : done + len(batch.paths)]
            if batch.view_counts != expected:
                raise DataError(f"image {batch.paths[0]} or its batch changed size while being "
                                "read; rerun when the folder is not being written to")
            done += len(batch.paths)
            if sizes is not None:
                sizes.extend(batch.sizes)
            feats = member_features(member, batch.images, settings.batch_size)
            store.append(feats.reshape(-1, feats.shape[-1]))
    except BaseException:
        store.close()
        raise
    return store


def fit_member(
    member: Member, samples: Sequence[Sample], config: PatchCoreConfig,
    settings: RuntimeSettings, device: torch.device, seed: int,
    sizes: list[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Extract, subsample and index one member's memory bank; returns its training summary.

    Bank provenance (`image_index`) counts views: with one view per image, images.
    """
    extractor = make_extractor(member, config, device)
    t0 = time.perf_counter()
    store = extract_features(member, samples, preprocessor(config), settings, sizes=sizes)
    try:
        t1 = time.perf_counter()
        rows, image_index, position, info = build_bank(
            store, extractor.feature_grid, config, seed, device, settings.progress)
        on_disk = store.on_disk
    finally:
        store.close()
    member.bank = MemoryBank(member.backbone, member.layers, rows, image_index, position)
    member.index = bank_index(rows, config, device)
    log.info("%s: %d patches -> bank %d x %d (features %.1fs, coreset %.1fs)", member.backbone,
             info["patches"], len(rows), rows.shape[1], t1 - t0, info["coreset_seconds"])
    return {"backbone": member.backbone, "layers": list(member.layers), **info,
            "feature_seconds": round(t1 - t0, 3), "features_on_disk": on_disk}


def set_ensemble_norms(members: Sequence[Member], seed: int) -> None:
    """Store each member's (mean, std) of bank self-distances (ensembles only)."""
    if len(members) > 1:
        for m in members:
            assert m.bank is not None and m.index is not None
            m.bank.norm = member_norm(m.index, m.bank.features, seed)


def score_features(
    member: Member, feats: np.ndarray, config: PatchCoreConfig,
    exclude: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patch scores (B x h x w), nearest bank rows (B x h x w) and image scores (B) of features.

    `exclude` = (start, stop) bank rows to leave out (leave-one-image-out calibration).
    """
    assert member.bank is not None and member.index is not None
    ps, nearest = patch_scores(member.index, feats, config.anomaly_scorer_num_nn, exclude)
    b = config.reweight_neighbourhood if config.reweight else 0
    img = image_scores(ps, feats, nearest, member.bank.features, member.index, b)
    return ps, nearest, img


def score_view_features(
    members: Sequence[Member], feats: Sequence[np.ndarray], config: PatchCoreConfig,
    exclude_views: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """View scores, maps (V x S x S), and the first member's patch scores (z-scores in an
    ensemble) and nearest rows, from each member's patch features of the same V views
    (ensembles: z-scores averaged).

    `exclude_views` (start, stop) leaves out the bank rows taken from those training views.
    """
    ensemble = len(members) > 1
    total_patch: np.ndarray | None = None
    first: tuple[np.ndarray, np.ndarray] | None = None
    img_total = np.zeros(len(feats[0]), dtype=np.float32)
    for member, f in zip(members, feats, strict=True):
        exclude = None
        if exclude_views is not None:
            assert member.bank is not None
            # build_bank keeps rows in feature order, so a view range is a row range.
            views = member.bank.image_index
            exclude = (int(np.searchsorted(views, exclude_views[0])),
                       int(np.searchsorted(views, exclude_views[1])))
        ps, nearest, img = score_features(member, f, config, exclude)
        if ensemble:
            assert member.bank is not None
            mu, sd = member.bank.norm
            ps, img = (ps - mu) / sd, (img - mu) / sd
        if first is None:
            first = (ps, nearest)
        if total_patch is None:
            total_patch = np.zeros_like(ps)
        if total_patch.shape != ps.shape:
            ps = resize_grid(ps, total_patch.shape[1:])
        total_patch += ps / len(members)
        img_total += img / len(members)
    assert total_patch is not None and first is not None
    maps = anomaly_maps(total_patch, config.imagesize, config.blur_sigma)
    return img_total, maps, first[0], first[1]


def score_batch(
    members: Sequence[Member], images: torch.Tensor, config: PatchCoreConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`score_view_features` of raw [0, 1] views (V x 3 x S x S)."""
    return score_view_features(members, [member_features(m, images) for m in members], config)


def leave_one_out(
    members: Sequence[Member], samples: Sequence[Sample], config: PatchCoreConfig,
    settings: RuntimeSettings, sizes: Sequence[tuple[int, int]] | None = None,
    limit: int = 64,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Calibration scores of training images that stay in the bank: image scores and
    whole-image maps of up to `limit` of them (seeded), each scored against the bank rows of
    all other images.

    A training image's own rows are its exact nearest neighbours, so its ordinary score is
    about zero; leaving them out scores it as an unseen normal image would be, against a bank
    that lacks its contribution to the coreset (a slightly pessimistic estimate, which keeps
    thresholds on the safe side). Eq. 7 reweighting, when on, uses the full bank. `sizes`
    (W, H) of the images, known from the fit, spare reading their headers again.
    """
    pre = preprocessor(config)
    counts = (view_counts(samples, pre) if sizes is None
              else [pre.num_views(size) for size in sizes])
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    chosen = np.arange(len(samples))
    if len(samples) > limit:
        chosen = np.sort(np.random.default_rng(config.seed).choice(len(samples), limit,
                                                                    replace=False))
    scores: list[float] = []
    maps: list[np.ndarray] = []
    for batch_start in range(0, len(chosen), settings.batch_size):
        ids = chosen[batch_start : batch_start + settings.batch_size]
        for batch in batches([samples[i] for i in ids], pre, len(ids),
                             num_workers=settings.num_workers):
            offsets = np.concatenate([[0], np.cumsum(batch.view_counts)])
            feats = [member_features(m, batch.images, settings.batch_size) for m in members]
            for j, i in enumerate(ids):
                a, b = int(offsets[j]), int(offsets[j + 1])
                view_scores, view_maps, _, _ = score_view_features(
                    members, [f[a:b] for f in feats], config,
                    exclude_views=(int(starts[i]), int(starts[i + 1])))
                scores.append(float(view_scores.max()))
                maps.append(pre.to_original(view_maps, batch.sizes[j]))
    return np.asarray(scores, dtype=np.float32), maps
