"""medimb.losses: CMSL, stage-1 combination, metric losses, re-balancing baselines, input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medimb.losses import (
    LOSSES,
    ClassCentreTripletLoss,
    CosineMarginSigmoidLoss,
    DeferredReweighting,
    LDAMLoss,
    LogitAdjustedLoss,
    Stage1Loss,
    class_weights_from_counts,
    create_loss,
    create_metric_loss,
)
from medimb.networks import CMSLHead, CosineHead, LinearHead, LWSHead, TauNormHead, create_model
from medimb.training.config import Stage2Config, TrainConfig, method_config
from medimb.training.losses import build_classification_loss, build_stage1_loss

torch.set_num_threads(1)
COUNTS = [90, 10]


def _cosines(batch=16, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, classes, generator=g) * 2 - 1, torch.randint(0, classes, (batch,), generator=g)


@pytest.mark.parametrize("classes", [2, 4])
def test_cmsl_without_margin_is_bce_on_scaled_cosine(classes):
    cos, y = _cosines(classes=classes)
    loss = CosineMarginSigmoidLoss(scale=16.0, margin=0.0)(16.0 * cos, y)
    expected = F.binary_cross_entropy_with_logits(16.0 * cos, F.one_hot(y, classes).float())
    assert torch.allclose(loss, expected, atol=1e-6)


def test_cmsl_matches_the_design_formula():
    cos, y = _cosines(classes=3)
    s, m = 10.0, 0.3
    t = F.one_hot(y, 3).float()
    manual = -(t * F.logsigmoid(s * (cos - m)) + (1 - t) * F.logsigmoid(-s * (cos + m))).mean()
    assert torch.allclose(CosineMarginSigmoidLoss(scale=s, margin=m)(s * cos, y), manual, atol=1e-5)


def test_cmsl_single_binary_logit_is_bce_with_a_signed_margin():
    cos, y = _cosines(classes=2)
    single = cos[:, 1]
    loss = CosineMarginSigmoidLoss(scale=8.0, margin=0.2, reduction="none")(8.0 * single, y)
    t = y.float().unsqueeze(1)
    manual = F.binary_cross_entropy_with_logits(8.0 * single.unsqueeze(1) - 8.0 * 0.2 * (2 * t - 1), t, reduction="none")
    assert loss.shape == (16, 1) and torch.allclose(loss, manual, atol=1e-6)


def test_cmsl_larger_margin_gives_larger_loss():
    cos, y = _cosines(classes=3)
    losses = [CosineMarginSigmoidLoss(scale=16.0, margin=m)(16.0 * cos, y).item() for m in (0.0, 0.1, 0.3, 0.5)]
    assert losses == sorted(losses) and losses[0] < losses[-1]


def test_cmsl_gradients_reach_features_and_class_weights():
    torch.manual_seed(0)
    head = CMSLHead(8, 3, scale=16.0)
    features = torch.randn(6, 8, requires_grad=True)
    CosineMarginSigmoidLoss(scale=16.0, margin=0.2)(head(features), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    for grad, param in ((features.grad, features), (head.weight.grad, head.weight)):
        assert grad is not None and grad.shape == param.shape and torch.isfinite(grad).all()
        assert grad.abs().sum() > 0


def test_cmsl_finite_at_scale_64_with_saturated_inputs():
    s = 64.0
    cos = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]], requires_grad=True)
    y = torch.tensor([1, 0, 0, 1])  # every sample has its target cosine at -1: maximally wrong
    loss = CosineMarginSigmoidLoss(scale=s, margin=0.5)(s * cos, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(cos.grad).all()
    assert loss.item() > 50  # large but finite (a naive log(sigmoid) would give inf)
    right = CosineMarginSigmoidLoss(scale=s, margin=0.5)(s * torch.tensor([[1.0, -1.0]]), torch.tensor([0]))
    assert torch.isfinite(right) and right.item() < 1e-6


def test_cmsl_rejects_bad_settings():
    with pytest.raises(ValueError, match="margin"):
        CosineMarginSigmoidLoss(scale=16.0, margin=1.5)
    with pytest.raises(ValueError, match="scale must be > 0"):
        CosineMarginSigmoidLoss(scale=0.0)
    with pytest.raises(ValueError, match="needs scale="):
        create_loss("cmsl")  # no hidden default s: it is the head's


@pytest.mark.parametrize("head", [CMSLHead(8, 3, scale=12.0), CosineHead(8, 3, scale=12.0),
                                  LWSHead.from_head(CMSLHead(8, 3, scale=12.0))])
def test_cmsl_takes_its_scale_from_the_head(head):
    loss = CosineMarginSigmoidLoss.for_head(head, margin=0.3)
    assert (loss.scale, loss.margin) == (12.0, 0.3)
    cos, y = _cosines(classes=3)
    assert torch.equal(loss(12.0 * cos, y), CosineMarginSigmoidLoss(scale=12.0, margin=0.3)(12.0 * cos, y))


@pytest.mark.parametrize("head", [LinearHead(8, 3), TauNormHead.from_head(LinearHead(8, 3)),
                                  LWSHead.from_head(LinearHead(8, 3))])
def test_cmsl_for_a_head_without_scaled_cosines_is_a_clear_error(head):
    with pytest.raises(ValueError, match=f"needs a cosine or CMSL head .*{type(head).__name__}"):
        CosineMarginSigmoidLoss.for_head(head)
    with pytest.raises(ValueError, match="needs a cosine or CMSL head"):
        build_classification_loss("cmsl", COUNTS, head=head)


def test_training_builds_cmsl_from_the_model_head():
    model = create_model("cpunet", in_channels=1, num_classes=2, head="cmsl", head_kwargs={"scale": 24.0})
    loss = build_stage1_loss("cmsl", COUNTS, loss_kwargs={"margin": 0.1}, head=model.classifier)
    assert (loss.classification_loss.scale, loss.classification_loss.margin) == (24.0, 0.1)
    same = build_classification_loss("cmsl", COUNTS, head=model.classifier, scale=24.0)
    assert same.scale == 24.0
    with pytest.raises(ValueError, match="differs from the head's s=24.0"):
        build_classification_loss("cmsl", COUNTS, head=model.classifier, scale=16.0)
    # without a head the loss is standalone and needs its scale
    assert build_classification_loss("cmsl", COUNTS, scale=8.0).scale == 8.0


def test_ldam_with_a_cosine_head_takes_its_scale():
    cosine = CosineHead(8, 2, scale=30.0)
    assert build_classification_loss("ldam", COUNTS, head=cosine).scale == 30.0
    assert build_classification_loss("ldam", COUNTS, head=cosine, scale=5.0).scale == 5.0
    assert build_classification_loss("ldam", COUNTS, head=LinearHead(8, 2)).scale == 1.0  # logit units


def test_stage2_inherits_the_stage1_loss_settings_unless_overridden():
    m = method_config("cmsl-two-stage")
    m.stage1.loss_kwargs["margin"] = 0.0
    assert m.stage2.loss_kwargs is None and m.resolved().stage2.loss_kwargs == {"margin": 0.0}
    run = TrainConfig(data="d.npz", out="run", method=m)  # a run holds the method resolved
    assert run.method.stage2.loss_kwargs == {"margin": 0.0}
    recorded = run.to_dict()  # what config.json holds
    assert recorded["method"]["stage2"]["loss_kwargs"] == {"margin": 0.0}
    assert TrainConfig.from_dict(recorded) == run
    m.stage2.loss_kwargs = {"margin": 0.3}  # an explicit stage-2 setting wins
    assert m.resolved().stage2.loss_kwargs == {"margin": 0.3}
    m.stage2.loss_kwargs = {}  # so does an explicit "none"
    assert m.resolved().stage2.loss_kwargs == {}
    # a different stage-2 loss inherits nothing
    m = method_config("cmsl-two-stage")
    m.stage1.loss_kwargs["margin"] = 0.0
    m.stage2 = Stage2Config(loss="ce")
    assert m.resolved().stage2.loss_kwargs == {}
    # resolving copies: the method itself keeps None (later stage-1 changes are still inherited)
    assert m.stage2.loss_kwargs is None and m.resolved().stage1.loss_kwargs is not m.stage1.loss_kwargs


def test_builtin_methods_resolve_stage2_to_their_previous_settings():
    for name in ("crt", "two-stage", "two-stage-triplet", "two-stage-supcon"):
        assert method_config(name).resolved().stage2.loss_kwargs == {}, name
    # the CMSL methods train without a margin (it won every validation sweep); stage 2 inherits it
    assert method_config("cmsl").stage1.loss_kwargs == {"margin": 0.0}
    assert method_config("cmsl-two-stage").resolved().stage2.loss_kwargs == {"margin": 0.0}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_rejects_bad_labels_and_nonfinite_logits(name):
    loss = create_loss(name, class_counts=COUNTS, **({"scale": 16.0} if name == "cmsl" else {}))
    logits = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"label\(s\) \[2\] outside the class range \[0, 1\]"):
        loss(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"logits contains 1 NaN and 0 Inf values \(diverged training"):
        loss(torch.tensor([[0.0, float("nan")], [0.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="integer class indices"):
        loss(logits, torch.tensor([0.0, 1.0, 0.0]))
    value = loss(logits, torch.tensor([0, 1, 0]))
    assert value.ndim == 0 and torch.isfinite(value)


def test_loss_factory_rejects_missing_counts_unknown_names_and_empty_classes():
    with pytest.raises(ValueError, match="needs class_counts"):
        create_loss("weighted-ce")
    with pytest.raises(KeyError, match="balanced_softmax"):
        create_loss("softmax-balanced")
    with pytest.raises(ValueError, match="at least one training sample"):
        create_loss("ldam", class_counts=[10, 0])


def test_class_weights_favour_the_minority():
    for method in ("inverse", "sqrt_inverse", "effective"):
        w = class_weights_from_counts(COUNTS, method, beta=0.99)
        assert w[1] > w[0] and torch.isclose(w.mean(), torch.tensor(1.0))
    assert torch.allclose(class_weights_from_counts(COUNTS, "inverse"), torch.tensor([0.2, 1.8]))


def test_weighted_ce_equals_torch_weighted_ce():
    logits, y = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1] * 4)
    w = class_weights_from_counts(COUNTS)
    assert torch.allclose(create_loss("weighted_ce", class_counts=COUNTS)(logits, y), F.cross_entropy(logits, y, weight=w))


def test_focal_with_gamma_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g)
    assert torch.allclose(create_loss("focal", gamma=0.0)(logits, y), F.cross_entropy(logits, y), atol=1e-5)
    assert create_loss("focal", gamma=2.0)(logits, y) < F.cross_entropy(logits, y)


def test_ldam_margins_and_drw_schedule():
    loss = LDAMLoss(COUNTS, max_margin=0.5, scale=1.0)
    assert torch.isclose(loss.margins[1], torch.tensor(0.5)) and loss.margins[0] < loss.margins[1]
    logits, y = torch.zeros(2, 2), torch.tensor([0, 1])
    shifted = torch.tensor([[-loss.margins[0], 0.0], [0.0, -0.5]])
    assert torch.allclose(loss(logits, y), F.cross_entropy(shifted, y))
    drw = DeferredReweighting(COUNTS, start_epoch=2)
    assert drw.apply(loss, 0) is None and loss.weight is None
    weights = drw.apply(loss, 2)
    assert weights[1] > weights[0] and torch.equal(loss.weight, weights)
    assert torch.allclose(loss(logits, y), F.cross_entropy(shifted, y, weight=weights))


def test_balanced_softmax_adds_the_log_prior():
    logits, y = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1] * 4)
    prior = torch.tensor([0.9, 0.1])
    assert torch.allclose(LogitAdjustedLoss(COUNTS)(logits, y), F.cross_entropy(logits + prior.log(), y), atol=1e-6)
    assert torch.allclose(create_loss("logit-adjustment", class_counts=COUNTS, tau=0.0)(logits, y),
                          F.cross_entropy(logits, y))


def _embeddings(seed=0, batch=12, dim=8):
    g = torch.Generator().manual_seed(seed)
    e = F.normalize(torch.randn(batch, dim, generator=g), dim=1).requires_grad_()
    return e, torch.tensor([0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1])


@pytest.mark.parametrize("name", ["triplet_batch_hard", "triplet_semihard", "supcon"])
def test_metric_losses_separate_classes(name):
    loss = create_metric_loss(name)
    e, y = _embeddings()
    value = loss(e, y)
    value.backward()
    assert torch.isfinite(value) and e.grad.abs().sum() > 0
    noise = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    clustered = F.normalize(F.one_hot(y, 8).float() + 0.01 * noise, dim=1)
    assert loss(clustered, y) < value


def test_class_centre_triplet_trains_centres_and_handles_a_lone_minority_sample():
    torch.manual_seed(0)  # the centres' random initialisation
    loss = ClassCentreTripletLoss(num_classes=2, embedding_dim=8, margin=0.2)
    e = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    value = loss(e, torch.tensor([0, 0, 0, 1]))
    value.backward()
    assert value > 0 and loss.centres.grad.abs().sum() > 0 and e.grad.abs().sum() > 0
    with torch.no_grad():
        loss.centres.copy_(torch.eye(2, 8))  # centres sqrt(2) apart, well beyond the margin
    assert loss(torch.eye(2, 8), torch.tensor([0, 1])) == 0
    assert loss(torch.eye(2, 8), torch.tensor([1, 0])) > 1.0  # each sample sits on the wrong centre
    with pytest.raises(ValueError, match="class range"):
        loss(e, torch.tensor([0, 0, 0, 2]))
    built = create_metric_loss("class-centre-triplet", num_classes=3, embedding_dim=8, margin=0.3)
    assert isinstance(built, ClassCentreTripletLoss) and built.margin == 0.3
    assert built.centres.shape == (3, 8) and torch.allclose(built.centres.norm(dim=1), torch.ones(3))


def test_stage1_loss_is_the_sum_of_its_parts():
    torch.manual_seed(0)
    logits, y = torch.randn(12, 2, requires_grad=True), _embeddings()[1]
    e = _embeddings()[0]
    combined = Stage1Loss(create_loss("ce"), create_metric_loss("supcon"), weight=0.3)
    total = combined(logits, e, y)
    expected = F.cross_entropy(logits, y) + 0.3 * create_metric_loss("supcon")(e, y)
    assert torch.allclose(total, expected, atol=1e-6)
    parts = combined.parts
    assert torch.allclose(parts["total"], parts["classification"] + 0.3 * parts["metric"], atol=1e-6)
    total.backward()
    # d/dlogits: only the cross-entropy term, (softmax - one-hot) / batch; d/de: only 0.3 x the metric term
    expected_logits_grad = (torch.softmax(logits.detach(), 1) - F.one_hot(y, 2).float()) / len(y)
    assert logits.grad is not None and torch.allclose(logits.grad, expected_logits_grad, atol=1e-6)
    e_alone = e.detach().clone().requires_grad_()
    (0.3 * create_metric_loss("supcon")(e_alone, y)).backward()
    assert e.grad is not None and torch.isfinite(e.grad).all() and e.grad.abs().sum() > 0
    assert torch.allclose(e.grad, e_alone.grad, atol=1e-6)
    assert torch.equal(Stage1Loss(create_loss("ce"), None)(logits, e, y), F.cross_entropy(logits, y))


def test_metric_loss_factory_rejects_unknown_names_nonfinite_embeddings_and_bad_miners():
    with pytest.raises(KeyError, match="supcon"):
        create_metric_loss("arcface")
    with pytest.raises(ValueError, match=r"embeddings contains 32 NaN and 0 Inf values"):
        create_metric_loss("supcon")(torch.full((4, 8), float("nan")), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="miner"):
        create_metric_loss("triplet", miner="hardest")
