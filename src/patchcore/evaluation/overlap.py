"""Train/test overlap check: do the good test images look like copies of training images?

A split where the same part (or the same scene) was photographed for both the training and
the test set flatters every metric: such a good test image finds its own patches in the
memory bank and scores far lower than an unseen normal part would, so a good image stands
out from a defective one by being seen before, not by lacking a defect. The signal is the
bank's provenance: for each test image, the share of its patches whose nearest bank row came
from a single training image. On an honest split good and defective test images draw on the
training set alike (the defect covers only part of an image); when good test images draw far
more of their patches from one training image each, they have near-copies in it.

Measured on magnetic_tile (each tile photographed under up to six lightings, 195 of the 200
good test images with a sibling shot in train/good): the median share is 0.45 for good test
images and 0.07 for defective ones; hazelnut_toy, whose test parts are new, 0.13 and 0.13.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..model import PatchCore, Prediction

log = logging.getLogger(__name__)

# Good test images drawing at least this many times more of their patches from one training
# image (median over images) than defective ones do are reported as overlapping the training
# set. Between the two measured cases (1.0x for new parts, 6.4x for sibling shots).
OVERLAP_RATIO = 2.0
MIN_IMAGES = 3  # per class, for a median worth comparing


def source_shares(model: PatchCore, pred: Prediction) -> tuple[np.ndarray, np.ndarray]:
    """Per test image: the training image that gave the most of its patches' nearest bank
    rows (index into `model.train_paths_`, over all its views) and the share of its patches
    it gave (0-1)."""
    bank = model.members_[0].bank
    if bank is None:
        raise ValueError("the model is not fitted")
    n_views = len(pred.nearest)
    flat = np.asarray(pred.nearest).reshape(n_views, -1)
    if flat.size and flat.max() >= len(bank.image_index):
        raise ValueError("the prediction's nearest rows are not rows of this model's bank")
    view_image = (np.arange(n_views) if pred.view_image is None
                  else np.asarray(pred.view_image))
    train_image = model.training_images(bank.image_index)  # provenance counts views
    n_images = len(pred)
    best = np.full(n_images, -1, dtype=np.int64)
    share = np.zeros(n_images, dtype=np.float64)
    order = np.argsort(view_image, kind="stable")
    bounds = np.searchsorted(view_image[order], np.arange(n_images + 1))
    for i in range(n_images):
        rows = flat[order[bounds[i]:bounds[i + 1]]].ravel()
        sources = train_image[rows[rows >= 0]]  # -1: an approximate index found no row
        if sources.size:
            counts = np.bincount(sources)
            best[i] = int(counts.argmax())
            share[i] = counts[best[i]] / sources.size
    return best, share


def overlap_summary(model: PatchCore, pred: Prediction) -> dict[str, Any]:
    """Median source shares of good and anomalous test images and whether the good ones look
    like near-copies of training images (`train_test_overlap`); a warning says so, with the
    closest pairs. Shares are None when a class has fewer than MIN_IMAGES images."""
    out: dict[str, Any] = {"good_source_share": None, "anomalous_source_share": None,
                           "train_test_overlap": None}
    labels = np.asarray(pred.true_labels) if pred.true_labels is not None else None
    if labels is None or min((labels == 0).sum(), (labels == 1).sum()) < MIN_IMAGES:
        return out
    try:
        best, share = source_shares(model, pred)
    except ValueError as exc:  # a diagnostic: never the reason an evaluation fails
        log.warning("train/test overlap check skipped: %s", exc)
        return out
    good = float(np.median(share[labels == 0]))
    bad = float(np.median(share[labels == 1]))
    flagged = good >= OVERLAP_RATIO * bad
    out.update(good_source_share=round(good, 4), anomalous_source_share=round(bad, 4),
               train_test_overlap=bool(flagged))
    if flagged:
        goods = np.flatnonzero(labels == 0)
        top = goods[np.argsort(-share[goods], kind="stable")[:3]]
        pairs = "; ".join(f"{pred.paths[i]} <- {share[i]:.0%} from "
                          f"{model.training_path(int(best[i]))}" for i in top)
        log.warning(
            "the good test images look like near-copies of training images: a median %.0f%% of "
            "a good test image's patches match one training image, against %.0f%% for the "
            "anomalous test images. The same part or scene in both sets makes every metric "
            "optimistic; split by part before trusting them. Closest: %s",
            100 * good, 100 * bad, pairs)
    return out
