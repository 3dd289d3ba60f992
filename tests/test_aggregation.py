"""Native-width aggregation: each layer's p x p neighbourhood mean, concatenated at native width."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from patchcore import PatchCore
from patchcore.engine.features import FeatureExtractor


def test_native_aggregation_equals_pool_resize_concat():
    torch.manual_seed(0)
    ex = FeatureExtractor("resnet18", ("layer2", "layer3"), pretrained=False, imagesize=64,
                          aggregation="native")
    x = torch.randn(2, 3, 64, 64)
    ours = ex(x).numpy()
    assert ex.folded_norms > 0  # the default extractor runs with its batch norms folded
    # Independent reference: the layers from torchvision's own modules (the same weights,
    # batch norms as they are), then pool/resize/concat.
    import torchvision

    torch.manual_seed(0)
    plain = FeatureExtractor("resnet18", ("layer2", "layer3"), pretrained=False, imagesize=64,
                             aggregation="native", fold_norms=False)
    net = torchvision.models.resnet18()
    net.load_state_dict(plain.backbone.state_dict())
    net.eval()
    with torch.inference_mode():
        h = net.maxpool(net.relu(net.bn1(net.conv1(x.contiguous()))))
        l2 = net.layer2(net.layer1(h))
        l3 = net.layer3(l2)
        p2 = F.avg_pool2d(l2, 3, stride=1, padding=1)  # zero padding counts, as in the paper
        p3 = F.avg_pool2d(l3, 3, stride=1, padding=1)
        p3 = F.interpolate(p3, size=p2.shape[-2:], mode="bilinear", align_corners=False)
        ref = torch.cat([p2, p3], dim=1).permute(0, 2, 3, 1).numpy()
    assert ex.feature_dim == 128 + 256 and ours.shape == (2, 8, 8, 384)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_native_is_the_default_and_older_configs_keep_reference(tmp_path):
    from patchcore.config import PatchCoreConfig

    assert PatchCoreConfig().aggregation == "native"
    assert PatchCoreConfig().preprocess == "square"
    old = PatchCoreConfig.from_dict({"backbone": "resnet18"})  # a config saved before both
    assert old.aggregation == "reference" and old.preprocess == "crop"


def test_native_bank_round_trip(tmp_path):
    from patchcore.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "d", categories=("carpet",), n_train=5, n_test_good=1,
                           n_test_defect=1, size=48, seed=0)
    model = PatchCore(backbone="resnet18", pretrained=False, imagesize=32, device="cpu",
                      progress=False).fit(tmp_path / "d" / "carpet")
    assert model.members_[0].bank.features.shape[1] == 128 + 256
    loaded = PatchCore.load(model.save(tmp_path / "m"), progress=False)
    test = sorted((tmp_path / "d" / "carpet" / "test").rglob("*.png"))
    np.testing.assert_array_equal(model.predict(test).scores, loaded.predict(test).scores)
