"""The operating point of a binary model: the decision threshold on the positive-class probability.

A binary model (two classes, positive class 1) predicts class 1 when ``P(class 1) > threshold``. The
threshold is chosen on the validation split after training (:func:`choose_threshold`) and stored in the
checkpoint under ``"operating_point"``::

    {"threshold": 0.37, "rule": "balanced_accuracy", "positive_class": 1,
     "validation": {"num_samples": 40, "class_counts": [28, 12], "balanced_accuracy": ..., "sensitivity": ...,
                    "specificity": ...}}

Rules:

- ``"balanced_accuracy"`` (default): the threshold with the highest validation balanced accuracy, which is
  the maximum of Youden's J = sensitivity + specificity - 1. Ties: the threshold closest to 0.5, then the
  lower (more sensitive) one.
- ``"sensitivity>=0.9"`` (:func:`sensitivity_rule`): the highest threshold whose validation sensitivity is
  at least the target (the most specific one that still finds 90 % of the positives).
- ``"prior"``: the positive-class prior the final classifier head was fitted under (training records it in
  the checkpoint as ``"head_prior"``, :func:`medimb.training.config.head_prior`): 0.5 after a class-balanced
  stage 2 (cRT, LWS) or a balancing loss, the training split's positive fraction for plain CE. For a
  calibrated probability fitted under prior pi, balanced accuracy is maximised by predicting positive when
  ``P(1) > pi``, so this rule reads no validation label: it does not vary with a small validation split,
  where the validation maximum does (docs/training.md, *Operating point*, has the measurement).

Candidate thresholds are the midpoints between consecutive distinct validation probabilities (and below
the lowest / above the highest), so a threshold never sits on a validation case's probability.

A checkpoint without an operating point (older runs) means threshold 0.5 (:data:`DEFAULT_THRESHOLD`). Since
the probabilities of both head types sum to 1 over the classes (softmax; CMSL sigmoids normalised by
:func:`medimb.networks.predict_proba`), ``P(1) > 0.5`` is ``P(1) > P(0)``: the argmax of before
(:func:`predict_classes` evaluates ``P(1) > t`` as ``P(1) - P(0) > 2t - 1``, so this holds to the last bit).
Multi-class models predict the argmax and have no threshold.

Bundles and scripts: :func:`choose_threshold` on a validation pass, :func:`store_operating_point` (or
:func:`choose_and_store`) to add it to a checkpoint file, :func:`threshold_for` to read it back.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: the checkpoint key of the operating point
CHECKPOINT_KEY = "operating_point"
#: class index whose probability is thresholded
POSITIVE_CLASS = 1
#: the threshold of a binary checkpoint without an operating point (equals argmax)
DEFAULT_THRESHOLD = 0.5
#: the default rule (maximum balanced accuracy = maximum Youden's J)
BALANCED_ACCURACY = "balanced_accuracy"
#: the rule "threshold = the prior the head was fitted under"
PRIOR = "prior"
#: the checkpoint key of that prior (written by training)
HEAD_PRIOR_KEY = "head_prior"

_SENSITIVITY = re.compile(r"sensitivity\s*>=\s*([0-9]*\.?[0-9]+)")


def sensitivity_rule(target: float) -> str:
    """The rule name of a target sensitivity: ``sensitivity_rule(0.9) == "sensitivity>=0.9"``."""
    target = float(target)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    return f"sensitivity>={target:g}"


def parse_rule(rule: str) -> float | None:
    """``None`` for ``"balanced_accuracy"`` (alias ``"youden"``) and ``"prior"``; the target for
    ``"sensitivity>=T"``."""
    if rule in (BALANCED_ACCURACY, "youden", PRIOR):
        return None
    match = _SENSITIVITY.fullmatch(str(rule).strip())
    if match is None:
        raise ValueError(f"unknown operating-point rule {rule!r}: use 'balanced_accuracy', 'prior' or "
                         "'sensitivity>=T'")
    target = float(match.group(1))
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    return target


def check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not (math.isfinite(threshold) and -1e-12 <= threshold <= 1.0):
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return threshold


def positive_scores(proba: Any) -> np.ndarray:
    """``P(class 1)`` (N,) from ``proba`` (N, 2) or the positive-class probabilities (N,) themselves."""
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim == 2:
        if p.shape[1] != 2:
            raise ValueError(f"an operating point needs a binary model: proba has {p.shape[1]} classes")
        p = p[:, POSITIVE_CLASS]
    if p.ndim != 1:
        raise ValueError(f"proba must be (N, 2) or (N,), got shape {p.shape}")
    return p


def predict_classes(proba: Any, threshold: float | None = None) -> np.ndarray:
    """(N,) predicted class indices of ``proba`` (N, K): binary ``P(1) > threshold`` (default 0.5, which
    equals the argmax), multi-class the argmax (a threshold is then an error)."""
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"proba must be (N, K), got shape {p.shape}")
    if p.shape[1] != 2:
        if threshold is not None:
            raise ValueError(f"a decision threshold needs a binary model; this one has {p.shape[1]} classes")
        return p.argmax(axis=1)
    t = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    # P(1) > t written as P(1) - P(0) > 2t - 1 (the same for rows summing to 1): at t = 0.5 it is exactly
    # P(1) > P(0), the argmax, even where float32 rounding makes P(1) == 0.5 > P(0)
    return (p[:, POSITIVE_CLASS] - p[:, 1 - POSITIVE_CLASS] > 2 * t - 1).astype(np.int64)


def _candidates(scores: np.ndarray) -> np.ndarray:
    """Midpoints between consecutive distinct scores, with one threshold below all and one above all:
    candidate ``i`` calls positive exactly the cases with ``score >= unique[i]`` (none for the last)."""
    u = np.unique(scores)
    low = u[0] / 2 if u[0] > 0 else float(np.nextafter(u[0], -np.inf))
    high = (u[-1] + 1) / 2 if u[-1] < 1 else 1.0
    return np.concatenate([[low], (u[:-1] + u[1:]) / 2, [high]]), u


def threshold_curve(labels: Any, proba: Any) -> dict[str, np.ndarray]:
    """Every candidate threshold (ascending) with its sensitivity and specificity on ``labels``."""
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    p = positive_scores(proba)
    if y.shape[0] != p.shape[0] or y.shape[0] == 0:
        raise ValueError(f"{y.shape[0]} labels for {p.shape[0]} probabilities")
    if not np.isfinite(p).all():
        raise ValueError("proba contains NaN or Inf")
    thresholds, u = _candidates(p)
    pos, neg = np.sort(p[y == POSITIVE_CLASS]), np.sort(p[y != POSITIVE_CLASS])
    edges = np.concatenate([u, [np.inf]])  # candidate i: positive iff score >= edges[i]
    pos_below = np.searchsorted(pos, edges, side="left")
    neg_below = np.searchsorted(neg, edges, side="left")
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = (len(pos) - pos_below) / len(pos) if len(pos) else np.full(len(edges), np.nan)
        specificity = neg_below / len(neg) if len(neg) else np.full(len(edges), np.nan)
    return {"threshold": thresholds, "sensitivity": sensitivity, "specificity": specificity}


def _at(labels: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    pred = p > threshold
    pos, neg = labels == POSITIVE_CLASS, labels != POSITIVE_CLASS
    sens = float(pred[pos].mean()) if pos.any() else None
    spec = float((~pred[neg]).mean()) if neg.any() else None
    both = sens is not None and spec is not None
    return {"num_samples": int(labels.size), "class_counts": [int(neg.sum()), int(pos.sum())],
            "balanced_accuracy": (sens + spec) / 2 if both else None, "sensitivity": sens, "specificity": spec}


def choose_threshold(labels: Any, proba: Any, rule: str = BALANCED_ACCURACY,
                     head_prior: float | None = None) -> dict[str, Any]:
    """The operating point of a binary model on ``labels`` (N,) and ``proba`` (N, 2) (or ``P(1)`` (N,)) by
    ``rule`` (module docstring); returns the dict stored in checkpoints (``threshold``, ``rule``,
    ``positive_class``, ``validation`` = the rates at that threshold on these cases; ``head_prior`` for
    the ``"prior"`` rule, which needs it: a probability in (0, 1), else ValueError).

    When the cases cannot decide (one class only; no positives for a sensitivity rule) the threshold is
    :data:`DEFAULT_THRESHOLD`, with a warning and ``"fallback"`` saying why.
    """
    target = parse_rule(rule)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    p = positive_scores(proba)
    if rule == PRIOR:
        if head_prior is None or not 0.0 < float(head_prior) < 1.0:
            raise ValueError(f"the 'prior' operating point needs the prior the head was fitted under, in (0, 1); "
                             f"got {head_prior!r} (checkpoints of this method or older runs do not record one)")
        threshold = float(head_prior)
        return {"threshold": threshold, "rule": PRIOR, "positive_class": POSITIVE_CLASS,
                HEAD_PRIOR_KEY: threshold, "validation": _at(y, p, threshold)}
    curve = threshold_curve(y, p)
    t, sens, spec = curve["threshold"], curve["sensitivity"], curve["specificity"]
    n_pos = int((y == POSITIVE_CLASS).sum())
    fallback = None
    if target is None:
        if n_pos in (0, y.size):
            fallback = "the cases hold one class only"
        else:
            ba = (sens + spec) / 2
            best = np.flatnonzero(ba >= ba.max() - 1e-12)
            # closest to 0.5, then the lower threshold
            i = min(best, key=lambda j: (round(abs(t[j] - DEFAULT_THRESHOLD), 12), t[j]))
    elif n_pos == 0:
        fallback = "the cases hold no positive"
    else:
        i = int(np.flatnonzero(sens >= target - 1e-12).max())  # sensitivity falls as the threshold rises
    if fallback is not None:
        warnings.warn(f"operating point {rule}: {fallback}; using threshold {DEFAULT_THRESHOLD}", UserWarning,
                      stacklevel=2)
        threshold = DEFAULT_THRESHOLD
    else:
        threshold = float(t[i])
    point: dict[str, Any] = {"threshold": threshold, "rule": str(rule), "positive_class": POSITIVE_CLASS,
                             "validation": _at(y, p, threshold)}
    if fallback is not None:
        point["fallback"] = fallback
    return point


def operating_point_of(meta: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The operating point stored in a checkpoint dict (:func:`medimb.networks.load_checkpoint`'s meta), or None."""
    point = (meta or {}).get(CHECKPOINT_KEY)
    return dict(point) if isinstance(point, Mapping) and "threshold" in point else None


