"""`medimb-prep datalist OUT [--labels labels.csv --key COLUMN]`: a MONAI datalist from converted volumes
(without --labels: an unlabelled datalist of studies to predict)."""

from __future__ import annotations

import argparse
from pathlib import Path

from data_prep import deid


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "datalist",
        help="write a MONAI datalist (training/validation/test) from converted volumes and labels",
        description="Read OUT/manifest.csv (from `medimb-prep convert`) and a labels CSV; write a MONAI "
        "datalist split by subject, stratified by class. Without --labels: an unlabelled datalist (every "
        "session in the split 'test', no 'label') for medimb predict / explain. See docs/datalist.md.",
    )
    p.add_argument("out", help="the converted folder (holds manifest.csv)")
    p.add_argument("--labels", default=None,
                   help="CSV with a key column and a label column (omit it for an unlabelled datalist of new "
                   "studies to predict: every session in the split 'test', items without 'label')")
    p.add_argument("--key", default=None,
                   help="labels column matched to the converted subjects (sub-...; or sub-.../ses-... per session); "
                   "required with --labels")
    p.add_argument("--label-column", default="label", help="labels column with integer classes (default: label)")
    p.add_argument("--class-names", default=None, metavar="NAME,NAME,...",
                   help="names of classes 0, 1, ... (e.g. benign,malignant); written as class_names, used by "
                   "medimb in checkpoints, predictions.csv and the explain previews")
    p.add_argument("-o", "--output", default=None, help="datalist JSON to write (default: OUT/datalist.json)")
    p.add_argument("--val", type=float, default=None,
                   help="fraction of subjects for validation (default 0.2; 0 with --folds)")
    p.add_argument("--test", type=float, default=0.2, help="fraction of subjects for test (default 0.2)")
    p.add_argument("--folds", type=int, default=0,
                   help="K cross-validation folds over the non-test subjects: a 'fold' per training item")
    p.add_argument("--seed", type=int, default=0, help="random seed of the split (default 0)")
    p.add_argument("--channels", default="auto",
                   help="volumes forming the image: auto (DCE phases if present, else the one image series), "
                   "dce, subtraction, image, 4d, dwi, timeseries, or DCE phase indices like 0,1,-1 (default auto; "
                   "in a mixed archive, auto takes the DCE series and ignores DWI, field maps and time series)")
    p.add_argument("--series", default=None, metavar="PATTERN",
                   help="only series whose label or description matches this glob/substring")
    p.add_argument("--masks", default=None, metavar="DIR",
                   help="add 'mask': DIR/<subject>_lesion.nii.gz to each item (e.g. a synthetic archive's truth/)")
    p.add_argument("--ignore-unlabeled", action="store_true", help="leave out converted sessions without a label")
    p.add_argument("--ignore-missing-images", action="store_true",
                   help="accept labels that match no converted series")
    p.add_argument("--hash-keys", action="store_true",
                   help="the key column holds PatientIDs: pseudonymise them like the converter (see --deid-key)")
    deid.add_key_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_prep.cli import UserError
    from data_prep.datalist import DatalistError, SplitSpec, build_datalist, class_count_summary

    output = Path(args.output) if args.output else Path(args.out) / "datalist.json"
    if args.labels is None:
        given = [flag for flag, on in (("--key", args.key), ("--val", args.val is not None), ("--folds", args.folds),
                                       ("--hash-keys", args.hash_keys), ("--ignore-unlabeled", args.ignore_unlabeled),
                                       ("--ignore-missing-images", args.ignore_missing_images)) if on]
        if given:
            raise UserError(f"{', '.join(given)} only work with --labels (without it the datalist is unlabelled: "
                            "every session goes to the split 'test')")
    try:
        spec = SplitSpec(val=(0.0 if args.folds else 0.2) if args.val is None else args.val,
                         test=args.test, folds=args.folds, seed=args.seed)
        datalist = build_datalist(
            args.out, args.labels, args.key, output, spec=spec, label_column=args.label_column,
            channels=args.channels, series=args.series, ignore_unlabeled=args.ignore_unlabeled,
            ignore_missing=args.ignore_missing_images, hash_keys=args.hash_keys, deid_key=deid.key_from_arguments(args),
            masks=args.masks,
            class_names=args.class_names.split(",") if args.class_names else None,
        )
    except DatalistError as exc:
        raise UserError(str(exc)) from None
    print(class_count_summary(datalist))
    print(f"channels: {', '.join(datalist['channels'])}")
    print(f"wrote {output}")
    return 0
