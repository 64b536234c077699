"""Explain a set of NIfTI scans with one checkpoint and write the overlay folder.

Per case: preprocess with the checkpoint's evaluation transforms, predict, compute each attention
map on the network grid, invert it to the source grid and write
``<case>_<method>.nii.gz`` (float32 heatmap), ``<case>_<method>_label.nii.gz`` (uint8 region),
``previews/<case>_<method>.png``. Per folder: ``predictions.csv``, ``index.html``,
``load_in_slicer.py`` and ``explain.json`` (settings and timings). The folder is staged and moved
into place at the end, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from medimb.errors import UserError
from medimb.evaluation.predictions_csv import SplitPredictions, format_predictions
from medimb.networks import predict_proba

from .cam import FeatureMapClassifier
from .export import invert_to_source, threshold_region, write_heatmap, write_label
from .methods import create_explainer
from .settings import CLASS_FREE_EXPLAINERS, ExplainSettings
from .outputs import check_destination, staged_folder
from .preview import render_index, save_preview
from .slicer import render_loader


@dataclass
class CaseExplanation:
    """One case's prediction and its maps on the source grid (``(*S_src)`` float32 in [0, 1])."""

    case: str
    sources: list[str]
    label: int | None
    probabilities: list[float]
    predicted: int
    maps: dict[str, np.ndarray]
    seconds: dict[str, float]


def check_items_fit_model(model: torch.nn.Module, preprocessing: dict, items: list[dict]) -> None:
    """Raise :class:`UserError` when the items cannot be explained with this model's preprocessing."""
    if preprocessing.get("source", "nifti") != "nifti":
        raise UserError(
            f"this checkpoint was trained on {preprocessing.get('source')!r} arrays, not NIfTI scans")
    # 2.5D checkpoints (``slices=K``) are fine: their backbones return a 3D-shaped feature map over the
    # slab, (B, F, K, H', W') for slice_pool and (B, F, 1, H', W') for slice_channels, and Invertd undoes
    # the slab cut (crop + transpose); the overlay is 0 outside the K slices the network saw.
    expected = int(preprocessing.get("in_channels", 1))
    model_channels = int((getattr(model, "config", None) or {}).get("in_channels", expected))
    if model_channels != expected:
        raise UserError(
            f"checkpoint inconsistent: network takes {model_channels} channels, preprocessing {expected}")
    for item in items:
        if len(item["image"]) != expected:
            raise UserError(
                f"case {item['case']}: {len(item['image'])} image file(s) given but the model takes "
                f"{expected} channel(s)"
            )


def preprocess(transform, item: dict) -> dict:
    """Apply the evaluation transforms; a user error inside MONAI's wrapping comes out as itself."""
    try:
        return transform({"image": item["image"]})
    except Exception as exc:  # noqa: BLE001 - MONAI wraps errors in RuntimeError("applying transform ...")
        cause = exc
        while cause is not None:
            if isinstance(cause, UserError):
                raise UserError(f"case {item['case']}: {cause}") from exc
            cause = cause.__cause__
        raise


def _channel_check(data: dict, expected: int, case: str) -> None:
    got = int(data["image"].shape[0])
    if got != expected:
        raise UserError(
            f"case {case}: image has {got} channel(s) after loading but the model takes {expected}")


def explain_item(model, transform, item: dict, methods: list[str], target_class: int | None,
                 predict_proba, explainers: dict | None = None) -> CaseExplanation:
    """Predict and compute every method's map for one item, inverted to the source grid."""
    data = preprocess(transform, item)
    expected = int((getattr(model, "config", None) or {}).get("in_channels", data["image"].shape[0]))
    _channel_check(data, expected, item["case"])
    device = next(model.parameters()).device
    x = data["image"].as_tensor().unsqueeze(0).float().to(device)
    with torch.no_grad():
        logits = model(x)
        probs = predict_proba(model, logits)[0].cpu()
    predicted = int(probs.argmax())
    cls = predicted if target_class is None else int(target_class)
    maps, seconds = {}, {}
    explainers = explainers if explainers is not None else {m: create_explainer(m, model) for m in methods}
    for name in methods:
        start = time.perf_counter()
        heat = explainers[name](x, class_idx=cls)[0].cpu()  # (1, *S)
        seconds[name] = time.perf_counter() - start
        maps[name] = invert_to_source(heat, data, transform)
    return CaseExplanation(item["case"], list(item["image"]), item.get("label"),
                           [float(p) for p in probs], predicted, maps, seconds)


def _check_rerouting(model, transform, item: dict, channels: int) -> None:
    """CAM/Grad-CAM re-route the model through its feature map; make sure that is still the same model."""
    data = preprocess(transform, item)
    _channel_check(data, channels, item["case"])
    try:
        x = data["image"].as_tensor().unsqueeze(0).float().to(next(model.parameters()).device)
        FeatureMapClassifier(model).check_matches(x)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def _by_split(items: list[dict], cases: list[CaseExplanation]) -> list[SplitPredictions]:
    """The explained cases grouped by their datalist split (in order of appearance) for predictions.csv."""
    groups: dict[str, list[CaseExplanation]] = {}
    for item, case in zip(items, cases):
        groups.setdefault(item.get("split") or "", []).append(case)
    parts = []
    for split, group in groups.items():
        labels = None if any(c.label is None for c in group) else [c.label for c in group]
        parts.append(SplitPredictions(split, [c.case for c in group], labels, [c.probabilities for c in group]))
    return parts


