"""Fill a local archive folder from a DICOM server: resumable, one study at a time.

Layout (no UID, name or date in any file or folder name)::

    OUT/<study>/<series>/<instance>.dcm      16 hex digits of SHA-256 of the Study/Series/SOP Instance UID
    OUT/.medimb-pull/studies/<study>.json    the study's completion marker (written last; holds its UIDs)
    OUT/.medimb-pull/report.json             the last run: per-study status, counts, throughput

``medimb-prep convert`` reads OUT like any archive (it skips ``.medimb-pull``). Every instance file is
written atomically (a temporary name, then a rename), so a file under its final name is complete. A
study's marker is written only after the server's whole instance list is on disk; a re-run skips marked
studies, and for the others retrieves only what is missing (the whole study when nothing of it is there,
else a whole series when none of it arrived, else the missing instances). A killed run (Ctrl-C, SIGTERM,
SIGKILL) therefore never leaves a partial study marked complete, and the next run completes it. The
archive folder is created ``0700``: it holds the PACS' images with all their identifying headers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from data_prep.io import atomic_path, exclusive_lock, remove_partial_files, write_json_atomic
from data_prep.pacs.server import (ENCODED_ATTR, InstanceRef, PacsError, ServerSpec, open_server, study_label,
                                   uid_hash)
from data_prep.scan import PULL_STATE_DIR

log = logging.getLogger("data_prep.pacs.pull")

#: test hook: the process dies (os._exit(137), as SIGKILL would) after writing this many instances
FAULT_ENV = "MEDIMB_PREP_PULL_FAULT_AFTER"
#: report status -> meaning (docs/pacs.md lists them)
STATUSES = {
    "complete": "every instance the server lists is in the archive (this run retrieved some or all)",
    "already_complete": "marked complete by an earlier run; nothing retrieved",
    "unknown_study": "the server has no such study",
    "incomplete": "some instances did not arrive; not marked complete (re-run to complete)",
    "failed": "the server refused or failed the retrieve; not marked complete",
    "interrupted": "the run stopped during this study; not marked complete (re-run to complete)",
    "not_started": "the run stopped before this study",
}


@dataclass
class StudyOutcome:
    """One study's line in the report; ``study`` is its folder name (:func:`study_label`)."""

    study: str
    status: str = "not_started"
    instances: int = 0        # on the server
    present: int = 0          # already in the archive before this run
    received: int = 0         # retrieved by this run
    bytes: int = 0            # written by this run
    detail: str = ""

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v != ""}


@dataclass
class PullResult:
    studies: list[StudyOutcome]
    seconds: float
    complete: bool = True     # False when the run was interrupted
    server: str = ""

    @property
    def ok(self) -> bool:
        return self.complete and all(s.status in ("complete", "already_complete") for s in self.studies)

    def counts(self) -> dict:
        out: dict[str, int] = {}
        for s in self.studies:
            out[s.status] = out.get(s.status, 0) + 1
        return out

    @property
    def received(self) -> int:
        return sum(s.received for s in self.studies)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.studies)


def instance_path(out: str | os.PathLike, ref: InstanceRef) -> Path:
    """Where an instance goes: ``OUT/<study>/<series>/<instance>.dcm`` (hashes of the UIDs)."""
    return Path(out) / uid_hash(ref.study_uid) / uid_hash(ref.series_uid) / f"{uid_hash(ref.sop_uid)}.dcm"


def marker_path(out: str | os.PathLike, study_uid: str) -> Path:
    return Path(out) / PULL_STATE_DIR / "studies" / f"{study_label(study_uid)}.json"


def completed_count(out: str | os.PathLike, study_uid: str) -> int | None:
    """How many instances an earlier run pulled of a study it marked complete, if every file it listed is
    still there; else None."""
    try:
        state = json.loads(marker_path(out, study_uid).read_text())
    except (OSError, ValueError):
        return None
    if state.get("study_uid") != study_uid or not state.get("complete"):
        return None
    files = state.get("files", [])
    return len(files) if all((Path(out) / rel).is_file() for rel in files) else None


@contextlib.contextmanager
def archive_lock(out: Path):
    """One pull per archive folder at a time (:func:`data_prep.io.exclusive_lock`, released if the holder dies)."""
    with exclusive_lock(out / PULL_STATE_DIR, mode=0o600) as held:
        if held is None:
            raise PacsError(f"another medimb-prep pull is writing into {out}; wait for it to finish", "usage")
        yield