def resolve_operating_point(num_classes: int, meta: Mapping[str, Any] | None = None,
                            override: float | None = None) -> dict[str, Any] | None:
    """The operating point a model predicts with, as metrics.json states it: ``override`` (``--threshold``;
    ``rule`` ``"given"``), else the checkpoint's (``source`` ``"checkpoint"``), else
    :data:`DEFAULT_THRESHOLD` (``rule`` ``"default"``); ``None`` for multi-class models (argmax)."""
    if int(num_classes) != 2:
        if override is not None:
            raise ValueError(f"a decision threshold needs a binary model; this one has {num_classes} classes")
        return None
    if override is not None:
        return {"threshold": check_threshold(override), "rule": "given", "positive_class": POSITIVE_CLASS,
                "source": "override"}
    point = operating_point_of(meta)
    if point is None:
        return {"threshold": DEFAULT_THRESHOLD, "rule": "default", "positive_class": POSITIVE_CLASS,
                "source": "default: the checkpoint has no operating point"}
    check_threshold(point["threshold"])
    return {**point, "source": "checkpoint"}


def threshold_for(num_classes: int, meta: Mapping[str, Any] | None = None,
                  override: float | None = None) -> float | None:
    """The decision threshold a model predicts with: ``override`` (``--threshold``), else the checkpoint's
    operating point, else :data:`DEFAULT_THRESHOLD`; ``None`` (argmax) for multi-class models."""
    point = resolve_operating_point(num_classes, meta, override)
    return None if point is None else float(point["threshold"])


def store_operating_point(checkpoint: str | os.PathLike, point: Mapping[str, Any]) -> Path:
    """Add ``point`` (from :func:`choose_threshold`) to a checkpoint file under ``"operating_point"``,
    rewriting it atomically with a new checksum; returns the path."""
    from medimb.networks import read_checkpoint_file, write_checkpoint_file

    check_threshold(point["threshold"])
    payload = read_checkpoint_file(checkpoint)
    payload[CHECKPOINT_KEY] = dict(point)
    logger.info("%s: operating point threshold %.4f (%s)", checkpoint, point["threshold"], point.get("rule"))
    return write_checkpoint_file(checkpoint, payload)


def choose_and_store(checkpoint: str | os.PathLike, labels: Any, proba: Any,
                     rule: str = BALANCED_ACCURACY) -> dict[str, Any]:
    """:func:`choose_threshold` on a validation pass, then :func:`store_operating_point`; returns the point."""
    point = choose_threshold(labels, proba, rule)
    store_operating_point(checkpoint, point)
    return point
