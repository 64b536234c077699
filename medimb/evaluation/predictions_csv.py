"""The one ``predictions.csv`` format, written by ``medimb train``/``evaluate``/``explain`` and the bundles.

One row per case and split::

    case,split,label,predicted,predicted_name,threshold,prob_<class 0>,...,prob_<class K-1>

``label`` is empty for unlabelled cases; ``predicted`` is the predicted class index (``predicted_name`` its
class name): for binary models class 1 when ``prob_<class 1> > threshold`` (the model's operating point,
:mod:`medimb.evaluation.operating_point`; 0.5 when it has none, which equals the argmax), for multi-class
models the class with the highest probability (``threshold`` empty). Probabilities have 6 decimals
(softmax for linear heads, per-class sigmoid for CMSL heads: :func:`medimb.networks.predict_proba`).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medimb.atomic import write_text_atomic
from medimb.evaluation.operating_point import DEFAULT_THRESHOLD, check_threshold, predict_classes

FIXED_COLUMNS = ("case", "split", "label", "predicted", "predicted_name", "threshold")


@dataclass
class SplitPredictions:
    """One split's predictions: ``cases`` (N,), ``labels`` (N,) int or None when unlabelled, ``proba`` (N, K),
    and the decision ``threshold`` of a binary model (None: 0.5 for binary models, argmax for multi-class)."""

    split: str
    cases: Sequence[str]
    labels: np.ndarray | None
    proba: np.ndarray
    threshold: float | None = None

    def __post_init__(self) -> None:
        self.proba = np.asarray(self.proba, dtype=np.float64)
        if self.proba.ndim == 2 and self.proba.shape[1] == 2:
            self.threshold = DEFAULT_THRESHOLD if self.threshold is None else check_threshold(self.threshold)
        elif self.threshold is not None:
            raise ValueError(f"split {self.split}: a decision threshold needs a binary model "
                             f"({self.proba.shape[-1]} classes)")
        if self.labels is not None:
            self.labels = np.asarray(self.labels).reshape(-1).astype(np.int64)
        n = len(self.proba)
        if len(self.cases) != n or (self.labels is not None and len(self.labels) != n):
            raise ValueError(f"split {self.split}: {len(self.cases)} cases, "
                             f"{'-' if self.labels is None else len(self.labels)} labels, {n} probability rows")

    @property
    def predicted(self) -> np.ndarray:
        """(N,) predicted class index: ``P(1) > threshold`` (binary), argmax (multi-class)."""
        return predict_classes(self.proba, self.threshold)


def probability_columns(class_names: Sequence[str]) -> list[str]:
    return [f"prob_{name}" for name in class_names]


def format_predictions(splits: Sequence[SplitPredictions], class_names: Sequence[str]) -> str:
    """The CSV text of ``splits`` (in the given order)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*FIXED_COLUMNS, *probability_columns(class_names)])
    for part in splits:
        if part.proba.shape[1] != len(class_names):
            raise ValueError(f"{part.proba.shape[1]} probability columns for {len(class_names)} class names")
        for i, (case, pred) in enumerate(zip(part.cases, part.predicted)):
            label = "" if part.labels is None else int(part.labels[i])
            threshold = "" if part.threshold is None else f"{part.threshold:.6g}"
            writer.writerow([case, part.split, label, int(pred), class_names[int(pred)], threshold,
                             *[f"{p:.6f}" for p in part.proba[i]]])
    return buf.getvalue()


def write_predictions(path: str | os.PathLike, splits: Sequence[SplitPredictions],
                      class_names: Sequence[str]) -> Path:
    """Write ``predictions.csv`` atomically; returns its path."""
    return write_text_atomic(path, format_predictions(splits, class_names))


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """Rows of a predictions.csv as dicts (``label`` and ``threshold`` None when empty, probabilities as
    floats)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out = dict(row)
            out["label"] = None if row["label"] == "" else int(row["label"])
            out["predicted"] = int(row["predicted"])
            out["threshold"] = float(row["threshold"]) if row.get("threshold") else None
            for key in row:
                if key.startswith("prob_"):
                    out[key] = float(row[key])
            rows.append(out)
    return rows
