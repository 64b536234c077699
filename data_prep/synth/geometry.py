"""Scanner geometry of a synthetic series: DICOM LPS frame, voxel grid, and the NIfTI RAS affine.

Conventions (the same as dcm2niix and the converter):

- DICOM patient coordinates are **LPS** (x to the patient's left, y posterior, z head).
  NIfTI world coordinates are **RAS**; ``RAS = diag(-1, -1, 1) @ LPS``.
- Phantom arrays are indexed ``[k, j, i]`` = ``(slice, row, column)``, shape ``(Z, Y, X)``.
  Column index ``i`` moves along ``row_dir`` (ImageOrientationPatient[:3]) by ``PixelSpacing[1]``,
  row index ``j`` along ``col_dir`` (ImageOrientationPatient[3:]) by ``PixelSpacing[0]``, slice index
  ``k`` along ``normal = row_dir x col_dir`` by ``slice_step`` from ``origin`` (the
  ImagePositionPatient of slice 0).
- A NIfTI image made from such an array is stored with axes ``(i, j, k)``, i.e. the array transposed
  to ``(X, Y, Z)``, and :meth:`SeriesGeometry.affine_ras` maps ``(i, j, k, 1)`` to RAS mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: LPS -> RAS (and back: the matrix is its own inverse)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# DICOM DS values hold at most 16 characters: direction cosines and positions are written rounded,
# and the geometry below is computed from the rounded values so file headers and masks agree exactly.
_COSINE_DECIMALS = 6
_POSITION_DECIMALS = 4


@dataclass(frozen=True)
class SeriesGeometry:
    """Voxel grid of one 3D series in DICOM patient space (LPS, mm)."""

    shape: tuple[int, int, int]  # (Z, Y, X) = (slices, rows, columns)
    row_dir: np.ndarray  # (3,) unit vector, ImageOrientationPatient[:3]
    col_dir: np.ndarray  # (3,) unit vector, ImageOrientationPatient[3:]
    pixel_spacing: tuple[float, float]  # DICOM order: (row spacing, column spacing) = (dy, dx) mm
    slice_step: float  # mm between slice centres along ``normal``
    origin: np.ndarray  # (3,) LPS mm, ImagePositionPatient of slice 0

    @property
    def normal(self) -> np.ndarray:
        """(3,) slice normal ``row_dir x col_dir``; slice ``k`` lies at ``origin + k * slice_step * normal``."""
        return np.cross(self.row_dir, self.col_dir)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array axes ``(Z, Y, X)``."""
        return (self.slice_step, self.pixel_spacing[0], self.pixel_spacing[1])

    @property
    def image_orientation(self) -> list[float]:
        """ImageOrientationPatient (6 direction cosines)."""
        return [float(v) for v in np.concatenate([self.row_dir, self.col_dir])]

    @property
    def is_oblique(self) -> bool:
        return not np.allclose(np.abs(self.image_orientation), [1, 0, 0, 0, 1, 0], atol=1e-6)

    def slice_position(self, k: int) -> list[float]:
        """ImagePositionPatient of slice ``k`` (LPS mm), rounded as written to the header."""
        pos = self.origin + k * self.slice_step * self.normal
        return [float(v) for v in np.round(pos, _POSITION_DECIMALS)]

    def affine_lps(self) -> np.ndarray:
        """(4, 4) map from voxel ``(i, j, k, 1)`` = (column, row, slice) to LPS mm."""
        dy, dx = self.pixel_spacing
        affine = np.eye(4)
        affine[:3, 0] = self.row_dir * dx
        affine[:3, 1] = self.col_dir * dy
        affine[:3, 2] = self.normal * self.slice_step
        affine[:3, 3] = self.slice_position(0)
        return affine

    def affine_ras(self) -> np.ndarray:
        """(4, 4) NIfTI affine: voxel ``(i, j, k, 1)`` = (column, row, slice) to RAS mm."""
        return LPS_TO_RAS @ self.affine_lps()

    def zyx_to_ras(self, zyx: np.ndarray) -> np.ndarray:
        """Array indices ``(..., 3)`` in ``(k, j, i)`` order -> RAS mm ``(..., 3)``."""
        zyx = np.asarray(zyx, dtype=float)
        ijk1 = np.concatenate([zyx[..., ::-1], np.ones(zyx.shape[:-1] + (1,))], axis=-1)
        return (ijk1 @ self.affine_ras().T)[..., :3]


def rotation_matrix(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """(3, 3) right-handed rotation about ``axis`` by ``angle_deg`` (Rodrigues)."""
    axis = np.asarray(axis, dtype=float)
    axis = axis / np.linalg.norm(axis)
    a = np.deg2rad(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)


def make_geometry(
    shape: tuple[int, int, int],
    pixel_spacing: tuple[float, float],
    slice_step: float,
    centre_lps: np.ndarray,
    rotation: np.ndarray | None = None,
) -> SeriesGeometry:
    """An axial series (rows along +x, columns along +y in LPS), optionally rotated (oblique),
    whose field of view is centred on ``centre_lps``.

    Direction cosines are rounded to what the header can hold, then ``col_dir`` is re-orthogonalised
    to ``row_dir`` so the written orientation stays orthonormal to ~1e-6.
    """
    rot = np.eye(3) if rotation is None else np.asarray(rotation, dtype=float)
    row_dir = np.round(rot @ np.array([1.0, 0.0, 0.0]), _COSINE_DECIMALS)
    col_dir = np.round(rot @ np.array([0.0, 1.0, 0.0]), _COSINE_DECIMALS)
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir - row_dir * (row_dir @ col_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    # round once more so the header values are the geometry (normalising may add digits)
    row_dir = np.round(row_dir, _COSINE_DECIMALS)
    col_dir = np.round(col_dir, _COSINE_DECIMALS)
    nz, ny, nx = shape
    dy, dx = pixel_spacing
    normal = np.cross(row_dir, col_dir)
    half = (nx - 1) / 2 * dx * row_dir + (ny - 1) / 2 * dy * col_dir + (nz - 1) / 2 * slice_step * normal
    origin = np.round(np.asarray(centre_lps, dtype=float) - half, _POSITION_DECIMALS)
    return SeriesGeometry(
        shape=tuple(int(s) for s in shape),
        row_dir=row_dir,
        col_dir=col_dir,
        pixel_spacing=(float(dy), float(dx)),
        slice_step=float(slice_step),
        origin=origin,
    )
