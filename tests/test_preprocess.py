"""Preprocessing modes: views cover the whole image, maps come back to the right pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from patchcore import PatchCore
from patchcore.data.preprocess import MIN_OVERLAP, Preprocessor
from patchcore.data.synthetic import make_texture

S = 32


def covered(pre: Preprocessor, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    mask = np.zeros((h, w), dtype=bool)
    for left, top, right, bottom in pre.boxes(size):
        mask[int(np.floor(top)):int(np.ceil(bottom)), int(np.floor(left)):int(np.ceil(right))] = 1
    return mask


@pytest.mark.parametrize("mode", ["square", "aspect", "tile"])
@pytest.mark.parametrize("size", [(100, 40), (40, 100), (64, 64), (300, 120), (33, 97)])
def test_whole_image_modes_cover_every_pixel(mode, size):
    pre = Preprocessor(S, S, mode=mode, tile_size=48, tile_stride=24)
    assert covered(pre, size).all()
    views = pre.views(Image.new("RGB", size))
    assert views.shape == (pre.num_views(size), 3, S, S)


def test_crop_mode_discards_the_borders_of_non_square_images():
    pre = Preprocessor(36, S, mode="crop")
    assert not covered(pre, (100, 40)).all()


def test_aspect_views_keep_the_aspect_ratio_and_overlap():
    pre = Preprocessor(S, S, mode="aspect")
    boxes = pre.boxes((300, 100))  # 3:1 -> the shorter side becomes S, views are squares
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    np.testing.assert_allclose(widths, heights, rtol=0.02)
    assert boxes[0, 0] == 0 and boxes[-1, 2] == pytest.approx(300, abs=1)
    overlaps = boxes[:-1, 2] - boxes[1:, 0]
    assert (overlaps >= MIN_OVERLAP * widths[0] - 2).all()


@pytest.mark.parametrize("mode", ["square", "aspect", "tile"])
def test_constant_view_maps_give_a_constant_original_map(mode):
    pre = Preprocessor(S, S, mode=mode, tile_size=40, tile_stride=20)
    size = (90, 50)
    maps = np.full((pre.num_views(size), S, S), 3.5, dtype=np.float32)
    out = pre.to_original(maps, size)
    assert out.shape == (50, 90)
    np.testing.assert_allclose(out, 3.5, rtol=1e-6)


@pytest.mark.parametrize("mode", ["square", "aspect", "tile"])
def test_a_hot_spot_lands_where_the_view_saw_it(mode):
    """Project an original-image spot into every view, then back: it must land in place."""
    pre = Preprocessor(S, S, mode=mode, tile_size=40, tile_stride=20)
    size = (96, 48)
    spot = (80, 10)  # (x, y) near the right edge: outside any centre crop
    maps = []
    for left, top, right, bottom in pre.boxes(size):
        m = np.zeros((S, S), dtype=np.float32)
        if left <= spot[0] < right and top <= spot[1] < bottom:
            u = int((spot[0] + 0.5 - left) / (right - left) * S)
            v = int((spot[1] + 0.5 - top) / (bottom - top) * S)
            m[max(0, v - 1):v + 2, max(0, u - 1):u + 2] = 1.0
        maps.append(m)
    out = pre.to_original(np.stack(maps), size)
    weight = np.where(out > 0.5 * out.max(), out, 0)
    ys, xs = np.indices(out.shape)
    cx, cy = (xs * weight).sum() / weight.sum(), (ys * weight).sum() / weight.sum()
    tol = max((b[2] - b[0]) / S for b in pre.boxes(size)) + 1  # one view pixel
    assert abs(cx - spot[0]) <= tol and abs(cy - spot[1]) <= tol


def _edge_defect_images(tmp_path, n_train=6):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n_train):
        p = tmp_path / f"train_{i}.png"
        Image.fromarray(make_texture(rng, (64, 160), "carpet")).save(p)
        paths.append(p)
    good = make_texture(rng, (64, 160), "carpet")
    bad = good.copy()
    bad[20:40, 4:24] = (255, 0, 255)  # a defect at the left edge: outside a centre crop
    return paths, good, bad


@pytest.mark.parametrize("mode", ["square", "aspect", "tile"])
def test_defects_at_the_border_are_found_by_whole_image_modes(tmp_path, mode):
    train, good, bad = _edge_defect_images(tmp_path)
    model = PatchCore(backbone="efficientnet_lite0", imagesize=64, resize=64, preprocess=mode,
                      tile_size=64, tile_stride=48, device="cpu", progress=False,
                      calibration_holdout=0.0)
    model.fit(train)
    pred = model.predict([good, bad])
    assert pred.scores[1] > 1.2 * pred.scores[0]
    amap = pred.original_map(1)
    assert amap.shape == (64, 160)
    assert amap[20:40, 4:24].mean() > 1.5 * amap[:, 80:].mean()


def test_crop_mode_cannot_see_the_border_defect(tmp_path):
    train, good, bad = _edge_defect_images(tmp_path)
    model = PatchCore(backbone="efficientnet_lite0", imagesize=64, resize=64, preprocess="crop",
                      device="cpu", progress=False, calibration_holdout=0.0)
    model.fit(train)
    pred = model.predict([good, bad])
    assert pred.scores[1] < 1.2 * pred.scores[0]


def test_an_image_scores_as_its_most_anomalous_view(tmp_path):
    """Tile mode: the image score is the max over its views, each scored against the bank."""
    train, good, bad = _edge_defect_images(tmp_path, n_train=3)
    model = PatchCore(backbone="resnet18", pretrained=False, imagesize=32, preprocess="tile",
                      tile_size=64, tile_stride=48, target_embed_dimension=16,
                      pretrain_embed_dimension=16, aggregation="reference", device="cpu",
                      progress=False, calibration_holdout=0.0).fit(train)
    bank = model.members_[0].bank.features.astype(np.float64)
    pred = model.predict([good, bad])
    for i, image in enumerate((good, bad)):
        feats = model.view_features(image).astype(np.float64)  # V x h x w x D
        assert len(feats) == model.preprocessor.num_views((160, 64)) > 1
        d = np.linalg.norm(feats.reshape(len(feats), -1, 1, 16) - bank[None, None], axis=3)
        view_scores = d.min(axis=2).max(axis=1)
        assert pred.scores[i] == pytest.approx(view_scores.max(), rel=1e-4)


@pytest.mark.parametrize("mode", ["aspect", "tile"])
def test_view_count_without_building_boxes_matches_the_boxes(mode):
    pre = Preprocessor(S, S, mode=mode, tile_size=40, tile_stride=25)
    for size in [(33, 97), (300, 120), (40, 40), (1000, 64), (64, 1200), (17, 17)]:
        assert pre.num_views(size) == len(pre.boxes(size)), size


def test_too_many_views_and_gapped_tiles_are_refused():
    from patchcore import ConfigError, DataError, PatchCoreConfig

    pre = Preprocessor(S, S, mode="tile", tile_size=32, tile_stride=1)
    with pytest.raises(DataError, match="MAX_VIEWS"):
        pre.check_size((2000, 2000), "big.png")
    with pytest.raises(ConfigError, match="tile_stride"):
        PatchCoreConfig(preprocess="tile", tile_size=48, tile_stride=100)


# -- standardize ------------------------------------------------------------------------------


def _textured(seed: int, size: tuple[int, int] = (96, 64)) -> np.ndarray:
    """An H x W x 3 texture (float, 0-255) of `size` (W, H)."""
    return make_texture(np.random.default_rng(seed), size[::-1], "carpet").astype(np.float32)


@pytest.mark.parametrize("mode", ["square", "aspect", "tile", "crop"])
def test_standardized_views_have_the_standard_mean_and_spread_together(mode):
    from patchcore.data.preprocess import STANDARD_MEAN, STANDARD_STD

    img = Image.fromarray(np.clip(_textured(1) * 0.4 + 20, 0, 255).astype(np.uint8))
    pre = Preprocessor(48, S, mean=(0, 0, 0), std=(1, 1, 1), mode=mode, tile_size=40,
                       tile_stride=24, standardize=True)
    views = pre.view_arrays(img)
    assert views.mean() == pytest.approx(STANDARD_MEAN, abs=1e-4)
    assert views.std() == pytest.approx(STANDARD_STD, rel=1e-3)
    if len(views) > 1:  # one shift and scale for the whole image, not one per view
        plain = Preprocessor(48, S, mean=(0, 0, 0), std=(1, 1, 1), mode=mode, tile_size=40,
                             tile_stride=24).view_arrays(img)
        ratio = (views - views.mean()) / (plain - plain.mean() + 1e-12)
        assert np.nanstd(ratio[np.abs(plain - plain.mean()) > 0.05]) < 1e-3


def test_standardizing_undoes_brightness_and_contrast_keeps_colour():
    base = _textured(2)
    img = Image.fromarray(base.astype(np.uint8))
    darker = Image.fromarray(np.clip(base * 0.5 + 10, 0, 255).astype(np.uint8))
    pre = Preprocessor(64, S, mode="square", standardize=True)
    a, b = pre.view_arrays(img), pre.view_arrays(darker)
    assert np.abs(a - b).max() < 0.15  # 8-bit rounding of the darker copy, stretched 2x
    plain = Preprocessor(64, S, mode="square")
    assert np.abs(plain.view_arrays(img) - plain.view_arrays(darker)).mean() > 0.5
    # Channels keep their differences: a reddish image stays reddish.
    grey = base[..., 0]
    rgb = np.stack([grey, grey * 0.6, grey * 0.3], axis=-1).astype(np.uint8)
    v = Preprocessor(64, S, mode="square", mean=(0, 0, 0), std=(1, 1, 1),
                     standardize=True).view_arrays(Image.fromarray(rgb))[0]
    assert v[0].mean() > v[1].mean() > v[2].mean()


def test_a_flat_image_is_not_stretched_to_its_noise():
    from patchcore.data.preprocess import STANDARD_STD, STD_FLOOR

    rng = np.random.default_rng(0)
    flat = np.full((64, 64), 120.0) + rng.integers(0, 2, (64, 64))  # std ~ 0.5 / 255
    v = Preprocessor(64, S, mode="square", mean=(0, 0, 0), std=(1, 1, 1),
                     standardize=True).view_arrays(Image.fromarray(flat.astype(np.uint8)))
    assert v.std() < 0.002 / STD_FLOOR * STANDARD_STD
    assert np.isfinite(v).all()


def test_a_brighter_flatter_exposure_of_a_normal_part_stays_normal(tmp_path):
    """Standardized (the default), a good part photographed brighter and with less contrast
    scores like the training images; with pixels as read it scores like a defect."""
    paths = []
    for i in range(6):
        p = tmp_path / f"train{i}.png"
        Image.fromarray(_textured(10 + i, (64, 64)).astype(np.uint8)).save(p)
        paths.append(p)
    good = _textured(30, (64, 64))
    exposed = tmp_path / "exposed.png"
    Image.fromarray(np.clip(good * 0.3 + 160, 0, 255).astype(np.uint8)).save(exposed)
    normal = tmp_path / "normal.png"
    Image.fromarray(good.astype(np.uint8)).save(normal)
    scores = {}
    for standardize in (True, False):
        model = PatchCore(backbone="efficientnet_lite0", imagesize=64, device="cpu",
                          progress=False, standardize=standardize).fit(paths)
        scores[standardize] = model.predict([normal, exposed]).scores
    assert scores[True][1] < 1.05 * scores[True][0]
    assert scores[False][1] > 1.2 * scores[False][0]