def _class_names(meta: dict, num_classes: int) -> list[str]:
    names = [str(n) for n in (meta.get("class_names") or [])]
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


def preview_image(sources: list[str], reference: nib.Nifti1Image) -> np.ndarray:
    """The ``(*S_src)`` image drawn under the previews: the last channel (for DCE input the latest
    post-contrast phase, where lesions enhance) when it shares the first channel's grid, else the first."""
    shape = reference.shape[:3]
    last = nib.load(sources[-1]) if len(sources) > 1 else reference
    if last.shape[:3] != shape or not np.allclose(last.affine, reference.affine, atol=1e-3):
        last = reference
    return np.asarray(last.dataobj, dtype=np.float32).reshape(shape)


def write_case(folder: Path, exp: CaseExplanation, settings: ExplainSettings, class_names: list[str]) -> dict:
    """Write one case's heatmaps, label maps and previews into ``folder``; returns its index/loader row."""
    source = exp.sources[0]
    row = {"case": exp.case, "source": source, "heatmaps": {}, "labels": {}, "previews": {},
           "prediction": f"{class_names[exp.predicted]} ({exp.probabilities[exp.predicted]:.2f})",
           "predicted": exp.predicted, "probabilities": exp.probabilities, "label": exp.label}
    image = None
    if settings.previews:
        src = nib.load(source)
        image = preview_image(exp.sources, src)
    for method, heat in exp.maps.items():
        heat_name, label_name = f"{exp.case}_{method}.nii.gz", f"{exp.case}_{method}_label.nii.gz"
        write_heatmap(folder / heat_name, heat, source)
        write_label(folder / label_name, threshold_region(heat, settings.threshold), source)
        row["heatmaps"][method], row["labels"][method] = heat_name, label_name
        if image is not None:
            png = f"previews/{exp.case}_{method}.png"
            title = f"{exp.case}  {method}  predicted {row['prediction']}"
            save_preview(folder / png, image, heat, src.affine, title, settings.display_threshold,
                         settings.threshold)
            row["previews"][method] = png
    return row


def run_explain(model, meta: dict, items: list[dict], out_dir: str | Path, settings: ExplainSettings,
                overwrite: bool = False, progress: bool = True, checkpoint_name: str = "") -> dict:
    """Explain ``items`` (from :func:`medimb.explain.inputs.resolve_items`) into ``out_dir``; ``model`` and
    ``meta`` from :func:`medimb.networks.load_checkpoint` (``needs_preprocessing=True``). An item's ``split``
    (its datalist split; empty for files and folders) fills the ``split`` column of predictions.csv.

    Returns the summary also written to ``explain.json``.
    """
    from medimb.data.transforms import build_eval_transforms

    out_dir = Path(out_dir)
    check_destination(out_dir, overwrite)
    preprocessing = dict(meta["preprocessing"])
    check_items_fit_model(model, preprocessing, items)
    transform = build_eval_transforms(preprocessing)
    model.eval()
    explainers = {m: create_explainer(m, model) for m in settings.methods}
    num_classes = int((getattr(model, "config", None) or {}).get("num_classes", 0)) or None
    rows, cases = [], []
    with staged_folder(out_dir, overwrite=overwrite) as staging:
        for n, item in enumerate(tqdm(items, desc="explain", unit="case", disable=not progress)):
            if n == 0 and any(m not in CLASS_FREE_EXPLAINERS for m in settings.methods):
                _check_rerouting(model, transform, item, int(preprocessing.get("in_channels", 1)))
            exp = explain_item(model, transform, item, settings.methods, settings.target_class, predict_proba,
                               explainers)
            num_classes = num_classes or len(exp.probabilities)
            class_names = _class_names(meta, len(exp.probabilities))
            rows.append(write_case(staging, exp, settings, class_names))
            cases.append(exp)
        class_names = _class_names(meta, num_classes or 2)
        (staging / "predictions.csv").write_text(format_predictions(_by_split(items, cases), class_names))
        (staging / "load_in_slicer.py").write_text(
            render_loader(rows, staging, final_dir=out_dir, display_threshold=settings.display_threshold,
                          opacity=settings.opacity))
        if settings.previews:
            (staging / "index.html").write_text(render_index(rows, settings.methods, class_names))
        summary = {
            "checkpoint": checkpoint_name,
            "methods": settings.methods,
            "threshold": settings.threshold,
            "display_threshold": settings.display_threshold,
            "target_class": settings.target_class,
            "cases": [{"case": c.case, "predicted": c.predicted, "label": c.label,
                       "seconds": {k: round(v, 4) for k, v in c.seconds.items()}} for c in cases],
        }
        (staging / "explain.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
