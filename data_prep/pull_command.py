"""`medimb-prep pull SERVER OUT_ARCHIVE`: retrieve studies from a PACS into a local archive folder.

SERVER is ``dicomweb+http(s)://HOST:PORT/PATH`` or ``dimse://CALLED_AET@HOST:PORT[?calling=AET&retrieve=get|move
&move_dest=AET&store_port=N]`` (docs/pacs.md). Credentials come from $MEDIMB_PACS_USER/$MEDIMB_PACS_PASSWORD,
$MEDIMB_PACS_TOKEN, --credentials-file or $MEDIMB_PACS_CREDENTIALS_FILE, never from the command line.
Re-running the same command resumes; then run `medimb-prep convert OUT_ARCHIVE OUT`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE = re.compile(r"^(?:[0-9]{8}|[0-9]{8}-|-[0-9]{8}|[0-9]{8}-[0-9]{8})$")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pull", help="retrieve studies from a PACS (DICOMweb or DIMSE) into an archive folder",
                              description=__doc__)
    p.add_argument("server", help="dicomweb+http://HOST:PORT/PATH or dimse://CALLED_AET@HOST:PORT[?...]")
    p.add_argument("archive", help="archive folder to fill (created 0700; re-running resumes)")
    sel = p.add_argument_group("which studies (by UID, or by a query)")
    sel.add_argument("--study", action="extend", nargs="+", default=[], metavar="UID",
                     help="StudyInstanceUID(s) to retrieve")
    sel.add_argument("--studies-file", metavar="FILE",
                     help="a file with one StudyInstanceUID per line (blank lines and # comments ignored)")
    sel.add_argument("--modality", metavar="MOD", help="query: a modality in the study, e.g. MR")
    sel.add_argument("--date", metavar="FROM-TO", help="query: study date or range, YYYYMMDD[-YYYYMMDD], open "
                                                       "ends allowed (20240101-)")
    sel.add_argument("--description", metavar="PATTERN",
                     help="query: study description, wildcards * and ?, case-insensitive, matched on the whole "
                          "description ('*breast*'); needs --modality or --date")
    p.add_argument("--credentials-file", metavar="FILE",
                   help="JSON {\"user\", \"password\"} or {\"token\"}, or 'user:password' (keep it chmod 600)")
    p.add_argument("--dry-run", action="store_true",
                   help="query only: list the studies that would be retrieved (folder name, modalities, instances)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def read_studies_file(path: str) -> list[str]:
    from data_prep.cli import UserError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the studies file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    uids = [line.split("#", 1)[0].strip() for line in lines]
    return [u for u in uids if u]


def _selection(args) -> tuple[list[str] | None, dict]:
    from data_prep.cli import UserError
    from data_prep.pacs.pull import query_filters

    uids = list(args.study)
    if args.studies_file:
        uids += read_studies_file(args.studies_file)
    filters = query_filters(args.modality, args.date, args.description)
    if (args.study or args.studies_file) and filters:
        raise UserError("give studies by UID (--study/--studies-file) or by a query (--modality/--date/"
                        "--description), not both")
    if args.studies_file and not uids:
        raise UserError(f"the studies file {args.studies_file} lists no StudyInstanceUID")
    if not uids and not filters:
        raise UserError("say which studies: --study UID, --studies-file FILE, or a query (--modality, --date, "
                        "--description)")
    for n, uid in enumerate(uids, 1):
        if not (_UID.match(uid) and len(uid) <= 64):
            raise UserError(f"study {n} of {len(uids)} is not a DICOM UID (digits and dots, at most 64 characters)")
    if args.description and not (args.modality or args.date):
        raise UserError("--description needs --modality or --date: the description is matched here, on the studies "
                        "the server lists, and a query without them would list every study on the PACS")
    if args.date and not _DATE.match(args.date):
        raise UserError(f"--date {args.date!r}: expected YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD")
    if args.modality and not re.fullmatch(r"[A-Za-z]{2,4}", args.modality):
        raise UserError(f"--modality {args.modality!r}: expected a DICOM modality code such as MR or CT")
    return (uids or None), filters


def run(args) -> int:
    from data_prep.pacs.pull import find_studies, pull
    from data_prep.pacs.server import load_credentials, open_server, parse_server, study_label
    from data_prep.scan import PULL_STATE_DIR

    uids, filters = _selection(args)
    spec = parse_server(args.server, credentials=load_credentials(args.credentials_file))
    if args.dry_run:
        with open_server(spec) as server:
            found = ([{"StudyInstanceUID": u} for u in uids] if uids is not None else find_studies(server, filters))
            for s in found:
                uid = s.get("StudyInstanceUID", "")
                if uids is not None:
                    s["NumberOfStudyRelatedInstances"] = str(len(server.find_instances(uid)))
                print(f"{study_label(uid)}  {s.get('ModalitiesInStudy', '-') or '-':<8} "
                      f"{s.get('NumberOfStudyRelatedInstances', '?'):>6} instances")
        print(f"{len(found)} studies on {spec.display()}")
        return 0 if found else 1
    result = pull(spec, args.archive, study_uids=uids, filters=filters, progress=not args.no_progress)
    counts = result.counts()
    mb = result.bytes / 1e6
    rate = f", {mb / result.seconds:.1f} MB/s" if result.seconds > 0 and mb else ""
    report = Path(args.archive) / PULL_STATE_DIR / "report.json"
    print(f"{len(result.studies)} studies: {counts.get('complete', 0)} complete, {counts.get('already_complete', 0)} "
          f"already complete, {len(result.studies) - counts.get('complete', 0) - counts.get('already_complete', 0)} "
          f"not complete; {result.received} instances ({mb:.1f} MB) in {result.seconds:.1f} s{rate} -> {report}")
    for s in result.studies:
        if s.status not in ("complete", "already_complete"):
            print(f"medimb-prep pull: study {s.study}: {s.status}" + (f": {s.detail}" if s.detail else ""),
                  file=sys.stderr)
    if not result.studies:
        print("no study matched the query")
        return 1
    if result.ok:
        print(f"next: medimb-prep convert {args.archive} OUT")
    return 0 if result.ok else 1
