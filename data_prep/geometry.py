"""Slice geometry: sorting along the slice normal, spacing checks and the NIfTI affine.

Conventions (stated once, used everywhere in data_prep):

* DICOM patient coordinates are **LPS** (x to the patient's Left, y to Posterior, z to Superior), mm.
* ``ImageOrientationPatient`` = ``(r, c)``: ``r`` (3,) is the direction of increasing **column** index
  (along a row), ``c`` (3,) the direction of increasing **row** index. ``PixelSpacing`` =
  ``(row spacing, column spacing)`` = (distance between rows, distance between columns).
* The slice normal is ``n = r x c``; slices are sorted by ``dot(ImagePositionPatient, n)``, never by
  InstanceNumber or file name.
* Our NIfTI voxel index is ``(i, j, k)`` = (column, row, slice in ascending normal order), i.e. the
  pydicom ``pixel_array`` of shape ``(rows, cols)`` transposed. The affine maps ``(i, j, k, 1)`` to
  **RAS** mm (NIfTI world), i.e. the LPS affine with its first two rows negated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class GeometryError(ValueError):
    """A series whose slices do not form one regular volume; ``reason`` is a report code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def slice_normal(orientation) -> np.ndarray:
    """Unit normal ``r x c`` (3,) of an ImageOrientationPatient ``(6,)`` (LPS)."""
    o = np.asarray(orientation, dtype=float)
    n = np.cross(o[:3], o[3:])
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise GeometryError("invalid_orientation", "row and column directions are parallel")
    return n / norm


def orientation_key(orientation, decimals: int = 4) -> tuple:
    """Hashable, rounded orientation used to group slices of the same plane."""
    if isinstance(orientation, tuple):  # the slices of a series share theirs: computed once
        return _orientation_key(orientation, decimals)
    return tuple(np.round(np.asarray(orientation, dtype=float), decimals) + 0.0)


@functools.lru_cache(maxsize=1024)
def _orientation_key(orientation: tuple, decimals: int) -> tuple:
    return tuple(np.round(np.asarray(orientation, dtype=float), decimals) + 0.0)


@dataclass(frozen=True)
class SliceOrder:
    """Result of :func:`sort_slices`.

    ``order`` (N,) indexes the input slices in ascending position along the normal; ``distances``
    (N,) are the sorted positions in mm; ``step`` is the median spacing (0 for one slice).
    """

    order: np.ndarray
    distances: np.ndarray
    step: float


def sort_slices(positions, orientation, rel_tol: float = 0.05, abs_tol: float = 0.01) -> SliceOrder:
    """Sort slices by ``dot(position, normal)`` and check they form a regular volume.

    ``positions`` (N, 3) ImagePositionPatient in LPS mm; ``orientation`` (6,). Raises
    :class:`GeometryError` with reason ``duplicate_slice_position``, ``missing_slice`` (a gap that is
    a whole multiple of the usual spacing) or ``nonuniform_spacing``.
    """
    pos = np.asarray(positions, dtype=float).reshape(-1, 3)
    dist = pos @ slice_normal(orientation)
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    if len(dist) < 2:
        return SliceOrder(order, dist, 0.0)
    gaps = np.diff(dist)
    if np.any(gaps < abs_tol):
        n_dup = int(np.sum(gaps < abs_tol))
        raise GeometryError("duplicate_slice_position", f"{n_dup} slice(s) share a position along the normal")
    step = float(np.median(gaps))
    off = np.abs(gaps - step) > rel_tol * step + abs_tol
    if np.any(off):
        ratios = gaps[off] / step
        if np.all(np.abs(ratios - np.round(ratios)) < rel_tol) and np.all(np.round(ratios) >= 2):
            missing = int(np.sum(np.round(ratios) - 1))
            raise GeometryError(
                "missing_slice", f"{missing} slice(s) missing (gap of {gaps[off].max():.3g} mm, step {step:.3g} mm)"
            )
        raise GeometryError(
            "nonuniform_spacing", f"slice gaps range {gaps.min():.4g}-{gaps.max():.4g} mm (median {step:.4g})"
        )
    return SliceOrder(order, dist, step)


def affine_ras(first_position, last_position, orientation, pixel_spacing, n_slices: int,
               single_slice_spacing: float = 1.0) -> np.ndarray:
    """NIfTI affine (4, 4) in RAS mm for voxel index ``(i=column, j=row, k=slice)``.

    ``first_position``/``last_position`` are the ImagePositionPatient (LPS) of the first and last
    slice in sorted order; ``pixel_spacing`` is DICOM ``(row spacing, column spacing)``. The slice
    axis is ``(last - first) / (n - 1)``, which keeps the true through-plane vector; for one slice it
    is ``normal * single_slice_spacing`` (dcm2niix uses SpacingBetweenSlices, else SliceThickness).
    """
    o = np.asarray(orientation, dtype=float)
    row_dir, col_dir = o[:3], o[3:]
    dr, dc = (float(v) for v in pixel_spacing)
    first = np.asarray(first_position, dtype=float)
    if n_slices > 1:
        k_axis = (np.asarray(last_position, dtype=float) - first) / (n_slices - 1)
    else:
        k_axis = slice_normal(o) * float(single_slice_spacing)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dc  # i (column index) moves along the row direction by the column spacing
    lps[:3, 1] = col_dir * dr
    lps[:3, 2] = k_axis
    lps[:3, 3] = first
    return LPS_TO_RAS @ lps


def voxel_sizes(affine) -> np.ndarray:
    """Voxel edge lengths (3,) in mm of a (4, 4) affine."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
