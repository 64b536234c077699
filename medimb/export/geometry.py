"""Put a volume on the source DICOM series' frames: one ``(rows, cols)`` frame per source instance.

Conventions (as in :mod:`data_prep.geometry`): DICOM patient coordinates are LPS mm; the NIfTI affine maps
voxel ``(i, j, k)`` to RAS mm. ``ImageOrientationPatient = (r, c)``: ``r`` is the direction of increasing
column index, ``c`` of increasing row index; ``PixelSpacing = (row spacing, column spacing)``. Pixel
``(row y, col x)`` of an instance sits at ``ImagePositionPatient + x * col_spacing * r + y * row_spacing * c``.

The overlay NIfTI was written on the converted scan's grid, which the converter built from these same
instances, so every source pixel centre falls on a voxel centre: we *gather* the voxels (no resampling, the
values are the map's own) and refuse a series whose pixels do not land on voxel centres.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medimb.errors import UserError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: how far (in voxels) a source pixel centre may be from a voxel centre (DS rounding, float32 affines)
GRID_TOLERANCE = 0.05


def _integral(values: np.ndarray, what: str, tol: float) -> np.ndarray:
    rounded = np.round(values)
    off = float(np.max(np.abs(values - rounded)))
    if off > tol:
        raise UserError(f"the map's grid does not match the source series ({what} is {off:.2f} voxel off a "
                        "voxel centre): was the overlay made from this series?")
    return rounded.astype(np.int64)


def voxel_indices(frame, affine_ras: np.ndarray, shape: Sequence[int], tol: float = GRID_TOLERANCE) -> np.ndarray:
    """``(3, rows, cols)`` int voxel indices ``(i, j, k)`` of a source frame's pixel centres
    (:class:`medimb.export.sources.SourceFrame`) in a volume of ``shape`` with ``affine_ras`` (4, 4);
    :class:`UserError` when they are off voxel centres or outside."""
    position, (rows, cols) = frame.position, frame.shape
    r, c = frame.orientation[:3], frame.orientation[3:]
    row_sp, col_sp = frame.spacing
    to_voxel = np.linalg.inv(np.asarray(affine_ras, dtype=float)) @ LPS_TO_RAS
    base = _integral(to_voxel[:3, :3] @ position + to_voxel[:3, 3], "the first pixel", tol)
    step_col = _integral(to_voxel[:3, :3] @ (r * col_sp), "the column step", tol)
    step_row = _integral(to_voxel[:3, :3] @ (c * row_sp), "the row step", tol)
    y, x = np.mgrid[0:rows, 0:cols]
    ijk = base[:, None, None] + step_col[:, None, None] * x + step_row[:, None, None] * y
    upper = np.asarray(shape[:3])[:, None, None]
    if (ijk < 0).any() or (ijk >= upper).any():
        raise UserError(f"source frame {frame.key} lies (partly) outside the map's grid "
                        f"{tuple(shape[:3])}: was the overlay made from this series?")
    return ijk


def volume_to_frames(volume: np.ndarray, affine_ras: np.ndarray, frames: Sequence,
                     tol: float = GRID_TOLERANCE) -> np.ndarray:
    """The ``(N, rows, cols)`` frames of a ``(I, J, K)`` volume (NIfTI voxel order, RAS ``affine_ras``) at the
    pixel centres of the N source ``frames`` (:class:`medimb.export.sources.SourceFrame`), frame n for
    ``frames[n]``."""
    volume = np.asarray(volume)
    out = []
    for frame in frames:
        i, j, k = voxel_indices(frame, affine_ras, volume.shape, tol)
        out.append(volume[i, j, k])
    return np.stack(out)
