"""Global pooling option of the backbones: max / avg+max keep a small lesion visible, and the choice
is recorded in the config so a checkpoint rebuilds the same network."""

from __future__ import annotations

import pytest
import torch

from medimb.networks import create_model, load_checkpoint, save_checkpoint
from medimb.networks.backbones import GLOBAL_POOLS


def test_pools_on_a_single_hot_location():
    fmap = torch.zeros(1, 2, 4, 4, 4)
    fmap[0, 0, 1, 2, 3] = 64.0
    assert GLOBAL_POOLS["avg"](fmap).tolist() == [[1.0, 0.0]]
    assert GLOBAL_POOLS["max"](fmap).tolist() == [[64.0, 0.0]]
    assert GLOBAL_POOLS["avgmax"](fmap).tolist() == [[32.5, 0.0]]


@pytest.mark.parametrize("mode", ["max", "avgmax"])
def test_global_pool_is_used_recorded_and_rebuilt(tmp_path, mode):
    torch.manual_seed(0)
    model = create_model("cpunet", in_channels=2, num_classes=2, head="cmsl", widths=(8,), depths=(1,),
                         stem_width=4, global_pool=mode).eval()
    assert model.config["global_pool"] == mode
    x = torch.randn(2, 2, 16, 16, 8)
    with torch.no_grad():
        fmap = model.forward_features(x)
        assert fmap.shape == (2, 8, 8, 8, 4)  # stem + stage 0 at stride 1: half resolution
        expected = model.classifier(GLOBAL_POOLS[mode](fmap))
        torch.testing.assert_close(model(x), expected)
    save_checkpoint(tmp_path / "m.pt", model)
    loaded, meta = load_checkpoint(tmp_path / "m.pt")
    assert loaded.backbone.global_pool == mode and meta["config"]["global_pool"] == mode
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x))


def test_default_avg_pool_leaves_config_unchanged_and_bad_modes_fail():
    model = create_model("cpunet", in_channels=1, num_classes=2)
    assert "global_pool" not in model.config and model.backbone.global_pool == "avg"
    with pytest.raises(ValueError, match="global_pool must be one of"):
        create_model("cpunet", in_channels=1, num_classes=2, global_pool="median")
    with pytest.raises(ValueError, match="pools its feature map its own way"):
        create_model("slice_pool", in_channels=1, num_classes=2, global_pool="max")
