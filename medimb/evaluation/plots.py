"""Evaluation plots (matplotlib, Agg backend), each written atomically to a PNG file.

Inputs: labels ``y_true (N,)``, probabilities ``proba (N, K)``, embeddings ``(N, E)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.metrics import auc as area_under  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    average_precision_score,
    confusion_matrix,
    precision_recall_curve,
    roc_curve,
)

from medimb.atomic import atomic_output  # noqa: E402
from medimb.evaluation.metrics import _as_arrays, _to_numpy, expected_calibration_error  # noqa: E402
from medimb.evaluation.operating_point import POSITIVE_CLASS, predict_classes  # noqa: E402


def _class_names(k: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [f"class {c}" for c in range(k)]
    if len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for {k} classes")
    return [str(name) for name in class_names]


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` via a temporary file + rename, then close it."""
    path = Path(path)
    try:
        with atomic_output(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _curve_classes(y: np.ndarray, k: int) -> list[int]:
    """Binary: the positive class only; multi-class: every class present (one-vs-rest)."""
    present = set(np.unique(y).tolist())
    if len(present) < 2:
        raise ValueError("ROC/PR curves need both positive and negative samples; y_true holds one class")
    return [1] if k == 2 else [c for c in range(k) if c in present]


def plot_roc(y_true: Any, proba: Any, path: str | os.PathLike, class_names: Sequence[str] | None = None,
             title: str = "ROC", threshold: float | None = None) -> Path:
    """ROC curve(s) with AUC in the legend (binary: class 1; multi-class: one-vs-rest per class); binary
    models given a ``threshold`` also get their operating point marked."""
    y, p = _as_arrays(y_true, proba)
    names = _class_names(p.shape[1], class_names)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for c in _curve_classes(y, p.shape[1]):
        fpr, tpr, _ = roc_curve(y == c, p[:, c])
        ax.plot(fpr, tpr, label=f"{names[c]} (AUC {area_under(fpr, tpr):.3f})")
    if threshold is not None and p.shape[1] == 2:
        called = predict_classes(p, threshold) == POSITIVE_CLASS
        positive = y == POSITIVE_CLASS
        ax.plot([called[~positive].mean()], [called[positive].mean()], "o", color="black", markersize=5,
                label=f"threshold {threshold:.3f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pr(y_true: Any, proba: Any, path: str | os.PathLike, class_names: Sequence[str] | None = None,
            title: str = "Precision-recall") -> Path:
    """Precision-recall curve(s) as step functions (``precision_recall_curve``, ``drawstyle="steps-post"``,
    as scikit-learn draws them: no interpolation between operating points) with average precision in the
    legend and the class prevalence as the chance line."""
    y, p = _as_arrays(y_true, proba)
    names = _class_names(p.shape[1], class_names)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for c in _curve_classes(y, p.shape[1]):
        precision, recall, _ = precision_recall_curve(y == c, p[:, c])
        ap = average_precision_score(y == c, p[:, c])
        line, = ax.plot(recall, precision, drawstyle="steps-post", label=f"{names[c]} (AP {ap:.3f})")
        ax.axhline(float(np.mean(y == c)), linestyle="--", linewidth=0.8, color=line.get_color())
    ax.set(xlabel="recall", ylabel="precision", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_confusion_matrix(y_true: Any, proba: Any, path: str | os.PathLike,
                          class_names: Sequence[str] | None = None, title: str | None = None,
                          threshold: float | None = None, split: str | None = None) -> Path:
    """Confusion matrix of the predicted classes (binary: ``P(1) > threshold``, default 0.5; multi-class:
    argmax): counts, with row-normalised recall as colour. The default title names ``split``, the number
    of cases and the threshold (``argmax`` for multi-class models)."""
    y, p = _as_arrays(y_true, proba)
    k = p.shape[1]
    names = _class_names(k, class_names)
    if k == 2 and threshold is None:
        threshold = 0.5
    if title is None:
        decision = f"threshold {threshold:.3f}" if k == 2 else "argmax"
        title = f"{split + ': ' if split else ''}n={len(y)}, {decision}"
    counts = confusion_matrix(y, predict_classes(p, threshold), labels=list(range(k)))
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.5, 1.2 * k + 2))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{counts[i, j]}\n{rates[i, j]:.2f}", ha="center", va="center",
                    color="white" if rates[i, j] > 0.5 else "black", fontsize=8)
    ax.set(xticks=range(k), yticks=range(k), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="row-normalised")
    return _save(fig, path)


