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

from medimb.evaluation.operating_point import DEFAULT_THRESHOLD, POSITIVE_CLASS, predict_classes

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


def compute_metrics(y_true: Any, proba: Any, threshold: float | None = None) -> dict[str, Any]:
    """Metrics for labels ``y_true (N,)`` and class probabilities ``proba (N, K)`` (numpy or torch).

    Returns plain Python numbers and lists:

    - ``balanced_accuracy``: mean per-class recall over the classes present in ``y_true``.
    - ``auc``: ROC-AUC; binary: of ``proba[:, 1]`` (positive class 1); multi-class: macro one-vs-rest.
    - ``pr_auc``: average precision; binary: positive class; multi-class: macro one-vs-rest.
    - ``accuracy``, ``macro_f1``, ``per_class_recall``/``per_class_precision`` (length K, 0 where undefined),
      ``confusion_matrix`` (K x K, rows true, columns predicted), ``ece`` (15 bins), ``num_samples``,
      ``class_counts``.

    Binary models (K = 2) predict class 1 when ``proba[:, 1] > threshold`` (default 0.5, which is the argmax;
    :mod:`medimb.evaluation.operating_point`) and also report ``threshold``, ``sensitivity`` (recall of
    class 1), ``specificity`` (recall of class 0) and ``f1`` (of class 1); every decision metric (balanced
    accuracy, accuracy, F1, recall/precision, confusion matrix) is at that threshold, AUC and PR-AUC do not
    depend on it. Multi-class models predict ``argmax(proba)`` (``threshold`` is ``None``).

    When ``y_true`` holds one class only, ``auc`` and ``pr_auc`` are
    undefined: they are ``None`` and an :class:`UndefinedMetricWarning` is issued (the rest is still
    reported, so a tiny validation split does not crash a run). Multi-class AUC needs every class
    present; otherwise it is macro-averaged over the classes present (warned).
    """
    y, p = _as_arrays(y_true, proba)
    k = p.shape[1]
    labels = list(range(k))
    if k == 2:
        threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    pred = predict_classes(p, threshold)
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
    result = {
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
        "threshold": threshold,
    }
    if k == 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f1 = f1_score(y, pred, pos_label=POSITIVE_CLASS, zero_division=0)
        counts = result["class_counts"]
        result.update(positive_class=POSITIVE_CLASS, sensitivity=float(recall[1]) if counts[1] else None,
                      specificity=float(recall[0]) if counts[0] else None, f1=float(f1))
    return result


#: the metrics with a bootstrap interval in the evaluation output (sensitivity/specificity: binary models)
CI_KEYS = ("balanced_accuracy", "auc", "sensitivity", "specificity")
#: resamples and seed of :func:`bootstrap_ci` (fixed: the same predictions always give the same interval)
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
#: how metrics.json describes its ``ci95`` entries
CI_METHOD = ("stratified percentile bootstrap over cases (balanced accuracy, AUC); Wilson score interval "
             "(sensitivity, specificity)")