class _Writer:
    """Writes each arriving dataset of one study atomically to its path; counts files and bytes."""

    _total_written = 0  # across studies, for the fault hook

    def __init__(self, out: Path, study_uid: str, bar: tqdm | None):
        self.out = out
        self.study_uid = study_uid
        self.bar = bar
        self.received = 0
        self.bytes = 0
        self.foreign = 0
        self.fault_at = int(os.environ.get(FAULT_ENV) or 0)

    def __call__(self, ds) -> None:
        study = str(getattr(ds, "StudyInstanceUID", ""))
        if study != self.study_uid:  # a server answering with another study's images: keep them out
            self.foreign += 1
            return
        ref = InstanceRef(study, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        path = instance_path(self.out, ref)
        raw = getattr(ds, ENCODED_ATTR, None)
        with atomic_path(path, keep_suffix=False) as tmp:
            if raw is not None:  # DIMSE: the instance byte for byte as the server sent it
                tmp.write_bytes(raw)
            else:  # DICOMweb: dicomweb-client decoded it; pydicom writes it back in its transfer syntax
                ds.save_as(tmp, enforce_file_format=True)
            size = tmp.stat().st_size
        self.received += 1
        self.bytes += size
        if self.bar is not None:
            self.bar.update(1)
        _Writer._total_written += 1
        if self.fault_at and _Writer._total_written >= self.fault_at:  # as if killed while writing the next one
            (path.parent / f".{path.name}.next.part").write_bytes(b"DICM partial")
            os._exit(137)


def _plan(refs: list[InstanceRef], out: Path) -> tuple[list[InstanceRef], dict[str, list[InstanceRef]]]:
    """(instances already present, missing instances per series)."""
    present, missing = [], {}
    for r in refs:
        if instance_path(out, r).is_file():
            present.append(r)
        else:
            missing.setdefault(r.series_uid, []).append(r)
    return present, missing


def _pull_study(server, out: Path, study_uid: str, refs: list[InstanceRef], outcome: StudyOutcome,
                bar: tqdm | None) -> None:
    present, missing = _plan(refs, out)
    outcome.present = len(present)
    writer = _Writer(out, study_uid, bar)
    all_series = {r.series_uid for r in refs}
    try:
        if not present:  # nothing here yet: the whole study in one request (one association for DIMSE)
            server.retrieve(study_uid, on_instance=writer)
        else:  # a resumed study: whole series where none arrived, else only the missing instances
            for series_uid, wanted in missing.items():
                whole = len(wanted) == sum(r.series_uid == series_uid for r in refs)
                server.retrieve(study_uid, series_uid, None if whole else [r.sop_uid for r in wanted],
                                on_instance=writer)
    finally:
        outcome.received, outcome.bytes = writer.received, writer.bytes
    if writer.foreign:
        log.warning("study %s: the server sent %d instance(s) of another study; not kept", outcome.study,
                    writer.foreign)
    still = [r for r in refs if not instance_path(out, r).is_file()]
    if still:
        outcome.status = "incomplete"
        outcome.detail = f"{len(still)} of {len(refs)} instances did not arrive"
        return
    files = sorted(instance_path(out, r).relative_to(out).as_posix() for r in refs)
    write_json_atomic(marker_path(out, study_uid), {
        "study_uid": study_uid, "complete": True, "instances": len(refs),
        "series": {uid_hash(s): s for s in sorted(all_series)}, "files": files,
    })
    outcome.status = "complete"


def query_filters(modality: str | None = None, date: str | None = None, description: str | None = None) -> dict:
    """Study-level query keys from the command line's ``--modality``, ``--date``, ``--description``."""
    filters = {}
    if modality:
        filters["ModalitiesInStudy"] = modality.upper()
    if date:
        filters["StudyDate"] = date
    if description:
        filters["StudyDescription"] = description
    return filters


def _wildcard(pattern: str) -> re.Pattern:
    """A DICOM wildcard (``*`` any run, ``?`` one character) as a case-insensitive whole-string regex."""
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL)


