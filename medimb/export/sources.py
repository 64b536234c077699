"""The source DICOM frames a result refers to: found in a local archive folder, read header-only.

A converted volume comes from one set of 2D frames: single-frame instances (one series, or one phase of a series
that holds every DCE phase) or frames of multi-frame (enhanced) instances. The link table (``medimb-prep convert
--link-table``) names their SOP Instance UIDs (and frame numbers); :func:`index_archive` finds their files,
:func:`read_source_series` reads and sorts them. Geometry is LPS mm, as in the DICOM headers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medimb.errors import UserError


@dataclass(frozen=True, eq=False)
class SourceFrame:
    """One 2D frame of a source instance: its header, file, frame ``number`` (1-based, multi-frame instances;
    None for a single-frame one) and geometry: ``position`` (3,) ImagePositionPatient, ``orientation`` (6,)
    ImageOrientationPatient (row direction, column direction), ``spacing`` (row spacing, column spacing),
    ``shape`` (rows, columns), ``thickness`` SliceThickness (None when absent)."""

    dataset: object
    path: Path
    number: int | None
    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]
    shape: tuple[int, int]
    thickness: float | None

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])

    @property
    def key(self) -> str:
        uid = str(self.dataset.SOPInstanceUID)
        return uid if self.number is None else f"{uid}#{self.number}"


@dataclass
class SourceSeries:
    """One volume's source ``frames``, sorted by position along the slice normal (ascending): the order of the
    result objects' frames. ``datasets`` are their instances' headers (no pixel data), once each."""

    frames: list[SourceFrame]

    @property
    def datasets(self) -> list:
        seen: dict[str, object] = {}
        for frame in self.frames:
            seen.setdefault(str(frame.dataset.SOPInstanceUID), frame.dataset)
        return list(seen.values())

    @property
    def multiframe(self) -> bool:
        return any(frame.number is not None for frame in self.frames)

    @property
    def series_uid(self) -> str:
        return str(self.frames[0].dataset.SeriesInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self.frames[0].dataset.StudyInstanceUID)

    @property
    def sop_uids(self) -> list[str]:
        """Every frame's ``SOPInstanceUID`` (``#<frame>`` appended for frames of multi-frame instances)."""
        return [frame.key for frame in self.frames]

    @property
    def step(self) -> float:
        """Distance between neighbouring frames along the normal (one frame: its SpacingBetweenSlices, else
        SliceThickness, else 1 mm)."""
        if len(self.frames) > 1:
            distances = np.asarray([f.position @ self.frames[0].normal for f in self.frames])
            return abs(float(np.median(np.diff(distances))))
        ds = self.frames[0].dataset
        return float(ds.get("SpacingBetweenSlices") or self.frames[0].thickness or 1.0)

    @property
    def voxel_mm3(self) -> float:
        """Volume of one voxel: pixel spacing times :attr:`step`."""
        row, col = self.frames[0].spacing
        return row * col * self.step


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


