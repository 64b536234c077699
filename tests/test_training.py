"""medimb.training: stage 2 keeps the backbone bit-identical, resume equals an uninterrupted run, configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.training import tiny_config, tiny_npz

from medimb.data import load_splits
from medimb.networks import load_checkpoint
from medimb.evaluation import prediction
from medimb.training import METHODS, TrainConfig, method_config, run_stage1, run_stage2, train, workflow
from medimb.training.workflow import build_model


def _frozen_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier.")}


@pytest.mark.parametrize("rebalance", ["crt", "lws", "tau_norm"])
def test_stage2_leaves_backbone_bit_identical(tmp_path, rebalance):
    data = tiny_npz(tmp_path / "tiny.npz")
    cfg = tiny_config(data, tmp_path / "out", "crt", epochs=1)
    cfg.method.stage2.rebalance = rebalance
    splits = load_splits(data)
    model = build_model(cfg, splits)
    run_stage1(model, splits, cfg.method.stage1, tmp_path / "out", torch.device("cpu"), progress=False)
    before = _frozen_state(model)
    head_before = model.classifier.weight.detach().clone()
    info = run_stage2(model, splits, cfg.method.stage2, tmp_path / "out", torch.device("cpu"), progress=False)
    after = _frozen_state(model)
    assert before.keys() == after.keys() and any(k.endswith("running_mean") for k in after)  # BN buffers too
    for key in before:
        assert torch.equal(before[key], after[key]), key
    if rebalance == "crt":  # a re-initialised, re-trained head
        assert not torch.equal(head_before, model.classifier.weight)
    if rebalance == "lws":
        assert torch.equal(head_before, model.classifier.weight)
    if rebalance == "tau_norm":
        assert info["tau"] in cfg.method.stage2.taus
    assert model.config["head"] == {"crt": "linear", "lws": "lws", "tau_norm": "tau_norm"}[rebalance]


@pytest.mark.slow
@pytest.mark.parametrize("crash_seed, crash_epoch", [(0, 3), (1, 1)], ids=["mid-stage1", "stage-boundary"])
def test_resumed_run_ends_where_an_uninterrupted_run_does(tmp_path, monkeypatch, crash_seed, crash_epoch):
    """Killed in the middle of stage 1, or after stage 1 finished and before stage 2 trained a step
    (stage 2's EpochSeeder runs with seed + 1): the resumed run ends bit-identical to the uninterrupted one."""
    data = tiny_npz(tmp_path / "tiny.npz")
    full = train(tiny_config(data, tmp_path / "full", epochs=3, stage2_epochs=2), progress=False)

    original = workflow.EpochSeeder.__call__

    def crash(self, engine):
        if engine.state.epoch == crash_epoch and self.seed == crash_seed:
            raise KeyboardInterrupt
        original(self, engine)

    monkeypatch.setattr(workflow.EpochSeeder, "__call__", crash)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, tmp_path / "resumed", epochs=3, stage2_epochs=2), progress=False)
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    monkeypatch.setattr(workflow.EpochSeeder, "__call__", original)
    resumed = train(tiny_config(data, tmp_path / "resumed", epochs=3, stage2_epochs=2), resume=True, progress=False)

    assert resumed["selection"]["stage1"] == full["selection"]["stage1"]
    assert resumed["validation"] == full["validation"] and resumed["test"] == full["test"]
    a, _ = load_checkpoint(tmp_path / "full" / "final.pt")
    b, _ = load_checkpoint(tmp_path / "resumed" / "final.pt")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_checkpoint_contract_and_outputs(tmp_path):
    data = tiny_npz(tmp_path / "tiny.npz")
    res = train(tiny_config(data, tmp_path / "out", "two-stage", epochs=2, stage2_epochs=1), progress=False)
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("validation", "test"):
        for key in ("balanced_accuracy", "auc", "accuracy", "macro_f1", "per_class_recall", "confusion_matrix"):
            assert key in metrics[split]
    assert metrics["test"] == res["test"]
    model, meta = load_checkpoint(out / "final.pt")
    assert meta["method"] == "two-stage" and meta["class_names"] == ["0", "1"]
    assert meta["preprocessing"]["source"] == "medmnist" and meta["config"] == model.config
    stage1, stage1_meta = load_checkpoint(out / "stage1_best.pt")
    assert stage1.config["head"] == "linear"
    # the class prior each head is fitted under: CE on the training split in stage 1, balanced after cRT
    counts = meta["class_counts"]
    assert stage1_meta["head_prior"] == pytest.approx(counts[1] / sum(counts)) and meta["head_prior"] == 0.5
    assert TrainConfig.from_dict(json.loads((out / "config.json").read_text())).method.stage1.metric_loss == "supcon"
    for split in ("validation", "test"):
        assert {p.rsplit("/", 1)[-1] for p in res["plots"][split]} == {"roc.png", "pr.png", "confusion_matrix.png",
                                                                     "reliability.png", "features_pca.png"}
        assert all(f"/plots/{split}/" in p for p in res["plots"][split])


