"""Write an explain folder's maps and regions as DICOM Parametric Maps and Segmentations.

``export_results(overlays, locate, out_dir)``: per case, ``locate(case)`` gives the files of the case's source
instances (the link table and the local archive, or a folder); per method the heatmap becomes
``OUT/<case>/<case>_<method>_map.dcm`` and the region ``OUT/<case>/<case>_<method>_region.dcm``
(:mod:`medimb.export.objects`); per case the prediction as a Structured Report ``OUT/<case>/<case>_report.dcm``
(:mod:`medimb.export.report`); plus ``OUT/export.json`` (what was written; no identifiers).

The objects carry the source patient's identity (PHI): files are written atomically with mode 0600 in
folders of mode 0700. A re-run skips a file that already holds the same SOP Instance UID (same content).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medimb import __version__
from medimb.atomic import atomic_output, write_json_atomic
from medimb.errors import UserError

from .geometry import volume_to_frames
from .objects import (build_parametric_map, build_segmentation, parametric_map_uids, segmentation_uids)
from .overlays import OverlayCase, OverlayFolder
from .sources import SourceSeries, read_source_series

PHI_FILE_MODE, PHI_DIR_MODE = 0o600, 0o700


@dataclass
class WrittenResult:
    """One DICOM result object on disk (``kind``: ``"map"`` Parametric Map, ``"region"`` Segmentation,
    ``"report"`` the case's Structured Report, whose ``method`` lists the methods it covers; ``frames`` 0)."""

    case: str
    method: str
    kind: str
    path: str
    frames: int
    skipped: bool = False


def _load_3d(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``((I, J, K) array, (4, 4) RAS affine)`` of an overlay NIfTI."""
    import nibabel as nib

    img = nib.load(str(path))
    shape = tuple(img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise UserError(f"{path.name}: a 3D map expected, got shape {tuple(img.shape)}")
    return np.asarray(img.dataobj).reshape(shape), img.affine


def _existing_uid(path: Path) -> str | None:
    if not path.is_file():
        return None
    import pydicom

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    except Exception:  # noqa: BLE001 - unreadable: written again
        return None


def _write_phi(path: Path, dataset) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(PHI_DIR_MODE)
    with atomic_output(path, suffix=".part.dcm") as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
        os.chmod(tmp, PHI_FILE_MODE)
    os.chmod(path, PHI_FILE_MODE)  # atomic_output gives the umask's mode on rename


def _write_or_keep(path: Path, uid: str, build) -> tuple[object, bool]:
    """``(dataset, skipped)``: the file's header when it already holds ``uid`` (same content), else ``build()``
    written atomically."""
    if _existing_uid(path) == uid:
        import pydicom

        return pydicom.dcmread(path, stop_before_pixels=True), True
    dataset = build()
    _write_phi(path, dataset)
    return dataset, False


def export_case(case, source: SourceSeries, region_threshold: float, out_dir: Path) -> list[WrittenResult]:
    """Write one :class:`medimb.export.overlays.OverlayCase`'s methods next to ``source``, then the case's
    Structured Report (:mod:`medimb.export.report`)."""
    from .report import MethodResult, build_report, report_uids

    written, results = [], []
    folder = out_dir / case.case
    for method, (heat_path, label_path) in case.maps.items():
        heat, heat_affine = _load_3d(heat_path)
        label, label_affine = _load_3d(label_path)
        frames = volume_to_frames(heat.astype(np.float32), heat_affine, source.frames)
        mask = volume_to_frames(label, label_affine, source.frames) > 0
        jobs = (("map", parametric_map_uids(source, frames, method, case.prediction),
                 lambda: build_parametric_map(source, frames, method, case.prediction)),
                ("region", segmentation_uids(source, mask, method, case.prediction, region_threshold),
                 lambda: build_segmentation(source, mask, method, case.prediction, region_threshold)))
        objects = {}
        for kind, uids, build in jobs:
            path = folder / f"{case.case}_{method}_{kind}.dcm"
            try:
                objects[kind], skipped = _write_or_keep(path, uids.instance, build)
            except (ValueError, AttributeError, TypeError) as exc:  # highdicom's checks of the source headers
                raise UserError(f"{method} {kind}: highdicom could not build it from the source headers: "
                                f"{exc}") from exc
            written.append(WrittenResult(case.case, method, kind, str(path.relative_to(out_dir)), len(frames),
                                         skipped))
        results.append(MethodResult(method, objects["map"], objects["region"],
                                    float(mask.sum()) * source.voxel_mm3, region_threshold))
    path = folder / f"{case.case}_report.dcm"
    _, sop_uid = report_uids(source, case.prediction, results)
    try:
        _, skipped = _write_or_keep(path, sop_uid, lambda: build_report(source, case.prediction, results))
    except (ValueError, AttributeError, TypeError) as exc:
        raise UserError(f"report: highdicom could not build it: {exc}") from exc
    written.append(WrittenResult(case.case, ",".join(case.maps), "report", str(path.relative_to(out_dir)), 0,
                                 skipped))
    return written


def export_results(overlays: OverlayFolder, locate: Callable[[OverlayCase], list], out_dir: str | Path,
                   progress: bool = False) -> list[WrittenResult]:
    """Export every case of ``overlays`` (:func:`medimb.export.overlays.read_overlay_folder`) into ``out_dir``;
    ``locate(case)`` returns the :class:`OverlayCase`'s source files, or ``(file, frame number)`` pairs
    (:func:`medimb.export.sources.read_source_series`). Returns what was written (or skipped)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    if not out_dir.exists():  # ours: owner-only; an existing folder keeps the permissions its owner gave it
        out_dir.mkdir(parents=True)
        out_dir.chmod(PHI_DIR_MODE)
    start = time.perf_counter()
    written: list[WrittenResult] = []
    for case in tqdm(overlays.cases, desc="export", unit="case", disable=not progress):
        try:
            source = read_source_series(locate(case))
            written += export_case(case, source, overlays.region_threshold, out_dir)
        except UserError as exc:
            raise UserError(f"case {case.case}: {exc}") from None
    write_json_atomic(out_dir / "export.json", {
        "medimb": __version__, "overlays": str(overlays.folder.resolve()), "methods": overlays.methods,
        "region_threshold": overlays.region_threshold, "seconds": round(time.perf_counter() - start, 3),
        "phi": "the DICOM files carry the source patient's identity (name, ID, study): keep them with the "
               "hospital's images",
        "results": [asdict(w) for w in written]})
    os.chmod(out_dir / "export.json", PHI_FILE_MODE)
    return written


def folder_locator(folder: str | Path) -> Callable[[OverlayCase], list[Path]]:
    """``locate`` for one case whose source instances are the DICOM files of ``folder`` (recursively; every
    frame of a multi-frame instance)."""
    from .sources import _read_header

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--source-series {folder} is not a folder")
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):  # DICOMDIR, README, other non-images: left out
        ds = _read_header(path, tags=["SOPInstanceUID", "ImagePositionPatient", "NumberOfFrames"])
        if ds is not None and ("ImagePositionPatient" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1):
            files.append(path)
    if not files:
        raise UserError(f"--source-series {folder} holds no DICOM images")
    return lambda case: files