def _functional(ds, frame_index: int, sequence: str, keyword: str):
    """A functional-group attribute of frame ``frame_index`` (0-based): per-frame, else shared, else None."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame_index), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items is not None and len(items) > index:
            found = items[index].get(sequence)
            value = found[0].get(keyword) if found else None
            if value is not None:
                return value
    return None


def _frames_of(ds, path: Path, numbers: set[int] | None) -> list[SourceFrame]:
    """The frames of one instance (all, or the 1-based ``numbers`` of a multi-frame one)."""
    uid = ds.get("SOPInstanceUID", "?")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    shape = (int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))
    if "PerFrameFunctionalGroupsSequence" not in ds and count == 1:  # a classic single-frame image
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
                   if k not in ds]
        if missing:
            raise UserError(f"source instance {uid} has no {', '.join(missing)}: not a cross-sectional image a map "
                            "can be placed on")
        thickness = ds.get("SliceThickness")
        return [SourceFrame(ds, path, None, np.asarray([float(v) for v in ds.ImagePositionPatient]),
                            np.asarray([float(v) for v in ds.ImageOrientationPatient]),
                            tuple(float(v) for v in ds.PixelSpacing), shape,
                            None if thickness in (None, "") else float(thickness))]
    wanted = sorted(numbers) if numbers else range(1, count + 1)
    frames = []
    for number in wanted:
        if not 1 <= number <= count:
            raise UserError(f"source instance {uid} has {count} frames, not frame {number}")
        index = number - 1
        position = _functional(ds, index, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _functional(ds, index, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _functional(ds, index, "PixelMeasuresSequence", "PixelSpacing")
        if position is None or orientation is None or spacing is None:
            raise UserError(f"multi-frame source instance {uid} has no plane position, orientation or pixel spacing "
                            f"for frame {number}: a map cannot be placed on it")
        thickness = _functional(ds, index, "PixelMeasuresSequence", "SliceThickness")
        frames.append(SourceFrame(ds, path, number, np.asarray([float(v) for v in position]),
                                  np.asarray([float(v) for v in orientation]), tuple(float(v) for v in spacing),
                                  shape, None if thickness in (None, "") else float(thickness)))
    return frames


def read_source_series(items: Iterable[str | os.PathLike | tuple]) -> SourceSeries:
    """Read the headers of one volume's source instances and sort their frames along the slice normal.

    ``items``: files, or ``(file, frame number)`` pairs naming frames of multi-frame instances (``None``: every
    frame). :class:`UserError` for no files, files that are not DICOM, several series, mixed orientations, no
    FrameOfReferenceUID (a result could not be placed in the patient) or two frames at the same position
    (several phases or echoes: give the one volume's instances, e.g. with the link table).
    """
    selected: dict[Path, set[int] | None] = {}
    for item in items:
        path, number = (Path(item[0]), item[1]) if isinstance(item, tuple) else (Path(item), None)
        if number is None:
            selected[path] = None
        elif selected.get(path, set()) is not None:
            selected.setdefault(path, set()).add(int(number))
    if not selected:
        raise UserError("no source DICOM files")
    frames: list[SourceFrame] = []
    for path, numbers in selected.items():
        ds = _read_header(path)
        if ds is None or "SOPInstanceUID" not in ds:
            raise UserError(f"{path} is not a readable DICOM file")
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
        frames += _frames_of(ds, path, numbers)
    series = {str(f.dataset.get("SeriesInstanceUID", "")) for f in frames}
    if len(series) != 1:
        raise UserError(f"the source files belong to {len(series)} series; give one volume's instances")
    if any("FrameOfReferenceUID" not in f.dataset for f in frames):
        raise UserError("the source series has no FrameOfReferenceUID: results could not be placed in the patient")
    if len({tuple(np.round(f.orientation, 4)) for f in frames}) != 1:
        raise UserError("the source frames do not share one ImageOrientationPatient")
    distances = np.asarray([f.position @ frames[0].normal for f in frames])
    order = np.argsort(distances, kind="stable")
    if len(order) > 1 and np.min(np.diff(distances[order])) < 1e-3:
        raise UserError("several source frames share a slice position (phases or echoes of one series?): "
                        "give one volume's instances (--link-table names them)")
    return SourceSeries([frames[i] for i in order])


def link_table_locator(link_table: str | os.PathLike, archive: str | os.PathLike):
    """``locate(case) -> [(file, frame number or None)]`` (``case``: an :class:`~medimb.export.overlays.OverlayCase`)
    from the link table of ``medimb-prep convert --link-table`` and the archive the scans were converted from.

    The case's source frames are the link table's rows of the first volume of its converted file (``case.source``,
    a file name). Each instance is looked up at its ``medimb-prep pull`` path
    (``ARCHIVE/<study>/<series>/<instance>.dcm``, hashes of the UIDs) first, else by reading the headers of
    every file of the archive once. :class:`UserError` for an unknown case or instances the archive does not hold.
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
    walked: dict[str, dict[str, Path]] = {}  # "index": SOP Instance UID -> file, read once on first need

    def locate(case) -> list[tuple[Path, int | None]]:
        output = by_name.get(case.source)
        if output is None:
            raise UserError(f"its scan {case.source} is not in the link table {link_table} (converted by another "
                            "run, or without --link-table?)")
        instances = [i for i in output.instances if i.volume == 0]
        found, lost = [], set()
        for inst in instances:
            path = instance_path(archive, InstanceRef(inst.study_uid, inst.series_uid, inst.sop_uid))
            if not path.is_file():
                if "index" not in walked:  # not laid out by medimb-prep pull: read the archive's headers once
                    walked["index"] = index_archive(archive, {i.sop_uid for o in by_name.values() for i in o.instances})
                path = walked["index"].get(inst.sop_uid)
            if path is None:
                lost.add(inst.sop_uid)
            else:
                found.append((path, inst.frame))
        if lost:
            raise UserError(f"{len(lost)} of its {len({i.sop_uid for i in instances})} source instances are not in "
                            f"--archive {archive}")
        return found

    return locate