def plot_reliability(y_true: Any, proba: Any, path: str | os.PathLike,
                     class_names: Sequence[str] | None = None, title: str | None = None, n_bins: int = 10,
                     split: str | None = None) -> Path:
    """Reliability (calibration) plot (``sklearn.calibration.calibration_curve``, ``n_bins`` equal-width bins,
    empty bins left out). Binary: observed fraction of class 1 against the mean predicted ``P(1)``;
    multi-class: top-label accuracy against confidence. The title gives the top-label ECE of metrics.json
    (:func:`medimb.evaluation.metrics.expected_calibration_error`, 15 bins); a histogram under the
    curve shows how many cases each probability has."""
    y, p = _as_arrays(y_true, proba)
    if p.shape[1] == 2:
        names = _class_names(2, class_names)
        hit, score = y == POSITIVE_CLASS, p[:, POSITIVE_CLASS]
        xlabel, ylabel = f"predicted P({names[1]})", f"observed fraction {names[1]}"
    else:
        hit, score = p.argmax(axis=1) == y, p.max(axis=1)
        xlabel, ylabel = "confidence (top class)", "accuracy"
    observed, predicted = calibration_curve(hit.astype(int), np.clip(score, 0, 1), n_bins=n_bins,
                                            strategy="uniform")
    ece = expected_calibration_error(y, p)
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="perfectly calibrated")
    ax.plot(predicted, observed, "o-", label="model")
    ax.set(ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.01),
           title=title or f"Reliability{': ' + split if split else ''} (n={len(y)}, ECE {ece:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    hist.hist(score, bins=n_bins, range=(0, 1), color="grey")
    hist.set(xlabel=xlabel, ylabel="cases")
    return _save(fig, path)


def plot_embedding(embeddings: Any, y_true: Any, path: str | os.PathLike, class_names: Sequence[str] | None = None,
                   method: str = "pca", title: str | None = None, seed: int = 0) -> Path:
    """2D projection of ``embeddings (N, E)`` coloured by class: ``method="pca"`` or ``"tsne"``."""
    x = _to_numpy(embeddings).astype(np.float64)
    y = _to_numpy(y_true).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"embeddings must be (N, E) with N={y.shape[0]}, got shape {x.shape}")
    if x.shape[0] < 3:
        raise ValueError("need at least 3 samples to project embeddings")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or Inf")
    if method == "pca":
        xy = PCA(n_components=min(2, x.shape[1]), random_state=seed).fit_transform(x)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, perplexity=min(30.0, (x.shape[0] - 1) / 3), random_state=seed).fit_transform(x)
    else:
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")
    if xy.shape[1] == 1:
        xy = np.concatenate([xy, np.zeros_like(xy)], axis=1)
    classes = np.unique(y).astype(int)
    names = _class_names(int(classes.max()) + 1, class_names) if class_names is not None else None
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for c in classes:
        mask = y == c
        ax.scatter(xy[mask, 0], xy[mask, 1], s=8, alpha=0.7, label=names[c] if names else f"class {c}")
    ax.set(xlabel=f"{method.upper()} 1", ylabel=f"{method.upper()} 2", title=title or f"Embeddings ({method.upper()})")
    ax.legend(fontsize=8, markerscale=2)
    return _save(fig, path)