def test_every_method_has_one_config_and_round_trips():
    assert set(METHODS) == {"ce", "weighted-ce", "focal", "ldam-drw", "balanced-softmax", "crt", "two-stage-triplet",
                            "two-stage-supcon", "cmsl", "cmsl-two-stage", "two-stage"}
    for name in METHODS:
        cfg = TrainConfig(data="x.npz", out="o", method=method_config(name))
        again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg
    a = method_config("ce")
    a.stage1.epochs = 1
    assert method_config("ce").stage1.epochs == 30  # copies, the registry is never mutated


def test_flip_tta_averages_probabilities_over_every_axis_flip(tmp_path):
    data = tiny_npz(tmp_path / "tiny.npz")
    splits = load_splits(data)
    torch.manual_seed(0)
    model = build_model(tiny_config(data, tmp_path / "out"), splits).eval()
    assert prediction.flip_combinations(3) == [(), (2,), (3,), (2, 3), (4,), (2, 4), (3, 4), (2, 3, 4)]

    plain = prediction.predict(model, splits.test, torch.device("cpu"))
    tta = prediction.predict(model, splits.test, torch.device("cpu"), flip_tta=True)
    x = torch.stack([torch.as_tensor(splits.test[i]["image"]) for i in range(len(splits.test))])
    with torch.no_grad():
        expected = torch.stack([torch.softmax(model(x.flip(d)), 1) for d in prediction.flip_combinations(3)]).mean(0)
    assert torch.allclose(torch.as_tensor(tta["proba"]), expected, atol=1e-5)
    assert not torch.allclose(torch.as_tensor(plain["proba"]), expected, atol=1e-4)  # the untrained net is not symmetric
    assert (tta["features"] == plain["features"]).all()  # features stay those of the unflipped input
    # the averaged prediction is flip-invariant: predict on a test set flipped along any axis (or all three)
    # gives the same probabilities under flip TTA, while without TTA the flip changes them
    for dims in [(1,), (2,), (3,), (1, 2, 3)]:  # spatial axes of one (C, D, H, W) item
        flipped_set = [{"image": torch.as_tensor(item["image"]).flip(dims), "label": item["label"]}
                       for item in (splits.test[i] for i in range(len(splits.test)))]
        flipped_tta = prediction.predict(model, flipped_set, torch.device("cpu"), flip_tta=True)
        np.testing.assert_allclose(flipped_tta["proba"], tta["proba"], atol=1e-5, err_msg=str(dims))
        np.testing.assert_array_equal(flipped_tta["labels"], tta["labels"])
        flipped_plain = prediction.predict(model, flipped_set, torch.device("cpu"))
        assert not np.allclose(flipped_plain["proba"], plain["proba"], atol=1e-4), dims


