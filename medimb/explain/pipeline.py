"""Explain a set of NIfTI scans with one checkpoint and write the overlay folder.

Per case: preprocess with the checkpoint's evaluation transforms, predict, compute each attention
map on the network grid, scale it (per case, or with the scale calibrated on the validation split),
invert it to the source grid and write ``<case>_<method>_on-<bg>.nii.gz`` (float32 heatmap),
``<case>_<method>_on-<bg>_label.nii.gz`` (uint8 region), ``previews/<case>_<method>_on-<bg>.png`` (``<bg>``:
the background's name), ``<case>.mrb`` (the case's 3D Slicer scene) and, for the subtraction background,
``<case>_subtraction.nii.gz``. Per folder:
``predictions.csv``, ``index.html``,
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
from medimb.evaluation.localization import localization_scores, summarize_by_label, summarize_scores
from medimb.evaluation.operating_point import predict_classes, resolve_operating_point
from medimb.evaluation.predictions_csv import SplitPredictions, format_predictions
from medimb.networks import predict_proba

from .cam import FeatureMapClassifier
from .export import (background_volume, invert_to_source, load_on_grid, threshold_region, write_heatmap,
                     write_label, write_volume)
from .methods import create_explainer
from .normalize import (CALIBRATION_FLOOR_PERCENTILE, CALIBRATION_PEAK_PERCENTILE, map_statistics,
                        minmax_per_volume, scale_calibrated, scale_from_statistics)
from .settings import CLASS_FREE_EXPLAINERS, ExplainSettings, background_channels, background_tag
from .outputs import check_destination, staged_folder
from .preview import render_index, save_preview
from .scene import write_case_scene
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
    #: per method, :func:`medimb.evaluation.localization.localization_scores` against the item's lesion mask
    localization: dict[str, dict[str, float]] | None = None


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
                 predict_proba, explainers: dict | None = None, scales: dict | None = None,
                 raw: bool = False, threshold: float | None = None) -> CaseExplanation:
    """Predict and compute every method's map for one item, inverted to the source grid.

    The predicted class (the one CAM/Grad-CAM explain unless ``target_class``) is ``P(1) > threshold`` for
    binary models (the operating point; 0.5 when None), the argmax for multi-class ones
    (:func:`medimb.evaluation.operating_point.predict_classes`).

    ``scales``: ``{method: (lo, hi)}`` calibrated scales (:func:`calibrate_maps`); a method without one is
    min-max scaled per volume. ``raw=True``: the maps stay unscaled on the network-input grid (calibration).
    """
    data = preprocess(transform, item)
    return explain_preprocessed(model, transform, data, item, methods, target_class, predict_proba, explainers,
                                scales=scales, raw=raw, threshold=threshold)


def explain_preprocessed(model, transform, data: dict, item: dict, methods: list[str], target_class: int | None,
                         predict_proba, explainers: dict | None = None, scales: dict | None = None,
                         raw: bool = False, threshold: float | None = None,
                         probabilities=None) -> CaseExplanation:
    """:func:`explain_item` of an item already through ``transform``: ``data["image"]`` is its ``(C, *S)``
    MetaTensor with the applied operations (e.g. one case of a MONAI evaluator's decollated batch).
    ``probabilities``: its ``(K,)`` class probabilities when already predicted (the network is not run again).
    """
    expected = int((getattr(model, "config", None) or {}).get("in_channels", data["image"].shape[0]))
    _channel_check(data, expected, item["case"])
    device = next(model.parameters()).device
    x = data["image"].as_tensor().unsqueeze(0).float().to(device)
    if probabilities is None:
        with torch.no_grad():
            logits = model(x)
            probs = predict_proba(model, logits)[0].cpu()
    else:
        probs = torch.as_tensor(probabilities).detach().float().reshape(-1).cpu()
    predicted = int(predict_classes(probs.double().numpy()[None], threshold)[0])
    cls = predicted if target_class is None else int(target_class)
    maps, seconds, localization = {}, {}, {}
    explainers = explainers if explainers is not None else {m: create_explainer(m, model) for m in methods}
    lesion = None if raw else lesion_mask(item)
    for name in methods:
        start = time.perf_counter()
        heat = explainers[name].raw_map(x, class_idx=cls)[0].cpu()  # (1, *S), unscaled
        if lesion is not None:  # on the unclipped map: a calibrated scale saturates peaks at 1 (ties)
            peak_map = invert_to_source(minmax_per_volume(heat[None])[0], data, transform)
            localization[name] = localization_scores(peak_map, *lesion)
        scale = (scales or {}).get(name)
        if not raw:  # scaled on the network grid, so inversion pads with 0 = not attended
            heat = minmax_per_volume(heat[None])[0] if scale is None else scale_calibrated(heat, *scale)
        seconds[name] = time.perf_counter() - start
        maps[name] = heat.numpy() if raw else invert_to_source(heat, data, transform)
    return CaseExplanation(item["case"], list(item["image"]), item.get("label"),
                           [float(p) for p in probs], predicted, maps, seconds, localization or None)


def lesion_mask(item: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mask (*S_src) bool, affine)`` of the item's ``"mask"`` when it has one with lesion voxels on the source
    scan's grid (``medimb-prep datalist --masks``); None otherwise (no mask, an empty mask: no lesion to find)."""
    if not item.get("mask"):
        return None
    mask_img = nib.load(item["mask"])
    source = nib.load(item["image"][0])
    if mask_img.shape[:3] != source.shape[:3] or not np.allclose(mask_img.affine, source.affine, atol=1e-3):
        raise UserError(f"case {item['case']}: mask {item['mask']} is not on the grid of {item['image'][0]}")
    mask = np.asarray(mask_img.dataobj).reshape(source.shape[:3]) > 0
    return (mask, source.affine) if mask.any() else None


def summarize_localization(cases: list[CaseExplanation], methods: list[str]) -> dict:
    """Per method, over the cases with a lesion mask: how many, the pointing game (share of maps whose peak lies
    in the lesion), the distance (mm) between the map's and the lesion's centres of mass (median), and the same
    per true class under ``by_label`` (for a malignancy classifier the malignant lesions are the ones its maps
    should find; :func:`medimb.evaluation.localization.summarize_by_label`)."""
    out = {}
    for method in methods:
        scored = [c for c in cases if c.localization and method in c.localization]
        if scored:
            scores = [c.localization[method] for c in scored]
            out[method] = {**summarize_scores(scores),
                           "by_label": summarize_by_label(scores, [c.label for c in scored])}
    return out


def _check_rerouting(model, transform, item: dict, channels: int) -> None:
    """CAM/Grad-CAM re-route the model through its feature map; make sure that is still the same model."""
    data = preprocess(transform, item)
    _channel_check(data, channels, item["case"])
    try:
        x = data["image"].as_tensor().unsqueeze(0).float().to(next(model.parameters()).device)
        FeatureMapClassifier(model).check_matches(x)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def _by_split(items: list[dict], cases: list[CaseExplanation],
              threshold: float | None = None) -> list[SplitPredictions]:
    """The explained cases grouped by their datalist split (in order of appearance) for predictions.csv."""
    groups: dict[str, list[CaseExplanation]] = {}
    for item, case in zip(items, cases):
        groups.setdefault(item.get("split") or "", []).append(case)
    parts = []
    for split, group in groups.items():
        labels = None if any(c.label is None for c in group) else [c.label for c in group]
        parts.append(SplitPredictions(split, [c.case for c in group], labels, [c.probabilities for c in group],
                                      threshold))
    return parts


def _class_names(meta: dict, num_classes: int) -> list[str]:
    names = [str(n) for n in (meta.get("class_names") or [])]
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


def preview_image(sources: list[str], channels: tuple[int, ...] = (0,)) -> np.ndarray:
    """The ``(*S_src)`` image drawn under the previews, on the first channel's grid (the overlays'): input
    channel ``channels[0]``, or the subtraction ``post - pre`` for ``channels == (post, pre)``
    (:func:`medimb.explain.settings.background_channels`: by default the first post-contrast phase)."""
    return background_volume(sources, channels)


def write_case(folder: Path, exp: CaseExplanation, settings: ExplainSettings, class_names: list[str],
               item: dict | None = None) -> dict:
    """Write one case's heatmaps, label maps and previews into ``folder``; returns its index/loader row.

    ``item`` (from :func:`medimb.explain.inputs.resolve_items`) gives the split, the truth mask (outlined in
    the previews, loaded by the Slicer script) and the channel names (the background's name in file names).
    """
    item = item or {}
    source = exp.sources[0]
    channels = background_channels(settings.background, len(exp.sources))
    tag = background_tag(settings.background, len(exp.sources), item.get("channel_names"))
    row = {"case": exp.case, "source": source, "heatmaps": {}, "labels": {}, "previews": {},
           "prediction": f"{class_names[exp.predicted]} ({exp.probabilities[exp.predicted]:.2f})",
           "predicted": exp.predicted, "probabilities": exp.probabilities, "label": exp.label,
           "split": item.get("split") or "", "truth": item.get("mask"),
           "background": {"name": tag, "path": exp.sources[channels[0]], "in_output": False}}
    image = truth = None
    if len(channels) == 2:  # the subtraction: written so that Slicer can show it
        image = preview_image(exp.sources, channels)
        name = f"{exp.case}_subtraction.nii.gz"
        write_volume(folder / name, image, source)
        row["background"] = {"name": tag, "path": name, "in_output": True}
    if settings.previews:
        image = preview_image(exp.sources, channels) if image is None else image
        truth = load_on_grid(item["mask"], source, order=0) if item.get("mask") else None
        src_affine = nib.load(source).affine
    for method, heat in exp.maps.items():
        stem = f"{exp.case}_{method}_on-{tag}"
        heat_name, label_name = f"{stem}.nii.gz", f"{stem}_label.nii.gz"
        write_heatmap(folder / heat_name, heat, source)
        write_label(folder / label_name, threshold_region(heat, settings.threshold), source)
        row["heatmaps"][method], row["labels"][method] = heat_name, label_name
        if settings.previews:
            png = f"previews/{stem}.png"
            title = f"{exp.case}  {method} on {tag}  predicted {row['prediction']}"
            save_preview(folder / png, image, heat, src_affine, title, settings.display_threshold,
                         settings.threshold, truth=truth)
            row["previews"][method] = png
    # the case's self-contained Slicer scene (<case>.mrb), stepped through by load_in_slicer.py
    row["scene"] = (write_case_scene(folder, row, settings.display_threshold, settings.opacity, settings.threshold)
                    if settings.scenes else None)
    return row


def resolve_map_scale(settings: ExplainSettings, calibration_items: list[dict] | None) -> str:
    """``"per-case"`` or ``"calibrated"``; ``auto`` calibrates when there are calibration (validation) items."""
    mode = settings.map_scale
    if mode not in ("auto", "per-case", "calibrated"):
        raise UserError(f"--map-scale {mode!r}: choose auto, per-case or calibrated")
    if mode == "calibrated" and not calibration_items:
        raise UserError("--map-scale calibrated needs a datalist with a validation split (the scale is "
                        "calibrated on it); use --map-scale per-case")
    if mode == "auto":
        return "calibrated" if calibration_items else "per-case"
    return mode


def calibrate_maps(model, transform, items: list[dict], methods: list[str], target_class: int | None,
                   explainers: dict, progress: bool = False, **predict) -> dict[str, tuple[float, float]]:
    """``{method: (lo, hi)}``: each method's raw maps over ``items`` (the validation split) on the network
    grid, reduced to one scale (:func:`medimb.explain.normalize.scale_from_statistics`). ``predict``: further
    arguments of :func:`explain_item` (how the class CAM/Grad-CAM explain is predicted)."""
    statistics: dict[str, list] = {m: [] for m in methods}
    for item in tqdm(items, desc="calibrate", unit="case", disable=not progress):
        exp = explain_item(model, transform, item, methods, target_class, predict_proba, explainers, raw=True,
                           **predict)
        for m in methods:
            statistics[m].append(map_statistics(exp.maps[m]))
    return {m: scale_from_statistics(statistics[m]) for m in methods}


def overlay_summary(settings: ExplainSettings, channels: int, items: list[dict], mode: str,
                    scales: dict | None, calibration_items: list[dict] | None) -> dict:
    """What explain.json says about the overlays: background, file names, and the scale of the maps."""
    tag = background_tag(settings.background, channels, (items[0] if items else {}).get("channel_names"))
    summary = {
        "background": {"choice": str(settings.background), "channels": list(background_channels(
            settings.background, channels)), "name": tag},
        "files": {"heatmap": f"<case>_<method>_on-{tag}.nii.gz",
                  "label": f"<case>_<method>_on-{tag}_label.nii.gz",
                  "preview": f"previews/<case>_<method>_on-{tag}.png"},
        "map_scale": mode,
    }
    if tag == "subtraction":
        summary["files"]["background"] = "<case>_subtraction.nii.gz"
    if mode == "calibrated":
        summary["map_scale_note"] = (
            "one scale per method, calibrated on the validation split: 0 = the median of the maps' "
            f"percentile {CALIBRATION_FLOOR_PERCENTILE:g}, 1 = percentile {CALIBRATION_PEAK_PERCENTILE:g} "
            "of their peak values (raw map values on the network grid); a case with weaker attention "
            "stays low")
        summary["calibration"] = {
            "split": "validation", "cases": len(calibration_items or []),
            "scale": {m: {"lo": lo, "hi": hi} for m, (lo, hi) in (scales or {}).items()}}
    else:
        summary["map_scale_note"] = (
            "each map min-max scaled to [0, 1] on its own (1 = the most attended voxel of that case; values "
            "are not comparable across cases)"
            + ("" if settings.map_scale == "per-case"
               else ": no validation split to calibrate on (--data is not a datalist with one)"))
    return summary


def run_explain(model, meta: dict, items: list[dict], out_dir: str | Path, settings: ExplainSettings,
                overwrite: bool = False, progress: bool = True, checkpoint_name: str = "",
                calibration_items: list[dict] | None = None, decision_threshold: float | None = None,
                keep: tuple[str, ...] = ()) -> dict:
    """Explain ``items`` (from :func:`medimb.explain.inputs.resolve_items`) into ``out_dir``; ``model`` and
    ``meta`` from :func:`medimb.networks.load_checkpoint` (``needs_preprocessing=True``). An item's ``split``
    (its datalist split; empty for files and folders) fills the ``split`` column of predictions.csv.

    ``calibration_items``: the validation split (:func:`medimb.explain.inputs.validation_items`) on which
    ``settings.map_scale`` ``"calibrated"`` (or ``"auto"``) calibrates one scale per method.

    Binary models predict class 1 when ``P(1) > decision_threshold`` when given, else at the checkpoint's
    operating point (0.5 without one); multi-class models by argmax.

    ``keep``: entries of an existing ``out_dir`` carried into the new one (``medimb predict``'s ``converted``
    inputs, which the items point at).

    Returns the summary also written to ``explain.json``.
    """
    from medimb.data.transforms import build_eval_transforms

    out_dir = Path(out_dir)
    check_destination(out_dir, overwrite)
    preprocessing = dict(meta["preprocessing"])
    check_items_fit_model(model, preprocessing, items)
    in_channels = int(preprocessing.get("in_channels", 1))
    try:
        background_channels(settings.background, in_channels)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    map_scale = resolve_map_scale(settings, calibration_items)
    if map_scale == "calibrated":
        check_items_fit_model(model, preprocessing, calibration_items)
    transform = build_eval_transforms(preprocessing)
    model.eval()
    explainers = {m: create_explainer(m, model) for m in settings.methods}
    scales = None
    num_classes = int((getattr(model, "config", None) or {}).get("num_classes", 0)) or None
    try:  # the decision threshold of binary models (medimb.evaluation.operating_point)
        point = resolve_operating_point(num_classes or 0, meta, decision_threshold)
    except ValueError as exc:
        raise UserError(f"--decision-threshold: {exc}") from None
    decision = None if point is None else point["threshold"]
    rows, cases = [], []
    with staged_folder(out_dir, overwrite=overwrite, keep=keep) as staging:
        if any(m not in CLASS_FREE_EXPLAINERS for m in settings.methods):
            _check_rerouting(model, transform, items[0], in_channels)
        if map_scale == "calibrated":
            scales = calibrate_maps(model, transform, calibration_items, settings.methods,
                                    settings.target_class, explainers, progress=progress, threshold=decision)
        for item in tqdm(items, desc="explain", unit="case", disable=not progress):
            exp = explain_item(model, transform, item, settings.methods, settings.target_class, predict_proba,
                               explainers, scales=scales, threshold=decision)
            num_classes = num_classes or len(exp.probabilities)
            class_names = _class_names(meta, len(exp.probabilities))
            rows.append(write_case(staging, exp, settings, class_names, item=item))
            cases.append(exp)
        summary = write_folder_files(staging, out_dir, items, cases, rows, settings, meta, num_classes, point,
                                     map_scale, scales, calibration_items, checkpoint_name)
    return summary


def write_folder_files(staging: Path, out_dir: Path, items: list[dict], cases: list[CaseExplanation],
                       rows: list[dict], settings: ExplainSettings, meta: dict, num_classes: int | None,
                       point: dict | None, map_scale: str, scales: dict | None,
                       calibration_items: list[dict] | None, checkpoint_name: str = "") -> dict:
    """The per-folder files after every case is written into ``staging`` (``rows`` from :func:`write_case`):
    predictions.csv, load_in_slicer.py (paths as in ``out_dir``; with the scenes), index.html (with previews) and
    explain.json,
    whose content is returned. ``point``: the binary operating point the cases were predicted at, or None."""
    in_channels = int(dict(meta["preprocessing"]).get("in_channels", 1))
    decision = None if point is None else point["threshold"]
    class_names = _class_names(meta, num_classes or 2)
    predictions = format_predictions(_by_split(items, cases, decision), class_names)
    (staging / "predictions.csv").write_text(predictions)
    if settings.scenes:
        (staging / "load_in_slicer.py").write_text(render_loader(rows, final_dir=out_dir))
    if settings.previews:
        overlays = overlay_summary(settings, in_channels, items, map_scale, scales, calibration_items)
        notes = [f"Background: {overlays['background']['name']} (--background {settings.background}). "
                 f"Map scale: {map_scale}: {overlays['map_scale_note']}."]
        (staging / "index.html").write_text(render_index(rows, settings.methods, class_names, notes=notes,
                                                         truth=any(r.get("truth") for r in rows)))
    summary = {
        "checkpoint": checkpoint_name,
        "methods": settings.methods,
        "threshold": settings.threshold,
        "display_threshold": settings.display_threshold,
        "target_class": settings.target_class,
        "operating_point": point,
        # what the model takes, as its checkpoint records it (e.g. phase-00..phase-03; empty for older checkpoints)
        "channels": list(dict(meta["preprocessing"]).get("channels") or []),
        # "source": the file name of the case's first input, whose grid the overlays share (medimb export-dicom
        # finds the case's original DICOM instances by it in the link table)
        # "inputs": the file name of every channel the case was predicted from, in the model's channel order
        "cases": [{"case": c.case, "source": Path(c.sources[0]).name, "inputs": [Path(p).name for p in c.sources],
                   "predicted": c.predicted, "label": c.label,
                   "seconds": {k: round(v, 4) for k, v in c.seconds.items()},
                   **({"localization": c.localization} if c.localization else {})} for c in cases],
        # maps against the items' lesion masks (datalist "mask"): computed on each map before any clipping
        "localization": summarize_localization(cases, settings.methods),
    }
    summary.update(overlay_summary(settings, in_channels, items, map_scale, scales, calibration_items))
    (staging / "explain.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
