"""`medimb-prep convert ARCHIVE OUT`: DICOM archive -> NIfTI + sidecars + manifest.csv + report.json."""

from __future__ import annotations

import os
from pathlib import Path

from data_prep import deid


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a DICOM archive to de-identified NIfTI + sidecars",
                              description=__doc__)
    p.add_argument("archive", help="folder holding the DICOM archive (read only)")
    p.add_argument("out", help="output folder (created; re-running resumes)")
    p.add_argument("--workers", "-j", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes, one series per task (default: %(default)s)")
    p.add_argument("--strict", action="store_true",
                   help="exit non-zero when any file or series was skipped with a warning or failed")
    p.add_argument("--dce-4d", action="store_true", help="also write a 4D file per DCE series")
    p.add_argument("--subtract", action="store_true", help="also write post-minus-pre subtraction volumes")
    deid.add_key_arguments(p)
    p.add_argument("--link-table", metavar="PATH", default=None,
                   help="also write the private link table (output volume/slice <-> original Study, Series and "
                        "SOP Instance UIDs: PHI) to PATH, outside OUT, mode 0600; merged when resuming "
                        "(docs/pacs.md)")
    p.add_argument("--no-descriptors", action="store_true",
                   help="write no SeriesDescription / ProtocolName text anywhere (series labels become "
                   "s<number>-series): for archives whose descriptions may name people that no header name "
                   "field names, which the scrubber cannot recognise")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from data_prep.cli import UserError
    from data_prep.convert import ConvertOptions, OutputLocked, convert_archive

    archive = Path(args.archive)
    if not archive.is_dir():
        raise UserError(f"archive folder not found: {args.archive}")
    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    options = ConvertOptions(dce_4d=args.dce_4d, subtract=args.subtract, descriptors=not args.no_descriptors)
    key = deid.key_from_arguments(args)
    try:
        result = convert_archive(str(archive), args.out, workers=args.workers, key=key,
                                 options=options, progress=not args.no_progress, link_table=args.link_table)
    except (ValueError, OutputLocked) as exc:
        raise UserError(str(exc)) from exc
    except OSError as exc:  # OUT itself cannot be written (read-only, no space, permissions)
        raise UserError(f"cannot write into {args.out}: {exc.strerror or exc}") from exc
    sev = {"info": 0, "warning": 0, "error": 0}
    for i in result.issues:
        sev[i.severity] += 1
    print(f"{result.n_files} files: {result.converted} series converted, {result.resumed} already done, "
          f"{result.failed} failed; {len(result.rows)} volumes; report: {sev['error']} errors, "
          f"{sev['warning']} warnings, {sev['info']} info -> {Path(args.out) / 'report.json'}")
    if args.link_table:
        print(f"link table (PHI: original UIDs; keep it private) -> {args.link_table}")
    if not result.exit_ok:
        print("nothing was converted")
        return 1
    if args.strict and (sev["error"] or sev["warning"]):
        return 1
    return 0
