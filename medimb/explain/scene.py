"""One self-contained 3D Slicer scene per case: ``<case>.mrb`` (Medical Reality Bundle).

An ``.mrb`` is a zip holding a folder with a ``.mrml`` scene and its data files; Slicer unpacks it and reads
the first ``.mrml`` it finds (``vtkMRMLScene::UnpackSlicerDataBundle``), with file names relative to that
scene file. Each case's bundle holds

- the **background** (the image explain drew the maps on: the chosen input channel, e.g. the first
  post-contrast phase, or the subtraction image), grey, window from its 0.5th-99.5th percentiles;
- every **heatmap** as a scalar volume with a colour table (Inferno), a fixed 0..1 window and a lower
  threshold (values below the display threshold are not drawn), stored in 1/255 steps (uint8 with a scale
  factor: the float32 maps are the NIfTI files beside the bundle); the first method's map is the slice views'
  foreground at the chosen opacity;
- the **regions** (each method's ``map >= threshold``) and, when the datalist has one, the **truth** mask as
  one segmentation (``.seg.nrrd``, :mod:`medimb.explain.seg_nrrd`) drawn as outlines in the slice views and as
  closed surfaces in the 3D view;
- the Red/Yellow/Green slice views' layers (background, foreground, opacity).

A NIfTI whose header has free text (``descrip``, ``aux_file``, ``db_name``, ``intent_name``) or extensions
is rewritten from its voxels and geometry without them, so nothing a converter put there (acquisition
times, names) travels in the bundle; voxel values are kept (scaled to float32 when the file has a scale
factor). A clean ``.nii.gz`` (``medimb-prep`` writes them so) is copied as written. Node and folder names
use the case id only. The bundle is deterministic (fixed zip timestamps, gzip without time stamps) and
written atomically.

The MRML follows what Slicer writes (``vtkMRMLScalarVolumeNode``, ``vtkMRMLVolumeArchetypeStorageNode``,
``vtkMRMLScalarVolumeDisplayNode``, ``vtkMRMLSegmentationNode`` and its storage/display nodes,
``vtkMRMLSliceCompositeNode``); it has been checked structurally (tests), not in a running Slicer.
"""

from __future__ import annotations

import gzip
import logging
import re
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from medimb.atomic import atomic_output

from .export import FREE_TEXT_FIELDS, load_on_grid, source_shape, strip_free_text
from .seg_nrrd import Grid, Segment, UnreadableGeometry, seg_nrrd_bytes

logger = logging.getLogger(__name__)

#: Slicer's built-in colour table for the heatmaps (Slicer >= 4.11)
HEATMAP_COLOR_NODE = "vtkMRMLColorTableNodeFileInferno.txt"
GREY_COLOR_NODE = "vtkMRMLColorTableNodeGrey"
#: segment colours: the regions by method (the first method's cyan, as in the previews), the truth green
REGION_COLORS = {"coam": (0.0, 0.9, 0.9), "coam_cosine": (0.3, 0.6, 1.0), "gradcam": (1.0, 0.55, 0.0),
                 "gradcampp": (1.0, 0.85, 0.2), "cam": (0.9, 0.3, 0.9)}
TRUTH_COLOR = (0.2, 1.0, 0.2)
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
SLICE_VIEWS = ("Red", "Yellow", "Green")


def _fmt(value: float) -> str:
    return format(float(value), ".10g")


