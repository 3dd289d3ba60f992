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
