"""medimb.evaluation metrics and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medimb.evaluation import (
    UndefinedMetricWarning,
    compute_metrics,
    expected_calibration_error,
    plot_confusion_matrix,
    plot_embedding,
    plot_pr,
    plot_roc,
)

Y = np.array([0, 0, 0, 0, 0, 0, 1, 1])
P1 = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.2, 0.7, 0.45])  # one FP (0.6), one FN (0.45)
PROBA = np.stack([1 - P1, P1], axis=1)


def test_binary_metrics_by_hand():
    m = compute_metrics(Y, PROBA)
    assert m["confusion_matrix"] == [[5, 1], [1, 1]]
    assert m["per_class_recall"] == pytest.approx([5 / 6, 1 / 2])
    assert m["per_class_precision"] == pytest.approx([5 / 6, 1 / 2])
    assert m["balanced_accuracy"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["macro_f1"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    # AUC = fraction of (pos, neg) pairs ranked correctly: 0.7 beats all 6; 0.45 beats 5 of 6
    assert m["auc"] == pytest.approx(11 / 12)
    assert 0 < m["pr_auc"] <= 1 and m["class_counts"] == [6, 2] and m["num_samples"] == 8
    json.dumps(m)  # JSON-serialisable


def test_torch_tensors_and_column_label_vectors_give_the_numpy_auc():
    m = compute_metrics(torch.tensor(Y).unsqueeze(1), torch.tensor(PROBA, dtype=torch.float32))
    assert m["auc"] == pytest.approx(11 / 12)


def test_multiclass_macro_ovr_auc():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    logits = rng.normal(size=(60, 3)) + 2 * np.eye(3)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = compute_metrics(y, proba)
    from sklearn.metrics import roc_auc_score

    assert m["auc"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    assert len(m["per_class_recall"]) == 3 and np.array(m["confusion_matrix"]).sum() == 60


def test_single_class_split_gives_none_auc_with_warning():
    with pytest.warns(UndefinedMetricWarning, match="only class"):
        m = compute_metrics(np.zeros(4, dtype=int), PROBA[:4])
    assert m["auc"] is None and m["pr_auc"] is None
    assert m["accuracy"] == 1.0 and m["confusion_matrix"] == [[4, 0], [0, 0]]


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="outside the class range"):
        compute_metrics(np.array([0, 2]), PROBA[:2])
    with pytest.raises(ValueError, match="NaN or Inf"):
        compute_metrics(np.array([0, 1]), np.array([[np.nan, 1.0], [0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        compute_metrics(Y, P1)
    with pytest.raises(ValueError, match="empty"):
        compute_metrics(np.array([], dtype=int), np.zeros((0, 2)))


def test_ece_is_zero_when_calibrated_and_half_when_confidently_half_wrong():
    # perfectly calibrated bins: confidence 0.75 with 3 of 4 correct
    y = np.array([0, 0, 0, 1])
    proba = np.tile([0.75, 0.25], (4, 1))
    assert expected_calibration_error(y, proba) == pytest.approx(0.0)
    # always confident (1.0) and half wrong -> ECE 0.5
    assert expected_calibration_error(np.array([0, 1]), np.array([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.5)
    # compute_metrics reports that ECE (Y/PROBA: 6 of 8 right at confidences 0.55-0.9, so not calibrated)
    ece = compute_metrics(Y, PROBA)["ece"]
    assert ece == pytest.approx(expected_calibration_error(Y, PROBA)) and 0 < ece < 1


def test_plots_are_written_as_png(tmp_path):
    rng = np.random.default_rng(0)
    written = [
        plot_roc(Y, PROBA, tmp_path / "roc.png", class_names=["normal", "lesion"]),
        plot_pr(Y, PROBA, tmp_path / "pr.png"),
        plot_confusion_matrix(Y, PROBA, tmp_path / "cm.png", class_names=["normal", "lesion"]),
        plot_embedding(rng.normal(size=(8, 5)) + Y[:, None], Y, tmp_path / "emb.png"),
    ]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png", "emb.png", "pr.png", "roc.png"]
    with pytest.raises(ValueError, match="one class"):
        plot_roc(np.zeros(4, dtype=int), PROBA[:4], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="class names"):
        plot_confusion_matrix(Y, PROBA, tmp_path / "bad.png", class_names=["a"])
    assert not (tmp_path / "bad.png").exists()