def wilson_interval(successes: int, n: int, level: float = 0.95) -> list[float] | None:
    """Wilson score interval of a proportion ``successes / n`` (None for ``n == 0``). Unlike a percentile
    bootstrap it does not collapse to a point at 0 or 1 (12 of 12 positives found: 0.76-1.00)."""
    from scipy.stats import norm

    if n == 0:
        return None
    z = float(norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def _rank_auc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """ROC-AUC of each row of ``scores`` (B, N) for the fixed positive columns ``positive`` (N,) bool
    (Mann-Whitney U with average ranks for ties, as ``roc_auc_score``)."""
    from scipy.stats import rankdata

    n1 = int(positive.sum())
    n0 = positive.size - n1
    ranks = rankdata(scores, axis=1)
    return (ranks[:, positive].sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def bootstrap_ci(y_true: Any, proba: Any, threshold: float | None = None,
                 n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = 0.95,
                 chunk: int = 250, proportions: str = "wilson") -> dict[str, list[float] | None]:
    """95 % intervals of :data:`CI_KEYS`: ``{"auc": [lo, hi], ...}``; percentile bootstrap over cases for
    balanced accuracy and AUC; sensitivity and specificity, proportions over a fixed number of cases, get
    the Wilson score interval (``proportions="bootstrap"``: percentile bootstrap as well, which collapses to
    a point when every positive is found).

    Stratified: every resample draws each class's cases with replacement, as many as the class has, so
    class counts (and hence whether AUC is defined) are those of the data. Decisions are those of
    :func:`compute_metrics` at ``threshold`` (binary; argmax for multi-class). Deterministic for a ``seed``;
    vectorised (2000 resamples of 1000 cases take well under a second). An undefined metric (AUC with one
    class, sensitivity without positives) is ``None``; multi-class models get balanced accuracy and AUC only.
    """
    y, p = _as_arrays(y_true, proba)
    k = p.shape[1]
    if k == 2:
        threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    correct = predict_classes(p, threshold) == y
    present = np.unique(y)
    blocks = [np.flatnonzero(y == c) for c in present]
    # the label of each resampled column: class blocks in order
    label_of = np.concatenate([np.full(len(b), c) for b, c in zip(blocks, present)])
    rng = np.random.default_rng(seed)
    values: dict[str, list[np.ndarray]] = {key: [] for key in CI_KEYS}
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        idx = np.concatenate([rng.choice(block, size=(b, len(block)), replace=True) for block in blocks],
                             axis=1)
        hits = correct[idx]  # (b, N)
        recalls = {c: hits[:, label_of == c].mean(axis=1) for c in present}
        values["balanced_accuracy"].append(np.mean(list(recalls.values()), axis=0))
        if present.size > 1:
            aucs = [_rank_auc(p[idx, c], label_of == c) for c in (present if k > 2 else [POSITIVE_CLASS])]
            values["auc"].append(np.mean(aucs, axis=0))
        if k == 2:
            for key, c in (("sensitivity", 1), ("specificity", 0)):
                if c in recalls:
                    values[key].append(recalls[c])
    tail = (1 - level) / 2 * 100
    keys = CI_KEYS if k == 2 else ("balanced_accuracy", "auc")
    out: dict[str, list[float] | None] = {}
    if proportions not in ("wilson", "bootstrap"):
        raise ValueError(f"proportions must be 'wilson' or 'bootstrap', got {proportions!r}")
    for key in keys:
        if proportions == "wilson" and key in ("sensitivity", "specificity"):
            cls = 1 if key == "sensitivity" else 0
            out[key] = wilson_interval(int(correct[y == cls].sum()), int((y == cls).sum()), level)
        elif values[key]:
            lo, hi = np.percentile(np.concatenate(values[key]), [tail, 100 - tail])
            out[key] = [float(lo), float(hi)]
        else:
            out[key] = None
    return out


_CI_LABELS = {"balanced_accuracy": "balanced accuracy", "auc": "AUC", "sensitivity": "sensitivity",
              "specificity": "specificity"}


def format_ci_summary(metrics: dict[str, Any], keys: tuple[str, ...] = CI_KEYS, digits: int = 2) -> str:
    """``"balanced accuracy 0.88 (0.79-0.95), AUC 0.93 (0.87-0.98), ..., threshold 0.42"`` of one split's
    metrics (with ``ci95`` from the evaluation output; without it the values alone)."""
    ci = metrics.get("ci95") or {}
    parts = []
    for key in keys:
        if key not in metrics:
            continue
        value = metrics[key]
        text = f"{_CI_LABELS.get(key, key)} " + ("n/a" if value is None else f"{value:.{digits}f}")
        if value is not None and ci.get(key) is not None:
            lo, hi = ci[key]
            text += f" ({lo:.{digits}f}-{hi:.{digits}f})"
        parts.append(text)
    if metrics.get("threshold") is not None:
        parts.append(f"threshold {metrics['threshold']:.{max(digits, 3)}f}")
    return ", ".join(parts)


#: the metrics a one-line summary shows (CLI output, bundle logs), in this order
SUMMARY_KEYS = ("balanced_accuracy", "auc", "accuracy", "macro_f1")


def format_summary(metrics: dict[str, Any]) -> str:
    """``"balanced_accuracy=0.812 auc=0.901 ..."`` of :data:`SUMMARY_KEYS` (``n/a`` where undefined), and
    ``threshold=0.420`` for binary models."""
    text = " ".join(f"{k}={metrics[k]:.3f}" if metrics.get(k) is not None else f"{k}=n/a"
                    for k in SUMMARY_KEYS)
    return text if metrics.get("threshold") is None else f"{text} threshold={metrics['threshold']:.3f}"
