"""Operating point of binary models, bootstrap intervals, and the evaluation plots that show them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medimb.evaluation import plots
from medimb.evaluation.metrics import bootstrap_ci, compute_metrics, format_ci_summary
from medimb.evaluation.operating_point import (
    choose_threshold,
    predict_classes,
    resolve_operating_point,
    sensitivity_rule,
    store_operating_point,
    threshold_for,
)
from medimb.evaluation.predictions_csv import SplitPredictions, read_predictions
from medimb.evaluation.report import EvaluationReport, write_evaluation

Y = np.array([0, 0, 0, 0, 0, 0, 1, 1])
P1 = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.2, 0.7, 0.45])
PROBA = np.stack([1 - P1, P1], axis=1)


def _proba(p1) -> np.ndarray:
    p1 = np.asarray(p1, dtype=float)
    return np.stack([1 - p1, p1], axis=1)


def test_balanced_accuracy_threshold_by_hand():
    # distinct scores 0.1 0.2 0.3 0.4 0.45 0.6 0.7 -> candidates are their midpoints; between 0.4 and 0.45
    # (0.425) both positives and 5 of 6 negatives are right: balanced accuracy 11/12, the only maximum
    point = choose_threshold(Y, PROBA)
    assert point["threshold"] == pytest.approx(0.425)
    assert point["rule"] == "balanced_accuracy" and point["positive_class"] == 1
    assert point["validation"] == {"num_samples": 8, "class_counts": [6, 2],
                                   "balanced_accuracy": pytest.approx(11 / 12), "sensitivity": 1.0,
                                   "specificity": pytest.approx(5 / 6)}
    # P(1) (N,) works too, and metrics at that threshold
    assert choose_threshold(Y, P1)["threshold"] == point["threshold"]
    m = compute_metrics(Y, PROBA, threshold=point["threshold"])
    assert m["confusion_matrix"] == [[5, 1], [0, 2]] and m["threshold"] == pytest.approx(0.425)
    assert m["balanced_accuracy"] == pytest.approx(11 / 12) and m["accuracy"] == pytest.approx(7 / 8)
    assert m["sensitivity"] == 1.0 and m["specificity"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1))  # TP 2, FP 1, FN 0
    assert m["auc"] == compute_metrics(Y, PROBA)["auc"]  # ranking metrics do not depend on the threshold


def test_ties_go_to_the_threshold_closest_to_one_half():
    # perfectly separated: one interval of best thresholds, its midpoint
    assert choose_threshold([0, 0, 1, 1], _proba([0.1, 0.2, 0.8, 0.9]))["threshold"] == pytest.approx(0.5)
    # two best thresholds (balanced accuracy 0.75 at 0.2 and at 0.75): 0.75 is closer to 0.5
    assert choose_threshold([0, 0, 1, 1], _proba([0.1, 0.6, 0.3, 0.9]))["threshold"] == pytest.approx(0.75)


def test_sensitivity_rule_takes_the_highest_threshold_reaching_the_target():
    assert sensitivity_rule(0.9) == "sensitivity>=0.9"
    # sensitivity >= 0.9 needs both positives: the highest such threshold is below 0.45
    assert choose_threshold(Y, PROBA, "sensitivity>=0.9")["threshold"] == pytest.approx(0.425)
    # >= 0.5: one positive (0.7) is enough -> between 0.6 and 0.7, specificity 1
    point = choose_threshold(Y, PROBA, sensitivity_rule(0.5))
    assert point["threshold"] == pytest.approx(0.65)
    assert point["validation"]["sensitivity"] == 0.5 and point["validation"]["specificity"] == 1.0
    # 20 positives: sensitivity >= 0.9 means 18 above the threshold
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(30, int), np.ones(20, int)]
    p = np.r_[rng.uniform(0, 0.7, 30), rng.uniform(0.3, 1, 20)]
    point = choose_threshold(y, p, "sensitivity>=0.9")
    pos = np.sort(p[y == 1])  # pos[2]: the lowest of the 18 highest positives
    assert (p[y == 1] > point["threshold"]).sum() == 18
    assert np.max(p[p < pos[2]]) < point["threshold"] < pos[2]  # the highest such threshold
    with pytest.raises(ValueError, match="rule"):
        choose_threshold(Y, PROBA, "specificity>=0.9")


def test_undecidable_validation_falls_back_to_one_half_with_a_warning():
    with pytest.warns(UserWarning, match="one class"):
        point = choose_threshold([0, 0, 0], _proba([0.2, 0.7, 0.4]))
    assert point["threshold"] == 0.5 and "fallback" in point


def test_default_threshold_equals_argmax_for_softmax_and_cmsl_probabilities():
    from medimb.networks import predict_proba

    torch.manual_seed(0)  # half of the rows are near-ties, where float32 rounding gives P(1) == 0.5 > P(0)
    logits = torch.randn(2000, 2) * torch.tensor([[1.0], [1e-7]]).repeat(1000, 1)
    logits[:10] = 0.0  # exact ties: argmax says class 0
    for head in ("softmax", "sigmoid"):
        proba = predict_proba(head, logits).double().numpy()
        np.testing.assert_array_equal(predict_classes(proba), proba.argmax(axis=1))
        np.testing.assert_array_equal(predict_classes(proba, 0.5), proba.argmax(axis=1))
    # multi-class: argmax, and a threshold is an error
    p3 = np.array([[0.2, 0.5, 0.3]])
    assert predict_classes(p3).tolist() == [1]
    with pytest.raises(ValueError, match="binary"):
        predict_classes(p3, 0.3)


def test_bootstrap_interval_contains_the_estimate_and_is_deterministic():
    rng = np.random.default_rng(1)
    y = (rng.random(80) < 0.3).astype(int)
    p = _proba(np.clip(0.35 * y + 0.65 * rng.random(80), 0, 1))
    m = compute_metrics(y, p, threshold=0.4)
    ci = bootstrap_ci(y, p, threshold=0.4, seed=0)
    assert set(ci) == {"balanced_accuracy", "auc", "sensitivity", "specificity"}
    for key, (lo, hi) in ci.items():
        assert lo <= m[key] <= hi and hi - lo > 0.01, key
    assert bootstrap_ci(y, p, threshold=0.4, seed=0) == ci
    assert bootstrap_ci(y, p, threshold=0.4, seed=1) != ci
    # one class: no AUC, no sensitivity; multi-class: balanced accuracy and AUC
    one = bootstrap_ci(np.zeros(5, int), _proba([0.1, 0.2, 0.3, 0.6, 0.9]), n_resamples=200)
    assert one["auc"] is None and one["sensitivity"] is None and one["specificity"] is not None
    # every positive found: the Wilson interval of sensitivity does not collapse to 1.00-1.00
    sens = bootstrap_ci([0] * 20 + [1] * 12, _proba([0.2] * 20 + [0.9] * 12), n_resamples=200)["sensitivity"]
    assert sens[1] == 1.0 and sens[0] == pytest.approx(0.757, abs=0.01)
    y3 = np.arange(30) % 3
    assert set(bootstrap_ci(y3, rng.dirichlet([1, 1, 1], 30), n_resamples=200)) == {"balanced_accuracy", "auc"}


def test_summary_line_with_intervals():
    m = {"balanced_accuracy": 0.876, "auc": 0.93, "sensitivity": 0.85, "specificity": 0.9, "threshold": 0.42,
         "ci95": {"balanced_accuracy": [0.79, 0.95], "auc": [0.87, 0.98], "sensitivity": [0.69, 1.0],
                  "specificity": [0.8, 0.97]}}
    assert format_ci_summary(m) == ("balanced accuracy 0.88 (0.79-0.95), AUC 0.93 (0.87-0.98), sensitivity 0.85 "
                                    "(0.69-1.00), specificity 0.90 (0.80-0.97), threshold 0.420")


def test_write_evaluation_states_the_threshold_and_intervals(tmp_path):
    parts = [SplitPredictions("test", [f"c{i}" for i in range(8)], Y, PROBA, threshold=0.425)]
    result = write_evaluation(tmp_path, parts, ["benign", "malignant"], bootstrap=500)
    test = json.loads((tmp_path / "metrics.json").read_text())["test"]
    assert test == json.loads(json.dumps(result["test"]))
    assert test["threshold"] == 0.425 and test["confusion_matrix"] == [[5, 1], [0, 2]]
    assert set(test["ci95"]) == {"balanced_accuracy", "auc", "sensitivity", "specificity"}
    assert "500 resamples" in test["ci95_method"]
    rows = read_predictions(tmp_path / "predictions.csv")
    assert [r["predicted"] for r in rows] == (P1 > 0.425).astype(int).tolist()
    assert {r["threshold"] for r in rows} == {0.425}
    names = sorted(p.name for p in (tmp_path / "plots" / "test").iterdir())
    assert names == ["confusion_matrix.png", "pr.png", "reliability.png", "roc.png"]


def test_plots_show_step_pr_titled_confusion_matrix_and_reliability(tmp_path, monkeypatch):
    figures = {}
    real_save = plots._save

    def keep(fig, path):
        figures[path.name if hasattr(path, "name") else str(path)] = (
            [ax.get_title() for ax in fig.axes], [line.get_drawstyle() for line in fig.axes[0].get_lines()],
            fig.axes[0].get_legend_handles_labels()[1])
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_pr(Y, PROBA, tmp_path / "pr.png", class_names=["benign", "malignant"])
    plots.plot_confusion_matrix(Y, PROBA, tmp_path / "cm.png", threshold=0.425, split="test")
    plots.plot_reliability(Y, PROBA, tmp_path / "rel.png", split="test")
    _, styles, labels = figures["pr.png"]
    assert styles[0] == "steps-post" and labels[0].startswith("malignant (AP ")
    assert figures["cm.png"][0][0] == "test: n=8, threshold 0.425"
    assert figures["rel.png"][0][0].startswith("Reliability: test (n=8, ECE ")
    for name in ("pr.png", "cm.png", "rel.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def _checkpoint(path, operating_point=None):
    from medimb.networks import create_model, save_checkpoint

    model = create_model("cpunet", in_channels=1, num_classes=2, spatial_dims=2, widths=[4, 8], depths=[0, 1])
    meta = {"class_names": ["benign", "malignant"]}
    if operating_point is not None:
        meta["operating_point"] = operating_point
    save_checkpoint(path, model, **meta)
    return model


def test_operating_point_stored_in_and_read_from_a_checkpoint(tmp_path):
    from medimb.networks import load_checkpoint

    ckpt = tmp_path / "model.pt"
    _checkpoint(ckpt)
    _, meta = load_checkpoint(ckpt)
    assert threshold_for(2, meta) == 0.5  # older checkpoint: 0.5, i.e. the argmax
    assert resolve_operating_point(2, meta)["rule"] == "default"
    assert threshold_for(3, meta) is None
    point = choose_threshold(Y, PROBA, sensitivity_rule(0.5))
    store_operating_point(ckpt, point)
    _, meta = load_checkpoint(ckpt)  # checksum rewritten: loads without complaint
    assert meta["operating_point"] == point and threshold_for(2, meta) == pytest.approx(0.65)
    assert threshold_for(2, meta, override=0.3) == 0.3
    with pytest.raises(ValueError):
        threshold_for(2, meta, override=1.5)


def test_evaluation_report_reads_or_chooses_the_checkpoint_threshold(tmp_path):
    from types import SimpleNamespace

    from medimb.networks import load_checkpoint

    ckpt = tmp_path / "model.pt"
    model = _checkpoint(ckpt, operating_point={"threshold": 0.65, "rule": "sensitivity>=0.5", "positive_class": 1})
    logits = torch.log(torch.as_tensor(PROBA, dtype=torch.float32))  # softmax(log p) = p

    def run(report):
        engine = SimpleNamespace(state=SimpleNamespace(output={"pred": logits, "label": torch.as_tensor(Y)}))
        report._reset(engine)
        report._collect(engine)
        report._write(engine)
        return report.result

    res = run(EvaluationReport(str(tmp_path / "eval"), model, ["benign", "malignant"], checkpoint=ckpt))
    assert res["test"]["threshold"] == pytest.approx(0.65) and res["operating_point"]["source"] == "checkpoint"
    res = run(EvaluationReport(str(tmp_path / "eval"), model, ["benign", "malignant"]))
    assert res["test"]["threshold"] == 0.5  # no checkpoint: argmax as before
    res = run(EvaluationReport(str(tmp_path / "val"), model, ["benign", "malignant"], split="validation",
                               checkpoint=ckpt, choose_operating_point="balanced_accuracy"))
    assert res["validation"]["threshold"] == pytest.approx(0.425, abs=1e-6)
    assert load_checkpoint(ckpt)[1]["operating_point"]["rule"] == "balanced_accuracy"


def test_prior_rule_thresholds_at_the_head_prior_and_reads_no_label():
    point = choose_threshold(Y, PROBA, "prior", head_prior=0.25)
    assert point["threshold"] == 0.25 and point["rule"] == "prior" and point["head_prior"] == 0.25
    # rates at that threshold: P1 > 0.25 calls 3 of 6 negatives (0.3, 0.4, 0.6) and both positives positive
    assert point["validation"]["sensitivity"] == 1.0 and point["validation"]["specificity"] == pytest.approx(3 / 6)
    assert choose_threshold(1 - Y, PROBA, "prior", head_prior=0.25)["threshold"] == 0.25  # labels do not move it
    for bad in (None, 0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="prior"):
            choose_threshold(Y, PROBA, "prior", head_prior=bad)


def test_head_prior_of_every_method():
    from medimb.training.config import head_prior, loss_prior, method_config

    counts = [30, 10]  # 25 % positives in training
    expected = {"ce": 0.25, "weighted-ce": 0.5, "balanced-softmax": 0.5, "crt": 0.5, "two-stage": 0.5,
                "two-stage-triplet": 0.5, "two-stage-supcon": 0.5, "cmsl-two-stage": 0.5,
                "focal": None, "ldam-drw": None, "cmsl": None}
    for name, prior in expected.items():
        assert head_prior(method_config(name), counts) == prior, name
    tau = method_config("two-stage")
    tau.stage2.rebalance = "tau_norm"
    assert head_prior(tau, counts) is None
    assert head_prior(method_config("ce"), [5, 5, 5]) is None  # multi-class: no threshold
    assert loss_prior("ce", counts, head="cmsl") is None and loss_prior("weighted_ce", counts) == 0.5


def test_evaluation_report_prior_rule_reads_the_checkpoint_head_prior(tmp_path):
    from types import SimpleNamespace

    from medimb.networks import create_model, load_checkpoint, save_checkpoint

    model = create_model("cpunet", in_channels=1, num_classes=2, spatial_dims=2, widths=[4, 8], depths=[0, 1])
    logits = torch.log(torch.as_tensor(PROBA, dtype=torch.float32))
    engine = SimpleNamespace(state=SimpleNamespace(output={"pred": logits, "label": torch.as_tensor(Y)}))
    for prior, ckpt in ((0.3, tmp_path / "with.pt"), (None, tmp_path / "without.pt")):
        save_checkpoint(ckpt, model, class_names=["benign", "malignant"], head_prior=prior)
        report = EvaluationReport(str(tmp_path / "val"), model, ["benign", "malignant"], split="validation",
                                  checkpoint=ckpt, choose_operating_point="prior")
        report._reset(engine)
        report._collect(engine)
        if prior is None:
            with pytest.raises(ValueError, match="prior"):
                report._write(engine)
            continue
        report._write(engine)
        assert report.result["validation"]["threshold"] == pytest.approx(0.3)
        assert load_checkpoint(ckpt)[1]["operating_point"]["rule"] == "prior"
