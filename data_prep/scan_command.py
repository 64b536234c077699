"""`medimb-prep scan ARCHIVE [--json F]`: header-only scan; a table of studies/series and a manifest."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from data_prep import deid


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("scan", help="header-only scan of a DICOM archive (nothing is written but --json)",
                              description=__doc__)
    p.add_argument("archive", help="folder holding the DICOM archive (read only)")
    p.add_argument("--json", dest="json_path", default=None, help="write the machine-readable scan manifest here")
    p.add_argument("--workers", "-j", type=int, default=min(2, os.cpu_count() or 1), help="header reader processes")
    deid.add_key_arguments(p)
    p.add_argument("--no-descriptors", action="store_true",
                   help="show no SeriesDescription / ProtocolName text (as convert --no-descriptors)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def series_rows(result) -> list[dict]:
    """One de-identified dict per planned series (what the table and --json show)."""
    rows = []
    for p in result.plans:
        aff = np.asarray(p.affine)
        spacing = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
        rows.append({
            "subject": p.subject, "session": p.session, "series": p.label, "series_number": p.series_number,
            "modality": p.modality, "kind": p.kind, "description": p.description, "slices": len(p.phases[0].frames),
            "size": list(p.shape[:2]), "spacing": [round(float(s), 4) for s in spacing],
            "phases": len(p.phases), "phase_times_s": [ph.time_s for ph in p.phases] if p.dce else [],
            "files": p.n_files,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    head = ["subject", "session", "series", "mod", "kind", "description", "slices", "size", "spacing (mm)", "phases"]
    lines = [[r["subject"], r["session"], r["series"], r["modality"], r["kind"], r["description"] or "-", str(r["slices"]),
              "x".join(map(str, r["size"])), "x".join(f"{s:.3g}" for s in r["spacing"]), str(r["phases"])]
             for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*line) for line in lines])


def run(args) -> int:
    from data_prep.cli import UserError
    from data_prep.io import write_json_atomic
    from data_prep.report import summarize
    from data_prep.scan import scan_archive

    if not Path(args.archive).is_dir():
        raise UserError(f"archive folder not found: {args.archive}")
    key = deid.key_from_arguments(args)
    result = scan_archive(args.archive, workers=max(1, args.workers), key=key, progress=not args.no_progress,
                          descriptors=not args.no_descriptors)
    deid.set_log_scrubber(result.scrubber, str(Path(args.archive).resolve()))
    if deid.is_public_key(key) and not result.synthetic:
        logging.getLogger("data_prep.scan").warning(deid.PUBLIC_KEY_WARNING)
    rows = series_rows(result)
    print(format_table(rows) if rows else "no convertible series found")
    summary = summarize(result.issues)
    print(f"{result.n_files} files, {len(rows)} series to convert; "
          f"skipped/failed: {summary['by_reason'] or 'none'}")
    if args.json_path:
        write_json_atomic(args.json_path, {"archive_files": result.n_files, "series": rows,
                                           "summary": summary, "issues": [i.to_dict() for i in result.issues]})
    return 0 if rows else 1
