"""medimb.networks: the model contract, heads, stage-2 re-balancing, freezing, checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from medimb.networks import (
    DEFAULT_MODEL,
    CheckpointError,
    backbone_defaults,
    create_model,
    freeze_backbone,
    list_models,
    load_checkpoint,
    predict_proba,
    rebalance_classifier,
    register_backbone,
    save_checkpoint,
    tau_normalize,
)
from medimb.networks import registry
from medimb.networks.model import feature_map_size

torch.set_num_threads(1)

VOLUME = (2, 1, 16, 16, 16)


def _input(name: str, channels: int = 1) -> torch.Tensor:
    if name == "slice_channels":
        return torch.randn(2, channels, 3, 16, 16)
    return torch.randn(2, channels, 16, 16, 16)


@pytest.mark.parametrize("name", list_models())
def test_every_model_meets_the_contract(name):
    torch.manual_seed(0)
    model = create_model(name, in_channels=2, num_classes=3, embedding_dim=8).eval()
    x = _input(name, channels=2)
    with torch.no_grad():
        out = model.forward_all(x)
        logits = model(x)
        fmap = model.forward_features(x)
    num_features = model.classifier.weight.shape[1]
    assert model.classifier.weight.shape == (3, num_features)
    assert out["logits"].shape == (2, 3) and torch.allclose(out["logits"], logits, atol=1e-5)
    assert out["features"].shape == (2, num_features)
    assert out["embedding"].shape == (2, 8)
    assert torch.allclose(out["embedding"].norm(dim=1), torch.ones(2), atol=1e-5)
    assert fmap.ndim == 5 and fmap.shape[:2] == (2, num_features)
    assert (fmap >= 0).all(), "feature map must have ReLU applied"
    rebuilt = create_model(**model.config)
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())


def test_slice_pool_keeps_depth_for_coam_and_pools_over_slices():
    torch.manual_seed(0)
    model = create_model("slice_pool", in_channels=1, num_classes=2, pooling="attention").eval()
    x = torch.randn(2, 1, 5, 16, 16)
    fmap = model.forward_features(x)
    assert fmap.shape[2] == 5, "one feature-map slice per input slice"
    weights = model.backbone.slice_weights(fmap)
    assert weights.shape == (2, 5) and torch.allclose(weights.sum(1), torch.ones(2))
    # the per-slice encoder is shared: swapping two slices permutes their feature maps
    fmap_swapped = model.forward_features(x[:, :, [1, 0, 2, 3, 4]])
    assert torch.allclose(fmap_swapped[:, :, 0], fmap[:, :, 1], atol=1e-5)


def test_2d_and_3d_share_one_code_path():
    torch.manual_seed(0)
    model2d = create_model("cpunet", in_channels=1, num_classes=2, spatial_dims=2)
    assert model2d(torch.randn(2, 1, 28, 28)).shape == (2, 2)
    with pytest.raises(ValueError, match=r"expects input \(B, 1, H, W\)"):
        model2d(torch.randn(2, 1, 8, 28, 28))


def test_wrong_channel_count_is_a_clear_error():
    torch.manual_seed(0)
    model = create_model("cpunet", in_channels=2, num_classes=2)
    with pytest.raises(ValueError, match=r"expects input \(B, 2, D, H, W\)"):
        model(torch.randn(2, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="3 slices"):
        create_model("slice_channels", in_channels=1, num_classes=2, num_slices=3)(torch.randn(2, 1, 5, 16, 16))


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="cpunet"):
        create_model("resnet999", in_channels=1, num_classes=2)
    with pytest.raises(KeyError, match="cmsl"):
        create_model("cpunet", in_channels=1, num_classes=2, head="arcface")
    with pytest.raises(ValueError, match="num_classes"):
        create_model("cpunet", in_channels=1, num_classes=1)


def test_cosine_heads_return_scaled_cosines():
    torch.manual_seed(0)
    model = create_model("cpunet", in_channels=1, num_classes=3, head="cmsl", head_kwargs={"scale": 16.0}).eval()
    out = model.forward_all(torch.randn(*VOLUME))
    cos = torch.nn.functional.normalize(out["features"], dim=1) @ torch.nn.functional.normalize(
        model.classifier.weight, dim=1).T
    assert torch.allclose(out["logits"], 16.0 * cos, atol=1e-4)
    assert out["logits"].abs().max() <= 16.0 + 1e-4


def test_predict_proba_softmax_and_normalised_sigmoid():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-30.0, -30.0, -30.0]])
    assert torch.allclose(predict_proba("linear", logits), torch.softmax(logits, 1))
    sig = predict_proba("cmsl", logits)
    assert torch.allclose(sig.sum(1), torch.ones(2)) and torch.isfinite(sig).all()
    assert torch.equal(sig[0].argsort(), torch.sigmoid(logits[0]).argsort())
    assert torch.allclose(predict_proba("cmsl", logits, normalize=False), torch.sigmoid(logits))
    model = create_model("cpunet", in_channels=1, num_classes=3, head="cmsl")
    assert torch.allclose(predict_proba(model, logits), sig)


def test_tau_normalisation_divides_each_row_by_its_norm_to_the_power_tau():
    w = torch.tensor([[3.0, 4.0], [0.6, 0.8]])
    assert torch.allclose(tau_normalize(w, 0.0), w)
    assert torch.allclose(tau_normalize(w, 1.0).norm(dim=1), torch.ones(2))
    assert torch.allclose(tau_normalize(w, 0.5)[0], w[0] / 5**0.5)


def _train_step(model, params, x, y):
    opt = torch.optim.SGD(params, lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_stage2_leaves_backbone_bit_identical():
    torch.manual_seed(0)
    model = create_model("cpunet", in_channels=1, num_classes=2, widths=(4, 8), depths=(1, 1))
    x, y = torch.randn(*VOLUME), torch.tensor([0, 1])
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    freeze_backbone(model)
    head = rebalance_classifier(model, "crt")
    model.train()
    assert not model.backbone.training and not model.embedding.training
    for _ in range(3):
        _train_step(model, [p for p in model.parameters() if p.requires_grad], x, y)
    after = model.state_dict()
    for key, value in frozen_before.items():
        assert torch.equal(after[key], value), f"{key} changed in stage 2"
    assert model.classifier is head and model.config["head"] == "linear"


def test_lws_trains_only_the_scales_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = create_model("cpunet", in_channels=1, num_classes=2, widths=(4, 8), depths=(1, 1))
    weight_before = model.classifier.weight.detach().clone()
    freeze_backbone(model)
    head = rebalance_classifier(model, "lws")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.scales"]
    _train_step(model, [head.scales], torch.randn(*VOLUME), torch.tensor([0, 1]))
    assert torch.equal(head.weight, weight_before) and not torch.equal(head.scales, torch.ones(2))
    path = save_checkpoint(tmp_path / "lws.pt", model, method="crt", epoch=3)
    loaded, meta = load_checkpoint(path)
    assert loaded.config["head"] == "lws" and meta["epoch"] == 3 and meta["method"] == "crt"
    x = torch.randn(*VOLUME)
    model.eval()
    assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_tau_norm_head_matches_the_formula():
    torch.manual_seed(0)
    model = create_model("cpunet", in_channels=1, num_classes=3, widths=(4, 8), depths=(1, 1)).eval()
    features = torch.randn(4, 8)
    old_w, old_b = model.classifier.weight.detach().clone(), model.classifier.bias.detach().clone()
    rebalance_classifier(model, "tau_norm", tau=0.7)
    expected = features @ tau_normalize(old_w, 0.7).T + old_b
    assert torch.allclose(model.classifier(features), expected, atol=1e-6)
    assert model.config["head_kwargs"]["tau"] == 0.7
    with pytest.raises(TypeError, match="linear heads"):
        rebalance_classifier(create_model("cpunet", in_channels=1, num_classes=2, head="cmsl"), "tau_norm")


def test_checkpoint_round_trip_and_atomic_write(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet10", in_channels=1, num_classes=2, head="cosine", head_kwargs={"scale": 8.0}).eval()
    path = save_checkpoint(tmp_path / "sub" / "best.pt", model, class_names=["normal", "lesion"],
                           preprocessing={"spatial_size": [16, 16, 16]}, method="cmsl", epoch=7)
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"], "no temporary file left behind"
    loaded, meta = load_checkpoint(path)
    x = torch.randn(*VOLUME)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert meta["config"] == model.config and meta["class_names"] == ["normal", "lesion"]
    assert not loaded.training


def test_checkpoint_errors_are_specific(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"state": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="needs 'model' and 'config'"):
        load_checkpoint(tmp_path / "foreign.pt")
    model = create_model("cpunet", in_channels=1, num_classes=2)
    payload = {"model": model.state_dict(), "config": {**model.config, "num_classes": 3}}
    torch.save(payload, tmp_path / "shapes.pt")
    with pytest.raises(CheckpointError, match="shape mismatches.*classifier.weight"):
        load_checkpoint(tmp_path / "shapes.pt")
    state = dict(model.state_dict())
    state.pop("classifier.bias")
    torch.save({"model": state, "config": model.config}, tmp_path / "keys.pt")
    with pytest.raises(CheckpointError, match="missing keys.*classifier.bias"):
        load_checkpoint(tmp_path / "keys.pt")
    torch.save({"model": model.state_dict(), "config": {**model.config, "name": "nope"}}, tmp_path / "cfg.pt")
    with pytest.raises(CheckpointError, match="cannot build a model"):
        load_checkpoint(tmp_path / "cfg.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "text.pt")
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "x.pt", model, config={})


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("stem_width", [0, 8])
def test_cpunet_stems_halve_then_stride(spatial_dims, stem_width):
    torch.manual_seed(0)
    model = create_model("cpunet", in_channels=1, num_classes=2, spatial_dims=spatial_dims, stem_width=stem_width,
                         widths=(4, 8, 16), depths=(1, 0, 1))
    fmap = model.forward_features(torch.randn(2, 1, *([28] * spatial_dims)))
    assert fmap.shape == (2, 16, *([4] * spatial_dims))  # 28 -> 14 -> 7 -> 4


@pytest.mark.parametrize("name", list_models())
def test_every_backbone_takes_its_registered_default_input(name):
    defaults = backbone_defaults(name)
    if defaults.input_layout == "3d":
        assert len(defaults.default_size) == 3 and defaults.slices is None
    else:
        assert len(defaults.default_size) == 2 and defaults.slices >= 1
        assert defaults.input_size == (defaults.slices, *defaults.default_size)
    model = create_model(name, in_channels=1, num_classes=2)
    fmap = feature_map_size(model, defaults.input_size)  # shape inference on the meta device
    assert len(fmap) == 3 and min(fmap) >= 1


def test_cli_default_input_is_the_registered_one():
    assert backbone_defaults(DEFAULT_MODEL).default_size == (64, 64, 64)  # the CLI's datalist default
    assert backbone_defaults(DEFAULT_MODEL).orientation == "RAS"
    # slice_channels builds for its registered slab depth unless told otherwise
    k = backbone_defaults("slice_channels").slices
    assert create_model("slice_channels", in_channels=1, num_classes=2).backbone.num_slices == k


@pytest.fixture
def scratch_backbone():
    """Registers backbones under test names and removes them again, so other tests see the real registry."""
    names = []

    def register(name, **defaults):
        names.append(name)
        return register_backbone(name, **defaults)

    yield register
    for name in names:
        registry._BACKBONES.pop(name, None)
        registry._DEFAULTS.pop(name, None)


def test_register_backbone_checks_its_defaults_and_create_model_applies_default_kwargs(scratch_backbone):
    with pytest.raises(ValueError, match="input_layout"):
        scratch_backbone("_t_layout", input_layout="2d", default_size=(8, 8, 8))
    with pytest.raises(ValueError, match="3-entry default_size"):
        scratch_backbone("_t_size", default_size=(8, 8))
    with pytest.raises(ValueError, match="slices >= 1"):
        scratch_backbone("_t_slices", input_layout="2.5d", default_size=(8, 8))
    with pytest.raises(ValueError, match="axcodes"):
        scratch_backbone("_t_orient", default_size=(8, 8, 8), orientation="RAR")
    with pytest.raises(KeyError, match="cpunet"):
        backbone_defaults("_t_unknown")
    scratch_backbone("_t_tiny", default_size=(8, 8, 8), orientation="sar",
                     default_kwargs={"widths": (4, 8), "depths": (1, 1)})(registry.get_backbone_builder("cpunet"))
    assert backbone_defaults("_t_tiny").orientation == "SAR"
    model = create_model("_t_tiny", in_channels=1, num_classes=2)
    assert model.backbone.num_features == 8 and model.config["widths"] == [4, 8]
    assert create_model("_t_tiny", in_channels=1, num_classes=2, widths=(4, 6)).backbone.num_features == 6
    assert create_model(**model.config).config == model.config
    with pytest.raises(dataclasses.FrozenInstanceError):
        backbone_defaults("_t_tiny").default_size = (1, 1, 1)
