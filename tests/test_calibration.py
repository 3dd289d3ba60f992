"""Leave-one-image-out calibration scores equal a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from patchcore import ConfigError, PatchCore
from patchcore.data.loader import as_samples
from patchcore.data.synthetic import make_texture
from patchcore.engine import pipeline
from patchcore.engine.index import NearestNeighbourIndex
from patchcore.engine.scoring import patch_scores


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_excluded_rows_give_the_exact_k_nearest_of_the_rest(kind):
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(5000, 8)).astype(np.float32)
    queries = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
    lo, hi = 1200, 3100
    index = NearestNeighbourIndex(kind=kind).add(bank)
    ps, nearest = patch_scores(index, queries, 3, (lo, hi))
    kept = np.r_[0:lo, hi:5000]
    assert ((nearest < lo) | (nearest >= hi)).all()
    if kind == "flat":  # exact; the approximate indexes only have to respect the exclusion
        d = np.linalg.norm(queries.reshape(-1, 1, 8) - bank[kept][None], axis=2)
        ref = np.sort(d, axis=1)[:, :3].mean(axis=1).reshape(2, 3, 4)
        np.testing.assert_allclose(ps, ref, rtol=1e-5)
        np.testing.assert_array_equal(nearest.ravel(), kept[d.argmin(axis=1)])
    with pytest.raises(ConfigError, match="remain outside"):
        patch_scores(index, queries, 10, (3, 4998))


@pytest.mark.parametrize("preprocess", ["square", "tile"])
def test_leave_one_out_scores_match_brute_force(tmp_path, preprocess):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.fromarray(make_texture(rng, (48, 80), "wood")).save(path)
        paths.append(path)
    model = PatchCore(backbone="resnet18", pretrained=False, imagesize=32, sampler="identity",
                      preprocess=preprocess, tile_size=48, tile_stride=32, blur_sigma=0.0,
                      anomaly_scorer_num_nn=2, target_embed_dimension=16,
                      pretrain_embed_dimension=16, aggregation="reference", device="cpu",
                      progress=False).fit(paths)
    assert "leave-one-image-out scores of 4" in model.calibration_.image_threshold_rule
    scores, maps = pipeline.leave_one_out(model.members_, as_samples(paths),
                                          model.config, model.settings)
    feats = [model.view_features(p) for p in paths]  # V_i x h x w x D each
    for i in range(4):
        others = np.concatenate([f.reshape(-1, 16) for j, f in enumerate(feats) if j != i])
        own = feats[i].reshape(-1, 16)
        d = np.linalg.norm(own[:, None] - others[None], axis=2)
        expected = np.sort(d, axis=1)[:, :2].mean(axis=1).max()
        assert scores[i] == pytest.approx(expected, rel=1e-4)
        assert maps[i].shape == (48, 80)
    # Thresholds come from these scores: max(99th percentile, mean + 3 std).
    expected_thr = max(np.percentile(scores, 99), scores.mean() + 3 * scores.std())
    assert model.calibration_.image_threshold == pytest.approx(expected_thr, rel=1e-5)