def _safe(name: str) -> str:
    """A folder name for inside the zip: letters, digits, ``.``, ``_``, ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "case"


def clean_nifti(path: str | Path, unit_map: bool = False) -> tuple[bytes, np.ndarray]:
    """``(.nii.gz bytes, (i, j, k) voxels as read)`` of a 3D NIfTI without its free-text header fields and
    extensions.

    Geometry (qform/sform and their codes, pixdim), data type and units are kept; a file with a scale factor
    is written as float32 scaled values (what a viewer shows). ``unit_map``: a map in [0, 1] (a heatmap) is
    stored as uint8 with the scale factor 1/255, which readers (ITK, so Slicer; nibabel) apply: values to
    within 1/510, a file a tenth the size of float32 (a colour table has 256 entries anyway). gzip without a
    time stamp: same input, same bytes. A ``.nii.gz`` with nothing to drop or convert (no free text, no
    extensions, no scale factor, no file name in its gzip header) is returned as written.
    """
    image = nib.load(str(path))
    shape = source_shape(path)
    header = image.header.copy()
    # nibabel keeps a file's scale factor on the array proxy (the loaded header says NaN)
    slope, inter = float(getattr(image.dataobj, "slope", 1.0)), float(getattr(image.dataobj, "inter", 0.0))
    scaled = slope != 1.0 or inter != 0.0
    if unit_map:
        data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape)
        stored = np.round(np.clip(data, 0.0, 1.0) * 255.0).astype(np.uint8)
        header.set_data_dtype(np.uint8)
    elif scaled:
        data = stored = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape)
        header.set_data_dtype(np.float32)
    else:
        data = stored = np.asarray(image.dataobj.get_unscaled()).reshape(shape)
    free_text = any(field in header and header[field].item() for field in FREE_TEXT_FIELDS)
    clean = not header.extensions and not free_text
    if clean and not scaled and not unit_map and str(path).endswith(".nii.gz") and header.sizeof_hdr == 348:
        written = Path(path).read_bytes()
        if written[3] & 0x1C == 0:  # no gzip FEXTRA/FNAME/FCOMMENT (`gzip` keeps the original file name)
            return written, data  # nothing to drop: the file as written (medimb-prep's are)
    header.set_slope_inter(1.0, 0.0)
    header.set_data_shape(shape)
    strip_free_text(header)
    out = type(image)(stored, None, header=header)
    out.set_qform(image.get_qform(), code=int(image.header["qform_code"]))
    out.set_sform(image.get_sform(), code=int(image.header["sform_code"]))
    if unit_map:
        out.header.set_slope_inter(1.0 / 255.0, 0.0)
    # level 1: a third of level 6's time on scans, a few percent larger
    return gzip.compress(out.to_bytes(), compresslevel=1, mtime=0), data


def _window(data: np.ndarray) -> tuple[float, float]:
    """(window, level) from the 0.5th-99.5th percentiles (every 2nd voxel per axis: enough, and fast)."""
    sample = np.asarray(data[::2, ::2, ::2], dtype=np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 1.0, 0.5
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max()) + 1.0
    return float(hi - lo), float(hi + lo) / 2.0


class _Scene:
    """The MRML document, built node by node with Slicer's element names and attributes."""

    def __init__(self) -> None:
        self.root = ET.Element("MRML", {"version": "Slicer4.4.0", "userTags": ""})
        self.counts: dict[str, int] = {}

    def new_id(self, cls: str) -> str:
        self.counts[cls] = self.counts.get(cls, 0) + 1
        return f"{cls}{self.counts[cls]}"

    def add(self, tag: str, attributes: dict) -> None:
        ET.SubElement(self.root, tag, {k: str(v) for k, v in attributes.items()})

    def volume(self, name: str, file_name: str, grid: Grid, display: dict) -> str:
        """A scalar volume with its storage and display nodes; returns the volume node id."""
        volume_id = self.new_id("vtkMRMLScalarVolumeNode")
        storage_id = self.new_id("vtkMRMLVolumeArchetypeStorageNode")
        display_id = self.new_id("vtkMRMLScalarVolumeDisplayNode")
        self.add("VolumeDisplay", {
            "id": display_id, "name": "VolumeDisplay", "hideFromEditors": "true", "selectable": "true",
            "selected": "false", "visibility": "true", "opacity": "1", "interpolate": "1",
            "windowLevelLocked": "false", **display})
        self.add("VolumeArchetypeStorage", {
            "id": storage_id, "name": "VolumeArchetypeStorage", "hideFromEditors": "true",
            "selectable": "true", "selected": "false", "fileName": file_name, "useCompression": "1",
            "readState": "0", "writeState": "0", "centerImage": "0", "UseOrientationFromFile": "1"})
        self.add("Volume", {
            "id": volume_id, "name": name, "hideFromEditors": "false", "selectable": "true",
            "selected": "false", "references": f"display:{display_id};storage:{storage_id};", "userTags": "",
            "spacing": " ".join(_fmt(v) for v in grid.spacing),
            "origin": " ".join(_fmt(v) for v in grid.ras_origin()),
            # row-major; the columns are the i, j, k directions (vtkMRMLVolumeNode::IJKToRASDirections)
            "ijkToRASDirections": " ".join(_fmt(v) for v in grid.ras_directions().ravel())})
        return volume_id

    def segmentation(self, name: str, file_name: str, segments: list[Segment], visible: set[str],
                     reference_volume: str) -> str:
        seg_id = self.new_id("vtkMRMLSegmentationNode")
        storage_id = self.new_id("vtkMRMLSegmentationStorageNode")
        display_id = self.new_id("vtkMRMLSegmentationDisplayNode")
        properties = "".join(
            f"{s.id} OverrideColorR:-1 OverrideColorG:-1 OverrideColorB:-1 "
            f"Visible:{'true' if s.id in visible else 'false'} Visible3D:true Visible2DFill:true "
            f"Visible2DOutline:true Opacity3D:1 Opacity2DFill:1 Opacity2DOutline:1 Pickable:true|"
            for s in segments)
        self.add("SegmentationDisplay", {
            "id": display_id, "name": "SegmentationDisplay", "hideFromEditors": "true", "selectable": "true",
            "selected": "false", "visibility": "true", "visibility2D": "true", "visibility3D": "true",
            "opacity": "1", "PreferredDisplayRepresentationName2D": "Binary labelmap",
            "PreferredDisplayRepresentationName3D": "Closed surface",
            # outlines in the slice views (the heatmap stays readable), half-transparent surfaces in 3D
            "Visibility2DFill": "false", "Visibility2DOutline": "true", "Opacity3D": "0.6",
            "Opacity2DFill": "0.5", "Opacity2DOutline": "1", "SegmentationDisplayProperties": properties})
        self.add("SegmentationStorage", {
            "id": storage_id, "name": "SegmentationStorage", "hideFromEditors": "true", "selectable": "true",
            "selected": "false", "fileName": file_name, "useCompression": "1", "readState": "0",
            "writeState": "0", "CropToMinimumExtent": "false"})
        self.add("Segmentation", {
            "id": seg_id, "name": name, "hideFromEditors": "false", "selectable": "true", "selected": "false",
            "references": (f"display:{display_id};referenceImageGeometryRef:{reference_volume};"
                           f"storage:{storage_id};"),
            "userTags": "", "MasterRepresentationName": "Binary labelmap"})
        return seg_id

    def slice_views(self, background: str, foreground: str | None, opacity: float) -> None:
        refs = f"backgroundVolume:{background};" + (f"foregroundVolume:{foreground};" if foreground else "")
        for view in SLICE_VIEWS:
            self.add("SliceComposite", {
                "id": f"vtkMRMLSliceCompositeNode{view}", "name": "SliceComposite", "hideFromEditors": "true",
                "selectable": "true", "selected": "false", "singletonTag": view, "references": refs,
                "compositing": "0", "foregroundOpacity": _fmt(opacity), "labelOpacity": "1",
                "linkedControl": "1", "hotLinkedControl": "0", "layoutName": view,
                "doPropagateVolumeSelection": "1"})

    def tobytes(self) -> bytes:
        ET.indent(self.root, space=" ")
        return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(self.root, encoding="utf-8") + b"\n"


