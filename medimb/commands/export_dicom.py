"""``medimb export-dicom --overlays DIR --archive ARCHIVE --link-table PATH --out DIR [--push SERVER]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from medimb.errors import UserError


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export-dicom",
        help="explain's maps as DICOM Parametric Maps, Segmentations and a report next to the source series (PHI)",
        description="Write each case's attention map as a DICOM Parametric Map and its region as a DICOM "
        "Segmentation that reference the case's source series (same patient, study and frame of reference; one "
        "frame per source slice), and its prediction as a Structured Report (TID 1500; also in the series "
        "descriptions): OUT/<case>/<case>_<method>_map.dcm, ..._region.dcm and <case>_report.dcm. The files carry "
        "the patient's identity (PHI) and are written with mode 0600; a re-run skips unchanged results; --push "
        "sends them to the hospital's server. See docs/pacs.md.",
    )
    parser.add_argument("--overlays", required=True, type=Path, help="output folder of medimb explain")
    parser.add_argument("--out", required=True, type=Path,
                        help="folder for the DICOM results (created; a re-run skips unchanged results)")
    source = parser.add_argument_group("source series (one of)")
    source.add_argument("--link-table", type=Path, metavar="PATH",
                        help="link table of medimb-prep convert --link-table: each converted scan's original "
                        "instances (with --archive)")
    source.add_argument("--archive", type=Path, help="the DICOM archive the scans were converted from "
                        "(e.g. filled by medimb-prep pull)")
    source.add_argument("--source-series", type=Path, metavar="DIR",
                        help="instead: a folder holding one case's source volume (one series or phase)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods to export (default: every method in --overlays)")
    parser.add_argument("--case", default=None, help="export only this case")
    parser.add_argument("--push", metavar="SERVER", default=None,
                        help="then send the files by STOW-RS (dicomweb+http://HOST:PORT/PATH) or C-STORE "
                        "(dimse://AET@HOST:PORT)")
    parser.add_argument("--credentials-file", type=Path, default=None,
                        help="server credentials (else $MEDIMB_PACS_USER/$MEDIMB_PACS_PASSWORD, "
                        "$MEDIMB_PACS_TOKEN or $MEDIMB_PACS_CREDENTIALS_FILE)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def _locator(args: argparse.Namespace):
    from medimb.export.results import folder_locator

    if args.source_series is not None:
        if args.link_table is not None or args.archive is not None:
            raise UserError("give either --source-series or --link-table with --archive, not both")
        return folder_locator(args.source_series)
    if args.link_table is None or args.archive is None:
        raise UserError("give --link-table and --archive (or --source-series DIR for one case)")
    from medimb.export.sources import link_table_locator

    return link_table_locator(args.link_table, args.archive)


def run(args: argparse.Namespace) -> int:
    from medimb.export.overlays import read_overlay_folder
    from medimb.export.results import export_results

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    overlays = read_overlay_folder(args.overlays, methods)
    if args.case is not None:
        overlays.cases = [c for c in overlays.cases if c.case == args.case]
        if not overlays.cases:
            raise UserError(f"--case {args.case} is not in {args.overlays / 'predictions.csv'}")
    if args.source_series is not None and len(overlays.cases) > 1:
        raise UserError(f"--source-series is one case's series but --overlays has {len(overlays.cases)} cases: "
                        "choose one with --case, or use --link-table with --archive")
    locate = _locator(args)
    written = export_results(overlays, locate, args.out, progress=not args.no_progress)
    new = sum(not w.skipped for w in written)
    print(f"exported {len(overlays.cases)} case(s) x {', '.join(overlays.methods)}: {new} DICOM file(s) written, "
          f"{len(written) - new} unchanged -> {args.out} (patient-identifying: keep with the hospital's images)")
    if args.push:
        from data_prep.cli import UserError as PrepUserError
        from data_prep.pacs.push import push_files

        try:
            summary = push_files(args.push, [args.out / w.path for w in written],
                                 credentials_file=args.credentials_file, progress=not args.no_progress)
        except PrepUserError as exc:  # data_prep's own one-line error type
            raise UserError(str(exc)) from None
        print(f"pushed {summary.stored} instance(s) to {summary.server}")
    return 0
