"""Evaluate a trained checkpoint on a dataset: the library side of ``medimb evaluate``.

The data is preprocessed with the checkpoint's own ``preprocessing`` (exactly as in training), so data with
other channels or classes than the model was trained on is a one-line error. Binary models decide at the
checkpoint's operating point (:mod:`medimb.evaluation.operating_point`) unless a threshold is given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from medimb.data import load_splits
from medimb.data.datalist import DATALIST_SPLITS, case_ids
from medimb.errors import DataError, UserError
from medimb.evaluation.operating_point import resolve_operating_point
from medimb.evaluation.prediction import predict, uses_flip_tta
from medimb.evaluation.predictions_csv import SplitPredictions
from medimb.evaluation.report import write_evaluation
from medimb.networks import load_checkpoint
from medimb.runtime import resolve_device

#: the DataSplits dataset each split name is evaluated on (training without augmentation)
EVAL_DATASETS = {"training": "train_eval", "validation": "val", "test": "test"}


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
                        splits: Sequence[str] = ("validation", "test"), device: str = "auto",
                        num_workers: int = 0, threshold: float | None = None) -> dict:
    """Predict ``splits`` of ``data`` (MedMNIST .npz or datalist) with ``checkpoint`` and write the evaluation
    output (:func:`medimb.evaluation.report.write_evaluation`) into ``out``; returns the metrics.json content.

    Binary models decide at ``threshold`` when given, else at the checkpoint's operating point, else at 0.5
    (metrics.json ``operating_point`` says which); multi-class models by argmax."""
    unknown = [s for s in splits if s not in EVAL_DATASETS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; choose from {list(DATALIST_SPLITS)}")
    dev = resolve_device(device)
    model, meta = load_checkpoint(checkpoint, map_location=dev, needs_preprocessing=True)
    try:
        point = resolve_operating_point(model.config["num_classes"], meta, threshold)
    except ValueError as exc:
        raise UserError(f"--threshold: {exc}") from None
    decision = None if point is None else point["threshold"]
    data_splits = load_splits(data, preprocessing=meta["preprocessing"], cache="none")
    if data_splits.num_classes != model.config["num_classes"]:
        raise DataError(f"{data}: {data_splits.num_classes} classes, the model predicts {model.config['num_classes']}")
    names = meta.get("class_names") or data_splits.class_names
    # evaluate the way training reported its metrics (flip TTA unless the run turned it off)
    tta = uses_flip_tta(meta.get("train_config", {}).get("flip_tta", False), data_splits.preprocessing)
    parts, features = [], {}
    for split in splits:
        dataset = getattr(data_splits, EVAL_DATASETS[split])
        pred = predict(model, dataset, dev, num_workers=num_workers, flip_tta=tta)
        parts.append(SplitPredictions(split, case_ids(dataset.data), pred["labels"], pred["proba"], decision))
        features[split] = pred["features"]
    extra = {"checkpoint": str(Path(checkpoint).resolve()), "method": meta.get("method"), "flip_tta": tta}
    if point is not None:
        extra["operating_point"] = point
    return write_evaluation(out, parts, names, features, extra=extra)
