"""`medimb-prep synth OUT`: write a synthetic breast DCE-MRI DICOM archive with labels and masks."""

from __future__ import annotations

import argparse
import os
import sys

from data_prep import deid
from data_prep.cli import UserError
from data_prep.synth.archive import synthesize_archive
from data_prep.synth.phantom import DIFFICULTIES, LESION_FAMILIES, PhantomConfig

_DEFAULTS = PhantomConfig()


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic breast DCE-MRI DICOM archive (demo input, test fixture)",
        description="Write OUT/archive (DICOM), OUT/labels.csv, OUT/truth/<case>_lesion.nii.gz and "
        "OUT/truth/cases.csv. Deterministic for a given --seed. See docs/synthetic_archive.md.",
    )
    parser.add_argument("out", help="output folder (must be empty or absent)")
    parser.add_argument("--cases", type=int, default=40, help="number of patients (default 40)")
    parser.add_argument("--positive-fraction", type=float, default=0.2,
                        help="share of malignant cases, label 1 (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--matrix", type=int, default=_DEFAULTS.matrix,
                        help=f"in-plane rows = columns (default {_DEFAULTS.matrix})")
    parser.add_argument("--slices", type=int, default=_DEFAULTS.slices,
                        help=f"nominal slices per volume; each case varies by +-{_DEFAULTS.slice_jitter} "
                        f"(default {_DEFAULTS.slices})")
    parser.add_argument("--post-phases", type=int, default=_DEFAULTS.post_phases,
                        help=f"post-contrast phases after the pre-contrast one (default {_DEFAULTS.post_phases})")
    parser.add_argument("--difficulty", choices=list(DIFFICULTIES), default=_DEFAULTS.difficulty,
                        help="how hard the classification task is: 'standard' is learnable from a few dozen "
                        "cases (the demo); 'hard' has cancer-like distractors and class-overlapping lesion "
                        f"enhancement (the benchmarks) (default {_DEFAULTS.difficulty})")
    parser.add_argument("--lesions", choices=list(LESION_FAMILIES), default=_DEFAULTS.lesions,
                        help="layout of the malignant lesion: 'single' mass, or 'multifocal': 2-3 smaller "
                        "foci of one cancer in one region, about the same total volume, all in the truth mask "
                        "(a second localisation task) (default %(default)s)")
    deid.add_key_arguments(parser)  # the key of the case pseudonyms in labels.csv: use the converter's
    parser.add_argument("--workers", "-j", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes synthesising cases in parallel; output does not depend on it "
                        "(default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT when it holds an earlier synthetic archive")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    jitter = min(_DEFAULTS.slice_jitter, max(0, args.slices - 8))
    try:
        config = PhantomConfig(matrix=args.matrix, slices=args.slices, slice_jitter=jitter,
                               post_phases=args.post_phases, difficulty=args.difficulty,
                               lesions=args.lesions)
        summary = synthesize_archive(
            args.out, cases=args.cases, positive_fraction=args.positive_fraction, seed=args.seed,
            config=config, deid_key=deid.key_from_arguments(args), force=args.force, progress=sys.stderr.isatty(),
            workers=args.workers,
        )
    except (ValueError, FileExistsError) as exc:
        raise UserError(str(exc)) from None
    print(
        f"wrote {summary.cases} cases ({summary.positives} malignant), {summary.series} series, "
        f"{summary.dicom_files} DICOM files to {summary.out_dir} in {summary.seconds:.1f} s"
    )
    return 0
