"""3D Slicer segmentation files (``.seg.nrrd``): binary masks as segments with names and colours.

The layout is the one ``vtkMRMLSegmentationStorageNode`` (Slicer's ``Libs/MRML/Core``) writes and reads:
an NRRD in LPS space whose first axis (kind ``list``) holds one layer per segment (a plain 3D NRRD when
there is one segment), and ``key:=value`` fields that describe each segment
(``Segment<i>_ID/_Name/_Color/_Extent/_Layer/_LabelValue/...``) and the segmentation
(``Segmentation_MasterRepresentation``, ``Segmentation_ContainedRepresentationNames``,
``Segmentation_ReferenceImageExtentOffset``; without the last one Slicer imports the file as a plain
label volume). Listing ``Closed surface`` among the contained representations makes Slicer build the 3D
surfaces when it loads the file. One layer per segment lets segments overlap (a method's region and the
lesion mask usually do).

The bytes are deterministic: gzip with a zero timestamp, fields in a fixed order.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class UnreadableGeometry(ValueError):
    """ITK (the reader 3D Slicer uses) cannot read an image's geometry, e.g. a sheared (non-orthonormal) affine."""


@dataclass(frozen=True)
class Grid:
    """A voxel grid as ITK (and so Slicer) reads it from a file: LPS origin (mm), spacing (mm), direction
    (row-major 3x3, columns are the i, j, k axes in LPS) and size ``(i, j, k)``."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    size: tuple[int, int, int]

    @classmethod
    def of_file(cls, path) -> "Grid":
        """The grid of an image file, from its header only (SimpleITK); :class:`UnreadableGeometry` when ITK
        refuses it."""
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:  # ITK's message ends with the reason, e.g. non-orthonormal directions
            reason = [line.strip() for line in str(exc).splitlines() if line.strip()][-1]
            raise UnreadableGeometry(f"{Path(path).name}: {reason}") from exc
        if reader.GetDimension() != 3:
            size = reader.GetSize()
            if reader.GetDimension() < 3 or any(s != 1 for s in size[3:]):
                raise ValueError(f"{path}: a 3D image is expected, got size {size}")
            direction = np.asarray(reader.GetDirection()).reshape(reader.GetDimension(), -1)[:3, :3]
            return cls(tuple(reader.GetOrigin()[:3]), tuple(reader.GetSpacing()[:3]),
                       tuple(float(v) for v in direction.ravel()), tuple(size[:3]))
        return cls(tuple(reader.GetOrigin()), tuple(reader.GetSpacing()), tuple(reader.GetDirection()),
                   tuple(reader.GetSize()))

    def ras_directions(self) -> np.ndarray:
        """``(3, 3)`` unit axis directions in RAS (Slicer's ``ijkToRASDirections``, columns = i, j, k)."""
        return np.diag([-1.0, -1.0, 1.0]) @ np.asarray(self.direction, dtype=float).reshape(3, 3)

    def ras_origin(self) -> np.ndarray:
        return np.asarray(self.origin, dtype=float) * np.array([-1.0, -1.0, 1.0])

    def index_to_ras(self, index) -> np.ndarray:
        """RAS position (mm) of voxel ``(i, j, k)``."""
        steps = np.asarray(index, dtype=float) * np.asarray(self.spacing, dtype=float)
        return self.ras_origin() + self.ras_directions() @ steps


@dataclass(frozen=True)
class Segment:
    """One segment: ``mask`` is ``(i, j, k)`` bool on the segmentation's grid; ``color`` RGB in [0, 1]."""

    id: str
    name: str
    color: tuple[float, float, float]
    mask: np.ndarray


def _number(value: float) -> str:
    return format(float(value), ".10g")


def _extent(mask: np.ndarray) -> str:
    """The voxel bounding box ``i0 i1 j0 j1 k0 k1`` of the mask (``0 -1 0 -1 0 -1`` when empty), as Slicer
    stores each segment's effective extent."""
    if not mask.any():
        return "0 -1 0 -1 0 -1"
    bounds = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        bounds += [int(hits[0]), int(hits[-1])]
    return " ".join(str(b) for b in bounds)


def _field(value: str) -> str:
    """NRRD key/value values are one line; backslashes and newlines are escaped."""
    return str(value).replace("\\", "\\\\").replace("\n", "\\n")


def seg_nrrd_bytes(segments: list[Segment], grid: Grid, compresslevel: int = 1) -> bytes:
    """The ``.seg.nrrd`` file content for ``segments`` (each ``(i, j, k)`` = ``grid.size``) on ``grid``."""
    if not segments:
        raise ValueError("a segmentation file needs at least one segment")
    for seg in segments:
        if tuple(seg.mask.shape) != tuple(grid.size):
            raise ValueError(f"segment {seg.id!r}: mask shape {seg.mask.shape} is not the grid size "
                             f"{grid.size}")
        if any(c in seg.id for c in " |\n"):
            raise ValueError(f"segment id {seg.id!r}: no spaces, '|' or newlines")
    layers = np.stack([np.asarray(s.mask, dtype=bool) for s in segments]).astype(np.uint8)  # (N, i, j, k)
    direction = np.asarray(grid.direction, dtype=float).reshape(3, 3)
    axes = " ".join("(" + ",".join(_number(v) for v in direction[:, a] * grid.spacing[a]) + ")"
                    for a in range(3))
    if len(segments) == 1:
        dims, sizes, directions, kinds = 3, grid.size, axes, "domain domain domain"
    else:
        dims, sizes, directions = 4, (len(segments), *grid.size), "none " + axes
        kinds = "list domain domain domain"
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        "type: unsigned char",
        f"dimension: {dims}",
        "space: left-posterior-superior",
        "sizes: " + " ".join(str(int(s)) for s in sizes),
        f"space directions: {directions}",
        f"kinds: {kinds}",
        "encoding: gzip",
        "space origin: (" + ",".join(_number(v) for v in grid.origin) + ")",
    ]
    for index, seg in enumerate(segments):
        fields = {"Color": " ".join(_number(c) for c in seg.color), "ColorAutoGenerated": "0",
                  "Extent": _extent(seg.mask), "ID": seg.id, "LabelValue": "1", "Layer": str(index),
                  "Name": seg.name, "NameAutoGenerated": "0", "Tags": ""}
        lines += [f"Segment{index}_{key}:={_field(value)}" for key, value in fields.items()]
    lines += ["Segmentation_ContainedRepresentationNames:=Binary labelmap|Closed surface|",
              "Segmentation_MasterRepresentation:=Binary labelmap",
              "Segmentation_ReferenceImageExtentOffset:=0 0 0"]
    header = ("\n".join(lines) + "\n\n").encode("utf-8")
    # NRRD's first axis varies fastest: segment, then i, j, k (Fortran order of (N, i, j, k))
    raw = (layers[0] if len(segments) == 1 else layers).tobytes(order="F")
    return header + gzip.compress(raw, compresslevel=compresslevel, mtime=0)
