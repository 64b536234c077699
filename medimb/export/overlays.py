"""Read a ``medimb explain`` output folder: which cases and methods it holds, their files and predictions.

The folder (:mod:`medimb.explain.pipeline`): ``explain.json`` (methods, the region threshold, the file name
patterns ``<case>_<method>_on-<bg>.nii.gz`` / ``..._label.nii.gz``), ``predictions.csv``
(:mod:`medimb.evaluation.predictions_csv`) and per case and method the float32 heatmap and uint8 region on
the case's source scan grid (its first channel's converted NIfTI, named in explain.json's per-case ``source``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from medimb.errors import UserError

from .objects import Prediction


@dataclass
class OverlayCase:
    """One case of an explain folder: ``maps`` ``{method: (heatmap path, region path)}``, its prediction and
    ``source``, the file name of its first input (the overlays' grid; explain.json's ``source``, else the case id
    plus ``.nii.gz`` for folders written before medimb recorded it)."""

    case: str
    prediction: Prediction
    source: str
    maps: dict[str, tuple[Path, Path]] = field(default_factory=dict)


@dataclass
class OverlayFolder:
    folder: Path
    methods: list[str]
    region_threshold: float
    cases: list[OverlayCase]


def _prediction(row: dict) -> Prediction:
    name = row["predicted_name"]
    probability = row.get(f"prob_{name}")
    if probability is None:  # class names that are not columns: the predicted index's column
        probs = [v for k, v in row.items() if k.startswith("prob_")]
        probability = probs[row["predicted"]]
    return Prediction(name, float(probability), row.get("threshold"))


def read_overlay_folder(folder: str | Path, methods: list[str] | None = None) -> OverlayFolder:
    """The cases of an explain folder with the ``methods`` asked for (default: every method it has).

    :class:`UserError` when it is not an explain folder, a method was not explained, or a file is missing.
    """
    from medimb.evaluation.predictions_csv import read_predictions

    folder = Path(folder)
    summary_path, csv_path = folder / "explain.json", folder / "predictions.csv"
    if not summary_path.is_file() or not csv_path.is_file():
        raise UserError(f"--overlays {folder}: not a medimb explain output folder (no explain.json and "
                        "predictions.csv)")
    try:
        summary = json.loads(summary_path.read_text())
        heat_pattern = summary["files"]["heatmap"]
        label_pattern = summary["files"]["label"]
        have = list(summary["methods"])
        region_threshold = float(summary["threshold"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{summary_path}: not a readable explain summary ({exc})") from None
    methods = list(methods or have)
    missing = [m for m in methods if m not in have]
    if missing:
        raise UserError(f"--methods {','.join(missing)}: not in {folder} (it has {', '.join(have)})")
    try:
        rows = read_predictions(csv_path)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{csv_path}: not a readable predictions.csv ({exc})") from None
    sources = {c.get("case"): c.get("source") for c in summary.get("cases", []) if isinstance(c, dict)}
    cases, seen = [], set()
    for row in rows:
        if row["case"] in seen:  # a case listed under two splits: one result
            continue
        seen.add(row["case"])
        item = OverlayCase(row["case"], _prediction(row), sources.get(row["case"]) or f"{row['case']}.nii.gz")
        for method in methods:
            heat = folder / heat_pattern.replace("<case>", row["case"]).replace("<method>", method)
            label = folder / label_pattern.replace("<case>", row["case"]).replace("<method>", method)
            for path in (heat, label):
                if not path.is_file():
                    raise UserError(f"{folder}: {path.name} is missing (case {row['case']}, method {method})")
            item.maps[method] = (heat, label)
        cases.append(item)
    if not cases:
        raise UserError(f"{csv_path} lists no cases")
    return OverlayFolder(folder, methods, region_threshold, cases)
