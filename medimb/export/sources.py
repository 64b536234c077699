"""The source DICOM instances a result refers to: found in a local archive folder, read header-only.

A converted volume comes from one set of single-frame instances (one series, or one phase of a series that
holds every DCE phase). The link table (``medimb-prep convert --link-table``) names their SOP Instance UIDs;
:func:`index_archive` finds their files, :func:`read_source_series` reads and sorts them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medimb.errors import UserError


@dataclass
class SourceSeries:
    """One volume's source instances: ``datasets`` (pydicom headers without pixel data) and their ``paths``,
    sorted by position along the slice normal (ascending), the order of the result objects' frames."""

    datasets: list
    paths: list[Path]

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def sop_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]

    @property
    def voxel_mm3(self) -> float:
        """Volume of one voxel: pixel spacing times the step between slices along the normal (one slice: its
        SpacingBetweenSlices, else SliceThickness, else 1 mm)."""
        first = self.datasets[0]
        row, col = (float(v) for v in first.PixelSpacing)
        if len(self.datasets) > 1:
            o = np.asarray([float(v) for v in first.ImageOrientationPatient])
            normal = np.cross(o[:3], o[3:])
            positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in self.datasets]) @ normal
            step = float(np.median(np.diff(positions)))
        else:
            step = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
        return row * col * abs(step)


#: type 2 patient/study attributes highdicom copies from the source: a source without one gets it empty (in
#: memory only; the files are never changed)
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "AccessionNumber", "StudyID")


def _read_header(path: Path, tags=None):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None


def index_archive(archive: str | os.PathLike, sop_uids: Iterable[str]) -> dict[str, Path]:
    """``{SOP Instance UID: file}`` for those of ``sop_uids`` found under ``archive`` (every file's header is
    read up to its SOPInstanceUID; files that are not DICOM are skipped). The archive is never modified."""
    archive = Path(archive)
    if not archive.is_dir():
        raise UserError(f"--archive {archive} is not a folder")
    wanted = set(sop_uids)
    found: dict[str, Path] = {}
    for root, dirs, files in os.walk(archive):
        dirs.sort()
        for name in sorted(files):
            ds = _read_header(Path(root) / name, tags=["SOPInstanceUID"])
            uid = None if ds is None else str(ds.get("SOPInstanceUID", ""))
            if uid in wanted and uid not in found:
                found[uid] = Path(root) / name
                if len(found) == len(wanted):
                    return found
    return found


def read_source_series(paths: Iterable[str | os.PathLike]) -> SourceSeries:
    """Read the headers of one volume's single-frame instances and sort them along the slice normal.

    :class:`UserError` for no files, files that are not DICOM, several series, multi-frame instances, mixed
    orientations, no FrameOfReferenceUID (a result could not be placed in the patient) or two instances at
    the same position (several phases or echoes: give the one volume's instances, e.g. with the link table).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no source DICOM files")
    datasets = []
    for path in paths:
        ds = _read_header(path)
        if ds is None or "SOPInstanceUID" not in ds:
            raise UserError(f"{path} is not a readable DICOM file")
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
        datasets.append(ds)
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) != 1:
        raise UserError(f"the source files belong to {len(series)} series; give one volume's instances")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise UserError("a multi-frame (enhanced) source instance: results for multi-frame sources are not "
                        "supported (one file per slice expected)")
    if any("FrameOfReferenceUID" not in ds for ds in datasets):
        raise UserError("the source series has no FrameOfReferenceUID: results could not be placed in the patient")
    orientations = {tuple(np.round([float(v) for v in ds.get("ImageOrientationPatient", [])], 4)) for ds in datasets}
    if len(orientations) != 1 or len(next(iter(orientations))) != 6:
        raise UserError("the source instances do not share one ImageOrientationPatient")
    o = np.asarray(next(iter(orientations)))
    normal = np.cross(o[:3], o[3:])
    distances = np.asarray([np.dot([float(v) for v in ds.ImagePositionPatient], normal) for ds in datasets])
    order = np.argsort(distances, kind="stable")
    if len(order) > 1 and np.min(np.diff(distances[order])) < 1e-3:
        raise UserError("several source instances share a slice position (phases or echoes of one series?): "
                        "give one volume's instances (--link-table names them)")
    return SourceSeries([datasets[i] for i in order], [paths[i] for i in order])


def link_table_locator(link_table: str | os.PathLike, archive: str | os.PathLike):
    """``locate(case) -> [source file]`` (``case``: a :class:`medimb.export.overlays.OverlayCase`) from the link
    table of ``medimb-prep convert --link-table`` and the archive the scans were converted from.

    The case's source instances are the link table's rows of the first volume of its converted file
    (``case.source``, a file name). Each is looked up at its ``medimb-prep pull`` path
    (``ARCHIVE/<study>/<series>/<instance>.dcm``, hashes of the UIDs) first, else by reading the headers of
    every file of the archive once. :class:`UserError` for an unknown case, multi-frame sources, or instances the
    archive does not hold.
    """
    from data_prep.pacs.links import LinkTableError, read_link_table
    from data_prep.pacs.pull import instance_path
    from data_prep.pacs.server import InstanceRef

    archive = Path(archive)
    if not archive.is_dir():
        raise UserError(f"--archive {archive} is not a folder")
    try:
        outputs = read_link_table(link_table)
    except LinkTableError as exc:
        raise UserError(str(exc)) from None
    by_name = {Path(output.output).name: output for output in outputs.values()}
    walked: dict[str, Path] = {}  # filled on first need: SOP Instance UID -> file, for archives not laid out by pull

    def locate(case) -> list[Path]:
        output = by_name.get(case.source)
        if output is None:
            raise UserError(f"its scan {case.source} is not in the link table {link_table} (converted by another "
                            "run, or without --link-table?)")
        instances = [i for i in output.instances if i.volume == 0]
        if any(i.frame is not None for i in instances):
            raise UserError("its source is a multi-frame instance; results for multi-frame sources are not "
                            "supported")
        files, missing = [], []
        for inst in instances:
            path = instance_path(archive, InstanceRef(inst.study_uid, inst.series_uid, inst.sop_uid))
            if path.is_file():
                files.append(path)
            else:
                missing.append(inst.sop_uid)
        if missing and not walked:  # not laid out by medimb-prep pull: read the archive's headers once
            walked.update(index_archive(archive, {i.sop_uid for o in by_name.values() for i in o.instances}))
        lost = [uid for uid in missing if uid not in walked]
        if lost:
            raise UserError(f"{len(lost)} of its {len(instances)} source instances are not in --archive {archive}")
        return files + [walked[uid] for uid in missing]

    return locate
