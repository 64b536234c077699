"""Imbalance-aware classification metrics (scikit-learn underneath), JSON-serialisable."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

ECE_BINS = 15


class UndefinedMetricWarning(UserWarning):
    """A ranking metric (AUC, PR-AUC) is undefined for this split and was reported as ``None``."""


def _to_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor, possibly on GPU
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _as_arrays(y_true: Any, proba: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _to_numpy(y_true)
    p = _to_numpy(proba).astype(np.float64)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"y_true must be (N,), got shape {y.shape}")
    if p.ndim != 2 or p.shape[0] != y.shape[0] or p.shape[1] < 2:
        raise ValueError(f"proba must be (N, K) with N={y.shape[0]} and K >= 2, got shape {p.shape}")
    if y.shape[0] == 0:
        raise ValueError("cannot compute metrics on an empty split")
    if not np.isfinite(p).all():
        raise ValueError("proba contains NaN or Inf")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise ValueError("y_true must hold integer class indices")
        y = y.astype(np.int64)
    k = p.shape[1]
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"y_true has label(s) outside the class range [0, {k - 1}]: {sorted(set(y[(y < 0) | (y >= k)].tolist()))}")
    return y, p


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE: ``sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)|`` over ``n_bins``
    equal-width confidence bins. ``y_true (N,)``, ``proba (N, K)`` (rows should sum to 1)."""
    y, p = _as_arrays(y_true, proba)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)  # (i/n, (i+1)/n]
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def compute_metrics(y_true: Any, proba: Any) -> dict[str, Any]:
    """Metrics for labels ``y_true (N,)`` and class probabilities ``proba (N, K)`` (numpy or torch).

    Returns plain Python numbers and lists:

    - ``balanced_accuracy``: mean per-class recall over the classes present in ``y_true``.
    - ``auc``: ROC-AUC; binary: of ``proba[:, 1]`` (positive class 1); multi-class: macro one-vs-rest.
    - ``pr_auc``: average precision; binary: positive class; multi-class: macro one-vs-rest.
    - ``accuracy``, ``macro_f1``, ``per_class_recall``/``per_class_precision`` (length K, 0 where undefined),
      ``confusion_matrix`` (K x K, rows true, columns predicted), ``ece`` (15 bins), ``num_samples``,
      ``class_counts``.

    Predictions are ``argmax(proba)``. When ``y_true`` holds one class only, ``auc`` and ``pr_auc`` are
    undefined: they are ``None`` and an :class:`UndefinedMetricWarning` is issued (the rest is still
    reported, so a tiny validation split does not crash a run). Multi-class AUC needs every class
    present; otherwise it is macro-averaged over the classes present (warned).
    """
    y, p = _as_arrays(y_true, proba)
    k = p.shape[1]
    labels = list(range(k))
    pred = p.argmax(axis=1)
    present = np.unique(y)
    auc: float | None
    pr_auc: float | None
    if present.size < 2:
        warnings.warn(
            f"y_true holds only class {present.tolist()}: AUC and PR-AUC are undefined and reported as None",
            UndefinedMetricWarning, stacklevel=2,
        )
        auc = pr_auc = None
    elif k == 2:
        auc = float(roc_auc_score(y, p[:, 1]))
        pr_auc = float(average_precision_score(y, p[:, 1]))
    else:
        if present.size < k:
            warnings.warn(
                f"classes {sorted(set(labels) - set(present.tolist()))} absent from y_true: AUC/PR-AUC are "
                "macro-averaged over the classes present", UndefinedMetricWarning, stacklevel=2,
            )
        onehot = (y[:, None] == np.arange(k)[None, :]).astype(int)
        aucs = [roc_auc_score(onehot[:, c], p[:, c]) for c in present]
        aps = [average_precision_score(onehot[:, c], p[:, c]) for c in present]
        auc, pr_auc = float(np.mean(aucs)), float(np.mean(aps))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero_division handles classes never predicted / absent
        recall = recall_score(y, pred, labels=labels, average=None, zero_division=0)
        precision = precision_score(y, pred, labels=labels, average=None, zero_division=0)
        macro_f1 = f1_score(y, pred, labels=labels, average="macro", zero_division=0)
        balanced = balanced_accuracy_score(y, pred)
    return {
        "balanced_accuracy": float(balanced),
        "auc": auc,
        "pr_auc": pr_auc,
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(macro_f1),
        "per_class_recall": [float(v) for v in recall],
        "per_class_precision": [float(v) for v in precision],
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).astype(int).tolist(),
        "ece": expected_calibration_error(y, p),
        "num_samples": int(y.shape[0]),
        "class_counts": np.bincount(y, minlength=k).astype(int).tolist(),
    }


#: the metrics a one-line summary shows (CLI output, bundle logs), in this order
SUMMARY_KEYS = ("balanced_accuracy", "auc", "accuracy", "macro_f1")


def format_summary(metrics: dict[str, Any]) -> str:
    """``"balanced_accuracy=0.812 auc=0.901 ..."`` of :data:`SUMMARY_KEYS` (``n/a`` where undefined)."""
    return " ".join(f"{k}={metrics[k]:.3f}" if metrics.get(k) is not None else f"{k}=n/a" for k in SUMMARY_KEYS)