def build_case_scene(folder: str | Path, row: dict, display_threshold: float, opacity: float,
                     threshold: float) -> tuple[dict[str, bytes], dict]:
    """The files of one case's bundle ``{path in zip: bytes}`` and what the loader needs to know about it
    (``{"peak_ras": [r, a, s] of the first heatmap's peak, "segments": [names]}``).

    ``row``: one row of :func:`medimb.explain.pipeline.write_case` (``case``, ``source``: the overlays' grid,
    ``background``: ``{"name", "path", "in_output"}``, ``heatmaps``/``labels``: ``{method: file in folder}``,
    ``truth``: a mask path or None). The heatmaps and regions lie on ``source``'s grid; the background on
    its own.
    """
    folder = Path(folder)
    case = row["case"]
    top = _safe(case)
    scene = _Scene()
    files: dict[str, bytes] = {}

    bg = row.get("background") or {"name": "", "path": row["source"], "in_output": False}
    bg_path = folder / bg["path"] if bg.get("in_output") else Path(bg["path"])
    files[f"{top}/Data/background.nii.gz"], bg_data = clean_nifti(bg_path)
    window, level = _window(bg_data)
    bg_name = f"{case} {bg['name']}".strip()
    background_id = scene.volume(bg_name, "Data/background.nii.gz", Grid.of_file(bg_path), {
        "colorNodeID": GREY_COLOR_NODE, "window": _fmt(window), "level": _fmt(level),
        "upperThreshold": "32767", "lowerThreshold": "-32768", "autoWindowLevel": "0", "applyThreshold": "0",
        "autoThreshold": "0"})

    grid = Grid.of_file(row["source"])
    heat_ids, peak = [], None
    for method, heat_file in row["heatmaps"].items():
        files[f"{top}/Data/heatmap_{method}.nii.gz"], heat = clean_nifti(folder / heat_file, unit_map=True)
        if peak is None:
            peak = grid.index_to_ras(np.unravel_index(int(np.argmax(heat)), heat.shape))
        heat_ids.append(scene.volume(f"{case} {method}", f"Data/heatmap_{method}.nii.gz", Grid.of_file(
            folder / heat_file), {
            # upper threshold a little above 1: the peak (255 x 1/255) shows however a reader rounds it
            "colorNodeID": HEATMAP_COLOR_NODE, "window": "1", "level": "0.5", "upperThreshold": "1.01",
            "lowerThreshold": _fmt(display_threshold), "autoWindowLevel": "0", "applyThreshold": "1",
            "autoThreshold": "0"}))

    segments = []
    for method, label_file in row["labels"].items():
        mask = np.asarray(nib.load(str(folder / label_file)).dataobj).reshape(grid.size) > 0
        color = REGION_COLORS.get(method, (1.0, 1.0, 0.0))
        segments.append(Segment(f"region_{method}", f"{method} region (map >= {threshold:g})", color, mask))
    if row.get("truth"):
        truth = load_on_grid(row["truth"], row["source"], order=0).reshape(grid.size) > 0.5
        segments.append(Segment("truth", "truth (lesion mask)", TRUTH_COLOR, truth))
    if segments:
        files[f"{top}/Data/regions.seg.nrrd"] = seg_nrrd_bytes(segments, grid)
        # the first method's region and the truth are shown; the other regions can be switched on
        visible = {segments[0].id} | {s.id for s in segments if s.id == "truth"}
        scene.segmentation(f"{case} regions", "Data/regions.seg.nrrd", segments, visible,
                           heat_ids[0] if heat_ids else background_id)
    scene.slice_views(background_id, heat_ids[0] if heat_ids else None, opacity)
    files[f"{top}/{top}.mrml"] = scene.tobytes()
    info = {"peak_ras": None if peak is None else [round(float(v), 3) for v in peak],
            "segments": [s.name for s in segments]}
    return files, info


