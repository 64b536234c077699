"""The evaluation output of a model on one or more splits, the same for ``medimb train``, ``medimb
evaluate`` and the bundles' evaluate step::

    OUT/metrics.json         {"<split>": compute_metrics(...) + "ci95", ..., "class_names": [...], **extra}
    OUT/predictions.csv      one row per case and split (medimb.evaluation.predictions_csv)
    OUT/plots/<split>/       roc.png, pr.png, confusion_matrix.png, reliability.png (+ features_pca.png)

Binary models decide at each split's ``threshold`` (:mod:`medimb.evaluation.operating_point`); every split's
metrics state it beside AUC, with 95 % bootstrap intervals (``ci95``) of balanced accuracy, AUC,
sensitivity and specificity.

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
from medimb.evaluation.metrics import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CI_METHOD,
    bootstrap_ci,
    compute_metrics,
    format_ci_summary,
    format_summary,
)
from medimb.evaluation.operating_point import (HEAD_PRIOR_KEY, PRIOR, choose_threshold, resolve_operating_point,
                                               store_operating_point)
from medimb.evaluation.predictions_csv import SplitPredictions, write_predictions

logger = logging.getLogger(__name__)


def write_split_plots(part: SplitPredictions, class_names: Sequence[str], plot_dir: Path,
                      features: np.ndarray | None = None) -> list[str]:
    """ROC and PR (when both classes are present), the confusion matrix at the split's threshold, the
    reliability plot and, given pooled ``features`` (N, F) of >= 3 cases, their PCA projection; returns
    the PNG paths."""
    y, proba = part.labels, part.proba
    written = []
    if len(set(y.tolist())) > 1:  # curves need both classes
        written += [plots.plot_roc(y, proba, plot_dir / "roc.png", class_names=class_names,
                                   threshold=part.threshold),
                    plots.plot_pr(y, proba, plot_dir / "pr.png", class_names=class_names)]
    written.append(plots.plot_confusion_matrix(y, proba, plot_dir / "confusion_matrix.png",
                                               class_names=class_names, threshold=part.threshold,
                                               split=part.split))
    written.append(plots.plot_reliability(y, proba, plot_dir / "reliability.png", class_names=class_names,
                                          split=part.split))
    if features is not None:
        if len(y) >= 3:  # a projection needs 3 points; a tiny split still gets its other plots
            written.append(plots.plot_embedding(features, y, plot_dir / "features_pca.png", class_names=class_names))
        else:
            logger.warning("%d case(s) in split %s: no feature projection plot (needs 3)", len(y), part.split)
    return [str(p) for p in written]


def write_evaluation(out_dir: str | os.PathLike, parts: Sequence[SplitPredictions], class_names: Sequence[str],
                     features: Mapping[str, np.ndarray] | None = None, extra: Mapping[str, Any] | None = None,
                     with_plots: bool = True, bootstrap: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Write metrics.json, predictions.csv and the plots of labelled ``parts`` into ``out_dir``; returns
    the metrics.json content. ``features``: pooled features per split name, for the projection plot.

    Each split's metrics are at its ``part.threshold`` (binary models) and carry ``ci95``: 95 % intervals
    of :data:`~medimb.evaluation.metrics.CI_KEYS` from ``bootstrap`` stratified resamples (seed
    :data:`~medimb.evaluation.metrics.BOOTSTRAP_SEED`; ``bootstrap=0``: none)."""
    out_dir = Path(out_dir)
    class_names = [str(n) for n in class_names]
    result: dict[str, Any] = dict(extra or {})
    result["class_names"] = class_names
    for part in parts:
        if part.labels is None:
            raise ValueError(f"split {part.split} has no labels: metrics need them")
        metrics = compute_metrics(part.labels, part.proba, threshold=part.threshold)
        if bootstrap:
            metrics["ci95"] = bootstrap_ci(part.labels, part.proba, part.threshold, n_resamples=bootstrap,
                                           seed=BOOTSTRAP_SEED)
            metrics["ci95_method"] = f"{CI_METHOD}; {bootstrap} resamples, seed {BOOTSTRAP_SEED}"
        result[part.split] = metrics
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


def interval_lines(result: Mapping[str, Any], splits: Sequence[str]) -> list[str]:
    """``"test: balanced accuracy 0.88 (0.79-0.95), AUC ..., threshold 0.420"`` per split of a
    :func:`write_evaluation` result (:func:`~medimb.evaluation.metrics.format_ci_summary`)."""
    return [f"{split}: {format_ci_summary(result[split])}" for split in splits if split in result]


class EvaluationReport:
    """Ignite handler for an evaluator (MONAI ``SupervisedEvaluator``): collects logits (B, K) and labels (B,)
    over one epoch, then :func:`write_evaluation` of that split into ``output_dir``. Rank 0 only.

    Args:
        output_dir: folder for metrics.json, predictions.csv and plots/.
        network: the model; its head decides softmax vs sigmoid (:func:`medimb.networks.predict_proba`).
        class_names: one name per class.
        split: the evaluated split's datalist name (``test``, ``validation``, ``training``).
        cases: one id per item in loader order (:func:`medimb.data.datalist.case_ids`); default 0..N-1.
        checkpoint: the model's checkpoint file: binary models decide at its stored operating point
            (threshold 0.5 without one).
        threshold: a decision threshold that overrides the checkpoint's (binary models).
        choose_operating_point: a rule (``"balanced_accuracy"``, ``"prior"``, ``"sensitivity>=0.9"``): choose
            the threshold on this split (the validation split), store it in ``checkpoint`` and report at it
            (``"prior"`` reads the checkpoint's ``head_prior``, which training records).
    """

    def __init__(self, output_dir: str, network, class_names: Sequence[str], split: str = "test",
                 cases: Sequence[str] | None = None, checkpoint: str | os.PathLike | None = None,
                 threshold: float | None = None, choose_operating_point: str | None = None):
        self.output_dir, self.network, self.split = Path(output_dir), network, split
        self.class_names = [str(n) for n in class_names]
        self.cases = list(cases) if cases is not None else None
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.threshold, self.rule = threshold, choose_operating_point
        if self.rule is not None and self.checkpoint is None:
            raise ValueError("choose_operating_point needs the checkpoint to store the operating point in")
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
        extra: dict[str, Any] = {}
        if self.rule is not None and self.threshold is None and proba.shape[1] == 2:
            prior = None
            if self.rule == PRIOR:  # the prior the head was fitted under, recorded by training
                from medimb.networks import read_checkpoint_file

                prior = read_checkpoint_file(self.checkpoint).get(HEAD_PRIOR_KEY)
            point = choose_threshold(labels, proba, self.rule, head_prior=prior)
            store_operating_point(self.checkpoint, point)
            extra["operating_point"] = {**point,
                                        "source": f"chosen on {self.split}, stored in the checkpoint"}
        else:
            meta = None
            if self.checkpoint is not None and self.threshold is None and proba.shape[1] == 2:
                from medimb.networks import read_checkpoint_file

                meta = read_checkpoint_file(self.checkpoint)
            point = resolve_operating_point(proba.shape[1], meta, self.threshold)
            if point is not None:
                extra["operating_point"] = point
        threshold = None if point is None else point["threshold"]
        part = SplitPredictions(self.split, cases, labels, proba, threshold)
        self.result = write_evaluation(self.output_dir, [part], self.class_names, extra=extra)
        logger.info("%s: %s -> %s", self.split, format_ci_summary(self.result[self.split]),
                    self.output_dir / "metrics.json")
