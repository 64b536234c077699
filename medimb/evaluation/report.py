"""The evaluation output of a model on one or more splits, the same for ``medimb train``, ``medimb
evaluate`` and the bundles' evaluate step::

    OUT/metrics.json         {"<split>": compute_metrics(...), ..., "class_names": [...], **extra}
    OUT/predictions.csv      one row per case and split (medimb.evaluation.predictions_csv)
    OUT/plots/<split>/       roc.png, pr.png, confusion_matrix.png (+ features_pca.png with features)

Split names are the datalist's: ``training``, ``validation``, ``test``. Every file is written atomically.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medimb.atomic import write_json_atomic
from medimb.evaluation import plots
from medimb.evaluation.metrics import compute_metrics, format_summary
from medimb.evaluation.predictions_csv import SplitPredictions, write_predictions

logger = logging.getLogger(__name__)


def write_split_plots(part: SplitPredictions, class_names: Sequence[str], plot_dir: Path,
                      features: np.ndarray | None = None) -> list[str]:
    """ROC and PR (when both classes are present), the confusion matrix and, given pooled ``features``
    (N, F) of >= 3 cases, their PCA projection; returns the PNG paths."""
    y, proba = part.labels, part.proba
    written = []
    if len(set(y.tolist())) > 1:  # curves need both classes
        written += [plots.plot_roc(y, proba, plot_dir / "roc.png", class_names=class_names),
                    plots.plot_pr(y, proba, plot_dir / "pr.png", class_names=class_names)]
    written.append(plots.plot_confusion_matrix(y, proba, plot_dir / "confusion_matrix.png", class_names=class_names))
    if features is not None:
        if len(y) >= 3:  # a projection needs 3 points; a tiny split still gets its other plots
            written.append(plots.plot_embedding(features, y, plot_dir / "features_pca.png", class_names=class_names))
        else:
            logger.warning("%d case(s) in split %s: no feature projection plot (needs 3)", len(y), part.split)
    return [str(p) for p in written]


def write_evaluation(out_dir: str | os.PathLike, parts: Sequence[SplitPredictions], class_names: Sequence[str],
                     features: Mapping[str, np.ndarray] | None = None, extra: Mapping[str, Any] | None = None,
                     with_plots: bool = True) -> dict:
    """Write metrics.json, predictions.csv and the plots of labelled ``parts`` into ``out_dir``; returns
    the metrics.json content. ``features``: pooled features per split name, for the projection plot."""
    out_dir = Path(out_dir)
    class_names = [str(n) for n in class_names]
    result: dict[str, Any] = dict(extra or {})
    result["class_names"] = class_names
    for part in parts:
        if part.labels is None:
            raise ValueError(f"split {part.split} has no labels: metrics need them")
        result[part.split] = compute_metrics(part.labels, part.proba)
    write_predictions(out_dir / "predictions.csv", parts, class_names)
    if with_plots:
        result["plots"] = {part.split: write_split_plots(part, class_names, out_dir / "plots" / part.split,
                                                         (features or {}).get(part.split))
                           for part in parts}
    write_json_atomic(out_dir / "metrics.json", result)
    return result


def summary_line(result: Mapping[str, Any], splits: Sequence[str]) -> str:
    """``"validation balanced_accuracy=... | test ..."`` for the splits of a :func:`write_evaluation` result."""
    return " | ".join(f"{split} {format_summary(result[split])}" for split in splits if split in result)


class EvaluationReport:
    """Ignite handler for an evaluator (MONAI ``SupervisedEvaluator``): collects logits (B, K) and labels (B,)
    over one epoch, then :func:`write_evaluation` of that split into ``output_dir``. Rank 0 only.

    Args:
        output_dir: folder for metrics.json, predictions.csv and plots/.
        network: the model; its head decides softmax vs sigmoid (:func:`medimb.networks.predict_proba`).
        class_names: one name per class.
        split: the evaluated split's datalist name (``test``, ``validation``, ``training``).
        cases: one id per item in loader order (:func:`medimb.data.datalist.case_ids`); default 0..N-1.
    """

    def __init__(self, output_dir: str, network, class_names: Sequence[str], split: str = "test",
                 cases: Sequence[str] | None = None):
        self.output_dir, self.network, self.split = Path(output_dir), network, split
        self.class_names = [str(n) for n in class_names]
        self.cases = list(cases) if cases is not None else None
        self.result: dict = {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine) -> None:
        self._logits, self._labels = [], []

    def _collect(self, engine) -> None:
        import torch

        out = engine.state.output
        self._logits.append(out["pred"].detach().float().cpu())
        self._labels.append(torch.as_tensor(out["label"]).reshape(-1).cpu())

    def _write(self, engine) -> None:
        import torch

        from medimb.networks import predict_proba
        from medimb.runtime import is_main_process

        if not is_main_process():
            return
        labels = torch.cat(self._labels).numpy()
        proba = predict_proba(self.network, torch.cat(self._logits)).numpy()
        cases = self.cases or [str(i) for i in range(len(labels))]
        part = SplitPredictions(self.split, cases, labels, proba)
        self.result = write_evaluation(self.output_dir, [part], self.class_names)
        logger.info("%s: %s -> %s", self.split, format_summary(self.result[self.split]),
                    self.output_dir / "metrics.json")