def test_flip_tta_only_for_models_trained_with_flips(tmp_path):
    splits = load_splits(tiny_npz(tmp_path / "tiny.npz"))
    assert prediction.uses_flip_tta(True, splits.preprocessing)
    assert not prediction.uses_flip_tta(False, splits.preprocessing)
    splits.preprocessing.augmentation.flip_prob = 0.0
    assert not prediction.uses_flip_tta(True, splits.preprocessing)


def test_small_data_recipe_warmup_cosine_schedule_and_defaults():
    from medimb.training import warmup_cosine_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine_scheduler(opt, epochs=10, warmup_epochs=3)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs[:4], [0.1, 0.4, 0.7, 1.0], atol=1e-6)  # linear warm-up into the peak
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] < 0.1  # then cosine towards 0
    # resumes from its state and the optimiser's (the engines save both with the trainer)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    again = warmup_cosine_scheduler(opt2, epochs=10, warmup_epochs=3)
    again.load_state_dict(sched.state_dict())
    opt2.load_state_dict(opt.state_dict())
    opt.step(), sched.step(), opt2.step(), again.step()
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
    plain = warmup_cosine_scheduler(opt2, epochs=5, warmup_epochs=0)
    assert isinstance(plain, torch.optim.lr_scheduler.CosineAnnealingLR)
    # the defaults the resume test above runs with: warm-up and clipping on
    s1 = method_config("two-stage").stage1
    assert s1.warmup_epochs > 0 and s1.grad_clip_norm and method_config("cmsl-two-stage").stage1.grad_clip_norm


def test_small_training_sets_get_smaller_batches_and_a_scaled_learning_rate():
    s1, s2 = method_config("two-stage").stage1, method_config("two-stage").stage2
    assert s1.batch_and_lr(1188) == (32, s1.lr)  # MedMNIST-sized sets: unchanged
    batch, lr = s1.batch_and_lr(36)  # 60 synthetic cases, 36 for training
    assert batch == 9 and lr == pytest.approx(s1.lr * (9 / 32) ** 0.5)
    assert s2.batch_and_lr(36) == (5, s2.lr) and s2.batch_and_lr(1188) == (32, s2.lr)
    assert s1.batch_and_lr(3)[0] == 2  # never a batch of 1 (BatchNorm)


def test_gradient_clipping_bounds_the_norm_before_the_step(tmp_path):
    from medimb.training import Stage1Trainer
    from medimb.training.handlers import GradientClipping

    with pytest.raises(ValueError, match="max_norm > 0"):
        GradientClipping(0)
    data = tiny_npz(tmp_path / "tiny.npz")
    cfg = tiny_config(data, tmp_path / "out", "ce", epochs=1)
    splits = load_splits(data)
    model = build_model(cfg, splits)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=8)
    norms = []
    trainer = Stage1Trainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=model,
                            optimizer=opt, loss_function=lambda logits, y: 1e4 * torch.nn.functional.cross_entropy(
                                logits, y), grad_clip_norm=0.5, epoch_length=2)
    from monai.engines.utils import IterationEvents

    @trainer.on(IterationEvents.BACKWARD_COMPLETED)
    def _norm(engine):  # attached after the clipping handler: sees the clipped gradients
        grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))

    trainer.run()
    assert len(norms) == 2 and max(norms) <= 0.5 + 1e-4


def test_prior_operating_point_is_the_training_prior_of_the_head(tmp_path):
    from medimb.errors import UserError
    from medimb.training.workflow import run_training

    data = tiny_npz(tmp_path / "tiny.npz")
    res = run_training(tiny_config(data, tmp_path / "ce", "ce", epochs=1), progress=False, operating_rule="prior")
    _, meta = load_checkpoint(tmp_path / "ce" / "final.pt")
    counts = meta["class_counts"]
    assert meta["head_prior"] == pytest.approx(counts[1] / sum(counts))
    assert res["operating_point"]["rule"] == "prior"
    assert res["test"]["threshold"] == pytest.approx(counts[1] / sum(counts))
    with pytest.raises(UserError, match="no single class prior"):
        run_training(tiny_config(data, tmp_path / "focal", "focal", epochs=1), progress=False, operating_rule="prior")