def write_mrb(path: str | Path, files: dict[str, bytes]) -> None:
    """Zip ``files`` into ``path`` atomically, entries sorted with fixed time stamps and permissions.

    The data files are gzip already (stored); the scene text is deflated.
    """
    with atomic_output(path, suffix=".part.mrb") as tmp:
        with zipfile.ZipFile(tmp, "w") as archive:
            for name in sorted(files):
                info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
                info.external_attr = 0o644 << 16
                stored = name.endswith((".gz", ".nrrd"))  # compressed already
                info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
                archive.writestr(info, files[name])


def write_case_scene(folder: str | Path, row: dict, display_threshold: float, opacity: float,
                     threshold: float) -> dict:
    """Write ``<case>.mrb`` into ``folder`` (:func:`build_case_scene`); returns the loader's entry for it:
    ``{"case", "scene": file name, "prediction", "peak_ras", "segments"}``.

    A case whose images ITK, and so Slicer, cannot place (a sheared affine) gets no scene: a warning, and
    ``"scene": None`` with the reason in ``"skipped"``; its NIfTI overlays are written all the same.
    """
    entry = {"case": row["case"], "scene": None, "prediction": row.get("prediction", ""), "peak_ras": None,
             "segments": []}
    try:
        files, info = build_case_scene(folder, row, display_threshold, opacity, threshold)
    except UnreadableGeometry as exc:
        logger.warning("case %s: no 3D Slicer scene: ITK, Slicer's reader, cannot read %s", row["case"], exc)
        return {**entry, "skipped": str(exc)}
    name = f"{row['case']}.mrb"
    write_mrb(Path(folder) / name, files)
    return {**entry, "scene": name, **info}
