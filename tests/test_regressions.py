"""Estimator-level regressions, each checked against a reference computed here independently.

* normal-only calibration: threshold = max(99th percentile, mean + 3 std) of the normal scores;
* false-positive-rate calibration: exactly the allowed number of images is flagged (ties, and
  float32 scores compared with the threshold);
* ensembles: each member's image score is z-normalised with its stored (mean, std) of bank
  nearest-neighbour distances before the members are averaged;
* bank provenance: every bank row is the feature of its recorded image at its (row, col).

Everything runs on tiny noise images (40 x 48 px) at 32 px input: random-weight ResNet-18 for
the single-backbone model, real EfficientNet-Lite0 weights for the ensemble.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore import PatchCore
from patchcore.data.preprocess import Preprocessor

SIZE = 32
N_TRAIN, N_CAL, N_TEST = 8, 6, 4
SINGLE = dict(backbone="resnet18", layers=("layer1", "layer2"), pretrained=False, resize=SIZE,
              imagesize=SIZE, percentage=0.25, calibration_holdout=0.0, seed=0,
              preprocess="crop", aggregation="reference", standardize=False)


@pytest.fixture(scope="module")
def noise_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Distinct noise images; a few get a bright blob so that scores spread out."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N_TRAIN + N_CAL + N_TEST):
        pixels = rng.integers(60, 200, size=(40, 48, 3)).astype(np.uint8)
        if i % 3 == 2:
            pixels[10:20, 12:24] = 255
        path = root / f"img_{i:02d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def single(noise_paths: list[Path]) -> dict[str, Any]:
    """A random-weight ResNet-18 model fitted on noise, calibrated on normal images only."""
    model = PatchCore(**SINGLE)
    model.progress = False
    train, cal = noise_paths[:N_TRAIN], noise_paths[N_TRAIN : N_TRAIN + N_CAL]
    model.fit(train, val=cal)
    return {"model": model, "train": train, "cal": cal,
            "fit_threshold": model.calibration_.image_threshold}


# -- helpers: read the fitted state through either the flat or the MemoryBank layout ----------


def _bank_rows(member: Any) -> np.ndarray:
    bank = member.bank
    return np.asarray(getattr(bank, "features", bank), dtype=np.float32)


def _provenance(member: Any) -> tuple[np.ndarray, np.ndarray]:
    holder = member.bank if hasattr(member.bank, "image_index") else member
    return np.asarray(holder.image_index), np.asarray(holder.position)


def _norm(member: Any) -> tuple[float, float]:
    norm = getattr(member.bank, "norm", None)
    return tuple(norm) if norm is not None else tuple(member.norm)


def _features(member: Any, paths: list[Path]) -> np.ndarray:
    """Patch features (B x h x w x D) of image files: our own resize / crop / normalisation."""
    spec = member.extractor.spec
    pre = Preprocessor(SIZE, SIZE, mean=spec.mean, std=spec.std)
    batch = torch.stack([pre.image(Image.open(p).convert("RGB")) for p in paths])
    return member.extractor(batch).cpu().numpy().astype(np.float64)


def _nearest_distances(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    q, b = queries.astype(np.float64), bank.astype(np.float64)
    return np.sqrt(np.maximum(((q[:, None, :] - b[None, :, :]) ** 2).sum(axis=2), 0.0))


def _lowest_threshold(scores32: np.ndarray, fpr: float) -> tuple[np.float32, int]:
    """Lowest float32 threshold flagging at most `fpr` of the scores, and how many it flags."""
    target = Fraction(fpr).limit_denominator(10**6)
    candidates = np.unique(np.concatenate(
        [scores32, np.nextafter(scores32, np.float32(np.inf))]).astype(np.float32))
    for t in candidates:
        flagged = int((scores32 >= t).sum())
        if Fraction(flagged, len(scores32)) <= target:
            return t, flagged
    raise AssertionError("unreachable: the float above the maximum flags nothing")


# -- calibration --------------------------------------------------------------------------------


def test_normal_only_threshold_is_max_of_percentile_and_three_sigma(single) -> None:
    model = single["model"]
    scores = model.predict(single["cal"]).scores.astype(np.float64)
    percentile = float(np.percentile(scores, 99))
    margin = float(scores.mean() + 3 * scores.std())
    # With a handful of images mean + 3 std always exceeds the maximum: the margin decides.
    assert margin > percentile
    expected = max(percentile, margin)
    assert single["fit_threshold"] == pytest.approx(expected, rel=1e-5)
    cal = model.calibrate(single["cal"])
    assert cal.image_threshold == pytest.approx(expected, rel=1e-5)
    # ... and it is what labels the images: none of the normal calibration images is flagged.
    assert model.predict(single["cal"]).labels.sum() == 0


@pytest.mark.parametrize("fpr,duplicate_top", [
    (0.5, False),  # 6 images, 3.0 allowed -> 3 flagged
    (0.25, False),  # 6 images, 1.5 allowed -> 1 flagged (ceil would flag 2)
    (0.3, True),  # 7 images, 2.1 allowed; the top score twice -> 2 flagged
    (0.2, True),  # 7 images, 1.4 allowed; the top score twice -> nothing can be flagged
])
def test_fpr_threshold_flags_exactly_the_allowed_images(single, fpr, duplicate_top) -> None:
    model = single["model"]
    items = list(single["cal"])
    if duplicate_top:
        first = model.predict(items).scores
        items.append(items[int(np.argmax(first))])  # a tie at the top
    scores = model.predict(items).scores.astype(np.float32)
    assert len(np.unique(scores)) == len(scores) - int(duplicate_top)
    expected_threshold, expected_flagged = _lowest_threshold(scores, fpr)
    cal = model.calibrate(items, threshold_fpr=fpr)
    assert cal.image_threshold == float(expected_threshold)
    assert int(model.predict(items).labels.sum()) == expected_flagged
    assert expected_flagged <= fpr * len(items)


# -- bank provenance ------------------------------------------------------------------------------


def test_bank_rows_are_the_features_at_their_recorded_image_and_position(single) -> None:
    model = single["model"]
    member = model.members_[0]
    bank = _bank_rows(member)
    image_index, position = _provenance(member)
    feats = _features(member, single["train"])
    h, w = feats.shape[1:3]
    assert (h, w) == (8, 8) and len(bank) == int(N_TRAIN * h * w * 0.25)
    assert (position[:, 0] != position[:, 1]).sum() > len(bank) // 2  # a swap would show
    expected = feats[image_index, position[:, 0], position[:, 1]]
    np.testing.assert_allclose(bank, expected, rtol=1e-4, atol=1e-4)
    # No two recorded origins coincide (each bank row is a distinct training patch).
    origins = image_index.astype(np.int64) * h * w + position[:, 0] * w + position[:, 1]
    assert len(np.unique(origins)) == len(bank)


# -- ensembles ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ensemble(noise_paths: list[Path]) -> PatchCore:
    """Two EfficientNet-Lite0 members whose raw distances differ by an order of magnitude."""
    model = PatchCore(backbone=["efficientnet_lite0", "efficientnet_lite0"],
                      layers=["0.blocks.1", "1.blocks.1.1.conv_dw"], resize=SIZE,
                      imagesize=SIZE, percentage=0.25, calibration_holdout=0.0, seed=0,
                      preprocess="crop", aggregation="reference", standardize=False)
    model.progress = False
    return model.fit(noise_paths[:6])


def test_ensemble_norms_are_bank_nearest_neighbour_statistics(ensemble) -> None:
    means = []
    for member in ensemble.members_:
        bank = _bank_rows(member)
        d = _nearest_distances(bank, bank)
        np.fill_diagonal(d, np.inf)
        nearest_other = d.min(axis=1)
        mu, sd = _norm(member)
        assert mu == pytest.approx(nearest_other.mean(), rel=1e-4)
        assert sd == pytest.approx(nearest_other.std(), rel=1e-3)
        means.append(mu)
    assert max(means) / min(means) > 8, "members must differ in scale for this test to bite"


def test_ensemble_score_is_the_mean_of_z_normalised_member_scores(ensemble, noise_paths) -> None:
    test = noise_paths[-N_TEST:]
    expected = np.zeros(len(test))
    raw_per_member = []
    for member in ensemble.members_:
        feats = _features(member, test)
        b, h, w, dim = feats.shape
        dist = _nearest_distances(feats.reshape(-1, dim), _bank_rows(member)).min(axis=1)
        raw = dist.reshape(b, h * w).max(axis=1)  # image score: the largest patch score
        raw_per_member.append(raw)
        mu, sd = _norm(member)
        expected += (raw - mu) / sd / len(ensemble.members_)
    assert raw_per_member[0].mean() > 8 * raw_per_member[1].mean()
    scores = ensemble.predict(test).scores
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-3)