def find_studies(server, filters: dict) -> list[dict]:
    """The studies a query selects (one dict per study, :data:`data_prep.pacs.server.STUDY_FIELDS`).

    Modality and date go to the server. The description is matched here, case-insensitively, on what
    the server returns: servers differ in case handling (Orthanc and most PACS compare case-sensitively)
    and in how they decode spaces in a QIDO-RS URL, so "breast*" would miss "BREAST MRI" on some."""
    filters = dict(filters)
    description = filters.pop("StudyDescription", None)
    found = server.find_studies(filters)
    if description:
        match = _wildcard(description)
        found = [s for s in found if match.fullmatch(s.get("StudyDescription", "") or "")]
    return found


def pull(spec: ServerSpec, out: str | os.PathLike, study_uids: Iterable[str] | None = None,
         filters: dict | None = None, progress: bool = True) -> PullResult:
    """Retrieve the given studies (or those ``filters`` find) into ``out``; writes the report.

    Server-wide problems (unreachable, refused, authentication) raise :class:`PacsError`; a study the
    server does not have, or that does not arrive whole, is a report entry and the rest go on.
    """
    out = Path(out).absolute()
    if not out.exists():
        out.mkdir(parents=True, mode=0o700)
    elif not out.is_dir():
        raise PacsError(f"{out} exists and is not a folder", "usage")
    started = time.monotonic()
    outcomes: list[StudyOutcome] = []
    result = PullResult(outcomes, 0.0, complete=False, server=spec.display())
    with archive_lock(out):
        removed = remove_partial_files(out)
        if removed:
            log.info("removed %d partial file(s) left by an interrupted run", removed)
        try:
            with open_server(spec) as server:
                if study_uids is None:
                    found = find_studies(server, filters or {})
                    study_uids = [s["StudyInstanceUID"] for s in found if s.get("StudyInstanceUID")]
                study_uids = list(dict.fromkeys(study_uids))  # once each, in the order given
                outcomes.extend(StudyOutcome(study_label(uid)) for uid in study_uids)
                _pull_all(server, out, study_uids, outcomes, progress)
            result.complete = True
        finally:
            result.seconds = time.monotonic() - started
            write_report(out, result)
    return result


def _pull_all(server, out: Path, study_uids: list[str], outcomes: list[StudyOutcome], progress: bool) -> None:
    # list every study first (one find each), so the progress bar knows how many instances are missing
    listed: list[tuple[str, StudyOutcome, list[InstanceRef]]] = []
    for uid, outcome in zip(study_uids, outcomes):
        done = completed_count(out, uid)
        if done is not None:
            outcome.status, outcome.instances, outcome.present = "already_complete", done, done
            continue
        try:
            refs = server.find_instances(uid)
        except PacsError as exc:
            if exc.kind not in ("unknown_study", "failed"):
                raise  # server-wide: unreachable, refused, authentication
            if exc.kind == "unknown_study":
                outcome.status, outcome.detail = "unknown_study", f"not found on {server.name}"
            else:
                outcome.status, outcome.detail = "failed", str(exc)
            continue
        outcome.instances = len(refs)
        listed.append((uid, outcome, refs))
    todo = sum(len(refs) - len(_plan(refs, out)[0]) for _, _, refs in listed)
    bar = tqdm(total=todo, unit="img", desc="pull", disable=not progress, leave=False)
    try:
        for uid, outcome, refs in listed:
            try:
                _pull_study(server, out, uid, refs, outcome, bar)
            except PacsError as exc:
                if exc.kind in ("unreachable", "auth", "refused", "usage"):  # server-wide: stop here
                    outcome.status, outcome.detail = "interrupted", str(exc)
                    raise
                outcome.status, outcome.detail = "failed", str(exc)
            except BaseException:
                outcome.status = "interrupted"
                raise
    finally:
        bar.close()


def write_report(out: Path, result: PullResult) -> None:
    """``OUT/.medimb-pull/report.json``: server, whether the run finished, counts by status, per-study
    outcomes (named by folder hash), instances and bytes received, seconds and MB/s."""
    mb = result.bytes / 1e6
    write_json_atomic(out / PULL_STATE_DIR / "report.json", {
        "server": result.server,
        "complete": result.complete,
        "by_status": dict(sorted(result.counts().items())),
        "received_instances": result.received,
        "received_mb": round(mb, 3),
        "seconds": round(result.seconds, 3),
        "mb_per_s": round(mb / result.seconds, 3) if result.seconds > 0 else None,
        "studies": [s.to_dict() for s in result.studies],
    })
