"""``medimb predict --checkpoint CKPT --input PATH --out DIR``: from a new patient's study to a prediction and
overlays in one command.

``PATH``: a DICOM study or archive folder (converted into ``DIR/converted`` with ``medimb-prep convert``'s code
and de-identification), a converted folder or ``sub-*/ses-*`` folder, a 4D DCE NIfTI (split into its phases in
``DIR/converted``), or a datalist (labelled or not: ``medimb-prep datalist`` without ``--labels``). The channels
the checkpoint was trained on (which DCE phases, subtractions or image) are assembled from it
(:mod:`medimb.data.channels`); the prediction uses the checkpoint's operating point. Writes what ``medimb explain``
writes (the same pipeline): ``predictions.csv``, overlays, previews with ``index.html``, one 3D Slicer scene per
case and ``load_in_slicer.py``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from medimb.commands.explain import add_input_options, check_thresholds, explain_inputs
from medimb.commands.options import add_runtime_options
from medimb.errors import UserError
from medimb.explain.settings import EXPLAINER_NAMES, ExplainSettings, parse_explainers

#: predict's default maps: the class-free COAM and the gradient-based Grad-CAM
DEFAULT_METHODS = ("coam", "gradcam")
_DEFAULTS = ExplainSettings()


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict",
        help="predict new studies (DICOM, converted, 4D NIfTI or a datalist) and write overlays for 3D Slicer",
        description="Predict each case of a new study at the checkpoint's operating point and write "
        "predictions.csv, attention overlays, previews (index.html), a 3D Slicer scene per case and "
        "load_in_slicer.py into --out. DICOM is converted and de-identified into OUT/converted first.",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint (.pt) from medimb train")
    parser.add_argument("--input", required=True, type=Path,
                        help="a DICOM study or archive folder, a converted folder or sub-*/ses-* folder "
                        "(medimb-prep convert), a 4D DCE NIfTI (--dce-4d), a 3D NIfTI (one-channel models) or a "
                        "datalist JSON, labelled or not")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; must be empty)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"attention maps, comma-separated, from {', '.join(EXPLAINER_NAMES)} "
                        "(default: %(default)s)")
    parser.add_argument("--threshold", "--decision-threshold", dest="threshold", type=float, default=None,
                        metavar="T", help="binary models: predict class 1 when its probability > T (default: the "
                        "checkpoint's operating point, chosen on validation by medimb train; 0.5 without one)")
    parser.add_argument("--region-threshold", type=float, default=_DEFAULTS.threshold,
                        help="attention region (label map): map >= this (maps in [0, 1]; default %(default)s)")
    parser.add_argument("--no-previews", action="store_true", help="skip PNG previews and index.html")
    parser.add_argument("--no-scenes", action="store_true",
                        help="skip the 3D Slicer scene per case (<case>.mrb, a copy of its background and maps) and "
                        "load_in_slicer.py; the NIfTI overlays stay")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out folder (a DICOM conversion left there resumes)")
    add_input_options(parser)
    add_runtime_options(parser, workers=False)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        methods = parse_explainers(args.methods)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    check_thresholds(args, ("threshold", "region_threshold"))
    settings = ExplainSettings(methods=methods, threshold=args.region_threshold, previews=not args.no_previews,
                               scenes=not args.no_scenes)
    summary = explain_inputs(args, args.input, settings, None, args.threshold)
    out = Path(args.out)
    rows = list(csv.DictReader((out / "predictions.csv").open(newline="")))
    point = summary.get("operating_point") or {}
    shown = f"threshold {point['threshold']:.3f} ({point.get('source', 'checkpoint')})" if point else "argmax"
    print(f"predicted {len(rows)} case(s) at {shown} -> {out}")
    probability = [c for c in (rows[0] if rows else {}) if c.startswith("prob_")]
    width = max([len(r["case"]) for r in rows] + [4])
    for r in rows:
        probs = "  ".join(f"{c[5:]} {float(r[c]):.3f}" for c in probability)
        print(f"  {r['case']:<{width}}  {r['predicted_name']:<10}  {probs}")
    if summary["channels"]["note"]:
        print(f"  note: {summary['channels']['note']}")
    print(f"  predictions: {out / 'predictions.csv'}")
    if (out / "converted" / "manifest.csv").is_file():
        print(f"  inputs:      {out / 'converted'} (the DICOM input converted, de-identified)")
    elif (out / "converted").is_dir():
        print(f"  inputs:      {out / 'converted'} (the phases split out of the 4D input)")
    if settings.previews:
        print(f"  previews:    {out / 'index.html'}")
    if settings.scenes:
        print(f"  3D Slicer:   Slicer --python-script {out / 'load_in_slicer.py'}")
    return 0
