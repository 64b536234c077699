"""The private link table: which source DICOM instances each converted output came from.

``medimb-prep convert ARCHIVE OUT --link-table PATH`` writes it. It is **PHI** (it holds the original
Study, Series and SOP Instance UIDs, which the PACS can resolve to the patient), so it is written outside
the de-identified output (a PATH inside OUT is refused), with mode 0600, atomically, and merged with the
table already at PATH when a conversion resumes (rows of outputs converted again are replaced; the others
kept). Whoever holds it can put results back next to the source series (``medimb export-dicom``, ``--push``).

CSV, one row per slice of each output volume (:data:`COLUMNS`)::

    subject, session, series      the pseudonymous labels of the output (as in manifest.csv)
    output                        the NIfTI file, relative to OUT (manifest.csv's ``path``)
    kind                          manifest.csv's kind (image, dce_phase, subtraction, 4d, timeseries, dwi, localizer)
    volume                        index along the file's 4th axis (0 for a 3D file)
    slice                         index along the file's 3rd axis (k; voxel (i, j, k) as NIfTI stores it)
    study_uid, series_uid         the source StudyInstanceUID and SeriesInstanceUID of that slice
    sop_uid                       the source SOPInstanceUID of that slice
    frame                         1-based frame number in a multi-frame source instance, else empty

A subtraction volume (phase p minus phase 0) is linked to phase p's instances.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

COLUMNS = ["subject", "session", "series", "output", "kind", "volume", "slice", "study_uid", "series_uid",
           "sop_uid", "frame"]


class LinkTableError(ValueError):
    """A link table that cannot be read or a path where it must not be written."""


@dataclass
class SourceInstance:
    """One slice of an output volume and the source instance (and frame) it came from."""

    volume: int
    slice: int
    study_uid: str
    series_uid: str
    sop_uid: str
    frame: int | None = None


@dataclass
class LinkedOutput:
    """One converted output file and its sources (what :func:`read_link_table` returns per output)."""

    subject: str
    session: str
    series: str
    output: str
    kind: str
    instances: list[SourceInstance] = field(default_factory=list)

    @property
    def study_uid(self) -> str:
        """The source study (one per output: a conversion never mixes studies)."""
        return self.instances[0].study_uid if self.instances else ""

    @property
    def series_uids(self) -> list[str]:
        """The source series in volume order (several for a DCE 4D file made of one series per phase)."""
        return list(dict.fromkeys(i.series_uid for i in sorted(self.instances, key=lambda i: (i.volume, i.slice))))

    def sop_uids(self, volume: int = 0) -> list[str]:
        """Source SOPInstanceUIDs of one volume, in slice order (k = 0, 1, ...)."""
        return [i.sop_uid for i in sorted(self.instances, key=lambda i: i.slice) if i.volume == volume]


def check_location(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The table's absolute path; :class:`LinkTableError` if it would be inside the de-identified ``out``."""
    table = Path(path).expanduser().resolve()
    if table.is_relative_to(Path(out).expanduser().resolve()):
        raise LinkTableError(f"--link-table {path}: the link table holds the original UIDs (PHI) and must not be "
                             "inside the de-identified output folder; put it elsewhere")
    if table.is_dir():
        raise LinkTableError(f"--link-table {path} is a folder; give a file name (e.g. links.csv)")
    _read_rows(table)  # an existing file must be a link table (it is merged into, never overwritten blindly)
    return table


def plan_rows(plan, manifest_rows: list[dict]) -> list[dict]:
    """Link-table rows of one converted plan (:class:`data_prep.scan.SeriesPlan`) and its manifest rows."""
    out = []

    def add(row: dict, phases: list[int]) -> None:
        for volume, p in enumerate(phases):
            ph = plan.phases[p]
            for k, f in enumerate(ph.frames):
                out.append({
                    "subject": row["subject"], "session": row["session"], "series": row["series"],
                    "output": row["path"], "kind": row["kind"], "volume": volume, "slice": k,
                    "study_uid": plan.study_uid, "series_uid": ph.series_uid,
                    "sop_uid": f.sop_uid.split("#", 1)[0],  # frames of one file carry '#frame' / '#tile' suffixes
                    "frame": "" if f.frame is None else f.frame + 1,
                })

    everyone = list(range(len(plan.phases)))
    for row in manifest_rows:
        if row["kind"] in ("image", "localizer", "timeseries", "dwi", "4d"):
            add(row, everyone)
        elif row["kind"] in ("dce_phase", "subtraction"):
            add(row, [int(row["phase"])])
    return out


def _read_rows(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LinkTableError(f"cannot read the link table {path}: {exc.strerror or exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames != COLUMNS:
        raise LinkTableError(f"{path} is not a medimb link table (columns {reader.fieldnames})")
    return list(reader)


def write_link_table(path: str | os.PathLike, rows: list[dict]) -> int:
    """Merge ``rows`` into the table at ``path`` (rows of the same outputs replaced) and write it
    atomically with mode 0600; returns the number of rows written."""
    path = Path(path)
    new_outputs = {r["output"] for r in rows}
    kept = [r for r in _read_rows(path) if r["output"] not in new_outputs]
    merged = sorted(kept + [{k: str(v) for k, v in r.items()} for r in rows],
                    key=lambda r: (r["output"], int(r["volume"]), int(r["slice"])))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(merged)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(merged)


def read_link_table(path: str | os.PathLike) -> dict[str, LinkedOutput]:
    """The table at ``path``: output path (relative to OUT, as in manifest.csv) -> :class:`LinkedOutput`."""
    path = Path(path)
    if not path.is_file():
        raise LinkTableError(f"link table not found: {path}")
    outputs: dict[str, LinkedOutput] = {}
    for r in _read_rows(path):
        try:
            item = outputs.get(r["output"])
            if item is None:
                item = outputs[r["output"]] = LinkedOutput(r["subject"], r["session"], r["series"], r["output"],
                                                           r["kind"])
            item.instances.append(SourceInstance(int(r["volume"]), int(r["slice"]), r["study_uid"], r["series_uid"],
                                                 r["sop_uid"], int(r["frame"]) if r["frame"] else None))
        except (KeyError, ValueError):
            raise LinkTableError(f"{path}: a malformed row (volume, slice and frame must be numbers)") from None
    for item in outputs.values():
        item.instances.sort(key=lambda i: (i.volume, i.slice))
    return outputs
