"""COAM, CAM, Grad-CAM and Grad-CAM++: the O(N*C) identity, polarity and head-specific weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.explain import BrightSpotNet, bright_cube_input

from medimb.explain.cam import CAMExplainer, FeatureMapClassifier, cam_classifier
from medimb.explain.coam import COAM, MultiScaleCOAM, coam_from_features, multiscale_coam_from_stages, upsample_to
from medimb.explain.methods import EXPLAINERS, create_explainer
from medimb.explain.settings import parse_explainers
from medimb.explain.normalize import minmax_per_volume


@pytest.mark.parametrize("cosine", [False, True])
def test_coam_equals_explicit_mean_correlation(cosine):
    fmap = torch.relu(torch.randn(2, 5, 3, 4, 2, generator=torch.Generator().manual_seed(1)))
    f = fmap.reshape(2, 5, -1)
    if cosine:
        f = F.normalize(f, dim=1, eps=1e-12)
    gram = torch.einsum("bci,bcj->bij", f, f)  # the N x N matrix COAM must avoid
    expected = gram.mean(dim=2).reshape(2, 1, 3, 4, 2)
    torch.testing.assert_close(coam_from_features(fmap, cosine=cosine), expected, rtol=1e-5, atol=1e-6)


def test_multiscale_coam_is_the_geometric_mean_of_the_last_levels_coams():
    gen = torch.Generator().manual_seed(2)
    stages = [torch.relu(torch.randn(1, c, n, n, n, generator=gen)) for c, n in ((3, 16), (4, 8), (5, 4))]
    fused = multiscale_coam_from_stages(stages, (16, 16, 16), levels=2)
    levels = [upsample_to(coam_from_features(f), (16, 16, 16)) for f in stages[1:]]
    torch.testing.assert_close(fused, (levels[0] * levels[1]).sqrt(), rtol=1e-4, atol=1e-6)
    # one level: COAM of the last feature map, upsampled; more levels than the network has: all of them
    torch.testing.assert_close(multiscale_coam_from_stages(stages, (16,) * 3, levels=1), levels[1], rtol=1e-4,
                               atol=1e-6)
    assert multiscale_coam_from_stages(stages, (16,) * 3, levels=9).shape == (1, 1, 16, 16, 16)


@pytest.mark.parametrize("stem_width", [0, 4])
def test_cpunet_levels_end_with_the_feature_map_and_feed_coam_ms(stem_width):
    from medimb.networks import create_model

    torch.manual_seed(0)
    model = create_model("cpunet", in_channels=2, num_classes=2, widths=[8, 16], depths=[1, 1],
                         stem_width=stem_width).eval()
    x = torch.randn(1, 2, 16, 16, 8)
    with torch.no_grad():
        stages = model.forward_stages(x)
        torch.testing.assert_close(stages[-1], model.forward_features(x))
    sizes = [tuple(s.shape[1:]) for s in stages]
    assert sizes == ([(4, 16, 16, 8)] if stem_width else []) + [(8, 8, 8, 4), (16, 4, 4, 2)]
    heat = MultiScaleCOAM(model)(x)
    assert heat.shape == (1, 1, 16, 16, 8) and float(heat.max()) == pytest.approx(1.0)


def test_coam_ms_names_what_a_network_without_levels_lacks():
    model = BrightSpotNet()

    def no_levels(x):
        raise NotImplementedError("this backbone does not expose its feature maps per resolution level")

    model.forward_stages = no_levels  # e.g. densenet121, slice_pool
    with pytest.raises(ValueError, match="coam_ms needs a network"):
        MultiScaleCOAM(model)(bright_cube_input())


def test_minmax_is_per_volume_and_keeps_polarity():
    maps = torch.stack([torch.arange(8.0), -torch.arange(8.0) * 3]).reshape(2, 1, 2, 2, 2)
    out = minmax_per_volume(maps)
    assert out[0].flatten()[-1] == 1 and out[0].flatten()[0] == 0
    assert out[1].flatten()[0] == 1 and out[1].flatten()[-1] == 0
    assert torch.equal(minmax_per_volume(torch.ones(1, 1, 2, 2, 2)), torch.zeros(1, 1, 2, 2, 2))


@pytest.mark.parametrize("head", ["linear", "cosine", "cmsl"])
@pytest.mark.parametrize("method", sorted(EXPLAINERS))
def test_every_method_peaks_on_the_bright_region(method, head):
    model = BrightSpotNet(head=head).eval()
    corner, size = (10, 3, 6), 4
    x = bright_cube_input(corner=corner, size=size)
    heat = create_explainer(method, model)(x, class_idx=1)
    assert heat.shape == (1, 1, 16, 16, 16)
    assert float(heat.min()) == pytest.approx(0.0) and float(heat.max()) == pytest.approx(1.0)
    peak = np.unravel_index(int(heat.argmax()), heat.shape[2:])
    assert all(c <= p < c + size for p, c in zip(peak, corner)), (method, peak)
    inside = heat[0, 0, 10:14, 3:7, 6:10].mean()
    assert inside > 2 * heat.mean(), "high must mean attended"


def test_coam_runs_without_gradients():
    model = BrightSpotNet()
    seen = []
    model.conv.register_forward_hook(lambda m, i, o: seen.append(torch.is_grad_enabled()))
    COAM(model)(bright_cube_input())
    assert seen == [False]


def test_cam_uses_normalised_weights_for_cosine_heads():
    linear, cosine = BrightSpotNet("linear"), BrightSpotNet("cmsl")
    torch.testing.assert_close(cam_classifier(linear).weight, linear.classifier.weight)
    torch.testing.assert_close(cam_classifier(cosine).weight, F.normalize(cosine.classifier.weight, dim=1))
    assert cam_classifier(cosine).bias is None


def test_cam_on_linear_head_is_the_logit_decomposition():
    # with mean pooling, the mean of the (un-normalised) CAM over locations is the class logit
    model = BrightSpotNet("linear").eval()
    x = bright_cube_input()
    raw = CAMExplainer(model).compute_map(x, class_idx=1)
    torch.testing.assert_close(raw.mean(), model(x)[0, 1], rtol=1e-5, atol=1e-5)


def test_rerouted_model_matches_and_mismatch_is_reported():
    model = BrightSpotNet("cosine").eval()
    x = bright_cube_input()
    FeatureMapClassifier(model).check_matches(x)
    model = BrightSpotNet("linear").eval()
    model.forward = lambda inp: model.classifier(model.forward_features(inp).amax(dim=(2, 3, 4)))
    with pytest.raises(ValueError, match="contract"):
        FeatureMapClassifier(model).check_matches(x)


def test_method_list_is_deduplicated_defaulted_and_names_an_unknown_method():
    assert parse_explainers("coam, gradcam,coam") == ["coam", "gradcam"]
    assert parse_explainers(None) == ["coam", "gradcam", "cam"]
    with pytest.raises(ValueError, match="gradcan"):
        parse_explainers("coam,gradcan")


@pytest.mark.parametrize("method", sorted(EXPLAINERS))
def test_explaining_leaves_the_model_in_eval_mode_and_unchanged(method):
    """MONAI's CAM hooks restore the mode of the module they wrap; a wrapper left in its default
    training mode used to switch the model to training after the first map, so BatchNorm normalised
    every later case with its own statistics and overwrote the running statistics (wrong predictions)."""
    from medimb.networks import create_model

    torch.manual_seed(0)
    model = create_model("cpunet", in_channels=1, num_classes=2, widths=[8, 16], depths=[1, 1]).eval()
    x, other = bright_cube_input(), torch.randn(1, 1, 16, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(other)
    explainer = create_explainer(method, model)
    for _ in range(2):
        explainer(x, class_idx=1)
        assert not model.training and not any(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(other), logits)
    model.train()
    explainer(x, class_idx=1)
    assert model.training  # a model in training mode stays so
