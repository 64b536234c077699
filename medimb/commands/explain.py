"""``medimb explain --checkpoint CKPT --data PATH --out DIR [--methods coam,gradcam,cam]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from medimb.commands.options import add_runtime_options, add_splits_option
from medimb.errors import UserError
from medimb.explain.settings import (BACKGROUNDS, DEFAULT_EXPLAINERS, EXPLAINER_NAMES, MAP_SCALES, ExplainSettings,
                                     parse_background, parse_explainers)

_DEFAULTS = ExplainSettings()


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
                        help="datalist JSON, a folder of .nii/.nii.gz files, or one NIfTI file")
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
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    add_runtime_options(parser, workers=False)  # one case at a time: nothing to load in parallel
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        methods = parse_explainers(args.methods)
        background = parse_background(args.background)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    for name in ("threshold", "display_threshold", "decision_threshold"):
        if getattr(args, name) is not None and not 0.0 <= getattr(args, name) <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    from medimb.explain.inputs import resolve_items, validation_items
    from medimb.explain.pipeline import run_explain
    from medimb.networks import load_checkpoint
    from medimb.runtime import resolve_device

    device = resolve_device(args.device)
    items = resolve_items(args.data, args.splits)
    model, meta = load_checkpoint(args.checkpoint, map_location=device, needs_preprocessing=True)
    num_classes = int(model.config.get("num_classes", 0))
    if args.target_class is not None and not 0 <= args.target_class < num_classes:
        raise UserError(f"--target-class must be in 0..{num_classes - 1}, got {args.target_class}")
    settings = ExplainSettings(methods=methods, threshold=args.threshold,
                               display_threshold=args.display_threshold, target_class=args.target_class,
                               previews=not args.no_previews, background=background, map_scale=args.map_scale)
    calibration = validation_items(args.data) if args.map_scale != "per-case" else None
    summary = run_explain(model, meta, items, args.out, settings, overwrite=args.overwrite,
                          progress=not args.no_progress, checkpoint_name=args.checkpoint.name,
                          calibration_items=calibration, decision_threshold=args.decision_threshold)
    n = len(summary["cases"])
    print(f"explained {n} case(s) with {', '.join(methods)} -> {args.out}")
    print(f"  overlays:    {summary['files']['heatmap']} (background {summary['background']['name']}, "
          f"map scale {summary['map_scale']})")
    print(f"  predictions: {args.out / 'predictions.csv'}")
    if settings.previews:
        print(f"  previews:    {args.out / 'index.html'}")
    print(f"  3D Slicer:   Slicer --python-script {args.out / 'load_in_slicer.py'}")
    return 0
