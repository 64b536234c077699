"""``medimb explain --checkpoint CKPT --data PATH --out DIR [--methods coam,gradcam,cam]``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medimb.commands.options import add_runtime_options, add_splits_option
from medimb.errors import UserError
from medimb.explain.settings import (BACKGROUNDS, DEFAULT_EXPLAINERS, EXPLAINER_NAMES, MAP_SCALES, ExplainSettings,
                                     parse_background, parse_explainers)

_DEFAULTS = ExplainSettings()
#: the subfolder of --out that holds a DICOM input's conversion and 4D inputs split into their phases
CONVERTED = "converted"
logger = logging.getLogger("medimb")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "explain",
        help="attention maps (COAM, CAM, Grad-CAM) as NIfTI overlays for 3D Slicer",
        description="Predict each scan and write attention heatmaps on the source scan's grid "
        "(<case>_<method>_on-<background>.nii.gz), thresholded regions (..._label.nii.gz), PNG previews with "
        "index.html, predictions.csv and load_in_slicer.py (run: Slicer --python-script load_in_slicer.py).",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint (.pt) from medimb train")
    parser.add_argument("--data", required=True, type=Path,
                        help="a datalist JSON (labelled or not), a DICOM study/archive folder (converted into "
                        "OUT/converted, de-identified), a converted folder or sub-*/ses-* folder, a 4D DCE NIfTI, "
                        "a NIfTI file or a folder of them; the checkpoint's channels are assembled from it")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; must be empty)")
    parser.add_argument("--methods", default=",".join(DEFAULT_EXPLAINERS),
                        help=f"comma-separated, from {', '.join(EXPLAINER_NAMES)} (default: %(default)s)")
    add_splits_option(parser, None, "datalist splits to explain")
    parser.add_argument("--target-class", type=int, default=None,
                        help="class CAM/Grad-CAM explain (default: each case's predicted class)")
    parser.add_argument("--threshold", type=float, default=_DEFAULTS.threshold,
                        help="label map region: map >= this (maps are scaled to [0, 1]; default %(default)s)")
    parser.add_argument("--decision-threshold", type=float, default=None, metavar="T",
                        help="binary models: predict (and explain) class 1 when its probability > T (default: the "
                        "checkpoint's operating point, chosen on validation by medimb train; 0.5 without one)")
    parser.add_argument("--display-threshold", type=float, default=_DEFAULTS.display_threshold,
                        help="heatmap values below this are transparent in Slicer and the PNGs "
                        "(default %(default)s)")
    parser.add_argument("--background", default=_DEFAULTS.background, metavar="|".join(BACKGROUNDS) + "|INDEX",
                        help="image under the maps in the previews and the Slicer scene: the first post-contrast "
                        "phase (channel 1; pre-contrast first), the subtraction first post minus pre (written as "
                        "<case>_subtraction.nii.gz), the last channel, or a channel index; one-channel models: "
                        "their channel (default %(default)s)")
    parser.add_argument("--map-scale", default=_DEFAULTS.map_scale, choices=MAP_SCALES,
                        help="calibrated: one scale per method from the validation split's maps, so weak "
                        "attention stays low; per-case: each map stretched to [0, 1]; auto: calibrated when "
                        "--data is a datalist with a validation split, else per-case (default %(default)s)")
    parser.add_argument("--no-previews", action="store_true", help="skip PNG previews and index.html")
    parser.add_argument("--no-scenes", action="store_true",
                        help="skip the 3D Slicer scene per case (<case>.mrb, a copy of its background and maps) and "
                        "load_in_slicer.py; the NIfTI overlays stay")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    add_input_options(parser)
    add_runtime_options(parser, workers=False)  # one case at a time: nothing to load in parallel
    parser.set_defaults(func=run)
    return parser


def add_input_options(parser: argparse.ArgumentParser) -> None:
    """A DICOM input's conversion options, as ``medimb-prep convert`` takes them: the de-identification key and
    the private link table (which ``medimb export-dicom`` reads to put results back next to the source series);
    and ``--series``, which series of a converted or DICOM input to take."""
    from data_prep import deid

    deid.add_key_arguments(parser)
    parser.add_argument("--link-table", metavar="PATH", type=Path, default=None,
                        help="DICOM input: also write the private link table (converted volume <-> original Study, "
                        "Series and SOP Instance UIDs; PHI, mode 0600, outside --out) for medimb export-dicom")
    parser.add_argument("--no-descriptors", action="store_true",
                        help="DICOM input: convert as medimb-prep convert --no-descriptors (no SeriesDescription / "
                        "ProtocolName text anywhere, for archives whose descriptions may name people)")
    parser.add_argument("--series", metavar="PATTERN", default=None,
                        help="DICOM or converted input: only the series whose label or description matches this "
                        "glob/substring, e.g. to choose between two DCE series of a study (as medimb-prep datalist "
                        "--series)")


def check_thresholds(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(args, name) is not None and not 0.0 <= getattr(args, name) <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")


def explain_inputs(args: argparse.Namespace, data: Path, settings: ExplainSettings, splits: list[str] | None,
                   decision_threshold: float | None) -> dict:
    """Load the checkpoint, turn ``data`` into cases with the channels it takes (DICOM converted into
    ``OUT/converted``, 4D files split there: :func:`medimb.explain.inputs.resolve_items`) and explain them into
    ``args.out`` (:func:`medimb.explain.pipeline.run_explain`); returns its summary plus ``"channels"`` (what
    the model takes, and the note when that was assumed). Shared by ``medimb explain`` and ``medimb predict``.
    A failed run removes the output folder it created."""
    import shutil

    from data_prep import deid
    from data_prep.cli import UserError as PrepError
    from medimb.data.channels import ASSUMED, ChannelSpec
    from medimb.explain.inputs import resolve_items, validation_items
    from medimb.explain.outputs import check_destination
    from medimb.explain.pipeline import run_explain
    from medimb.networks import load_checkpoint
    from medimb.runtime import resolve_device

    out = Path(args.out)
    device = resolve_device(args.device)
    model, meta = load_checkpoint(args.checkpoint, map_location=device, needs_preprocessing=True)
    num_classes = int(model.config.get("num_classes", 0))
    if settings.target_class is not None and not 0 <= settings.target_class < num_classes:
        raise UserError(f"--target-class must be in 0..{num_classes - 1}, got {settings.target_class}")
    check_destination(out, args.overwrite)
    if args.link_table is not None and Path(args.link_table).resolve().is_relative_to(out.resolve()):
        raise UserError(f"--link-table {args.link_table} holds PHI: put it outside the de-identified --out {out}")
    channels = ChannelSpec.from_preprocessing(meta["preprocessing"])
    work_dir = out / CONVERTED
    created, had_inputs = not out.exists(), work_dir.exists()
    try:
        key = deid.key_from_arguments(args)
    except PrepError as exc:  # a key file that cannot be read
        raise UserError(str(exc)) from None
    try:
        items = resolve_items(data, splits, channels=channels, work_dir=work_dir, deid_key=key,
                              progress=not args.no_progress, link_table=args.link_table, series=args.series,
                              descriptors=not args.no_descriptors)
        calibration = (validation_items(data, channels=channels, work_dir=work_dir)
                       if settings.map_scale != "per-case" else None)
        note = channels.note if any(item.get(ASSUMED) for item in items) else None
        if note:
            logger.warning("note: %s", note)
        wrote_inputs = work_dir.exists()
        summary = run_explain(model, meta, items, out, settings, overwrite=args.overwrite or wrote_inputs,
                              progress=not args.no_progress, checkpoint_name=Path(args.checkpoint).name,
                              calibration_items=calibration, decision_threshold=decision_threshold,
                              keep=(CONVERTED,) if wrote_inputs else ())
    except UserError:  # leave nothing behind but what was there (an interrupted conversion stays to resume)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        elif not had_inputs:
            shutil.rmtree(work_dir, ignore_errors=True)
        raise
    summary["channels"] = {"names": list(channels.names), "recorded": channels.recorded, "note": note}
    return summary


def run(args: argparse.Namespace) -> int:
    try:
        methods = parse_explainers(args.methods)
        background = parse_background(args.background)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    check_thresholds(args, ("threshold", "display_threshold", "decision_threshold"))
    settings = ExplainSettings(methods=methods, threshold=args.threshold,
                               display_threshold=args.display_threshold, target_class=args.target_class,
                               previews=not args.no_previews, background=background, map_scale=args.map_scale,
                               scenes=not args.no_scenes)
    summary = explain_inputs(args, args.data, settings, args.splits, args.decision_threshold)
    n = len(summary["cases"])
    print(f"explained {n} case(s) with {', '.join(methods)} -> {args.out}")
    print(f"  overlays:    {summary['files']['heatmap']} (background {summary['background']['name']}, "
          f"map scale {summary['map_scale']})")
    print(f"  predictions: {args.out / 'predictions.csv'}")
    if settings.previews:
        print(f"  previews:    {args.out / 'index.html'}")
    if settings.scenes:
        print(f"  3D Slicer:   Slicer --python-script {args.out / 'load_in_slicer.py'}")
    return 0
