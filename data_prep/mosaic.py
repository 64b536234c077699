"""Siemens mosaic images: one 2D DICOM image that holds a whole 3D volume as a grid of tiles.

Siemens (syngo MR VB/VD/VE) stores EPI volumes (fMRI, DWI) as *mosaics*: ImageType contains
``MOSAIC`` and the private Siemens CSA image header, element ``(0029,1010)`` of the
``SIEMENS CSA HEADER`` private block, gives ``NumberOfImagesInMosaic`` and ``SliceNormalVector``.
The ``n`` slices are laid out row by row in a square grid of ``ceil(sqrt(n))`` tiles per side
(unused tiles at the end are blank). This module reads that layout, cuts the tiles out and gives
each tile the position of a normal 2D image, as dcm2niix (v1.0.20260724, ``xform_mat`` /
``set_nii_header_x`` in ``nii_dicom.cpp``) and nibabel (``MosaicWrapper``) do, so that the tiles go
through :mod:`data_prep.geometry` (sorting, spacing checks, affine) like any single-slice series.

Conventions are those of :mod:`data_prep.geometry`:

* positions and vectors are DICOM patient coordinates, **LPS** mm;
* ``ImageOrientationPatient`` = ``(r, c)``: ``r`` along a row (increasing column index), ``c``
  along a column (increasing row index); ``PixelSpacing`` = ``(row spacing, column spacing)``;
* pixel arrays are pydicom's ``pixel_array`` orientation, ``(rows, cols)``.

Siemens-specific facts used here (all checked against dcm2niix on the dcm_qa mosaics):

* the mosaic's ImagePositionPatient is the corner of the *whole* mosaic grid as if it were one
  big image centred on the slice centre; the first voxel of every tile lies
  ``r * Δcol * (cols - tile_cols) / 2 + c * Δrow * (rows - tile_rows) / 2`` further;
* tile ``i`` lies ``i * slice_spacing`` along the slice normal. The normal is ``r x c`` with the
  sign of the CSA ``SliceNormalVector`` (Siemens sagittal mosaics run along ``-(r x c)``); the
  CSA normal must be parallel to ``r x c``;
* the slice spacing is SpacingBetweenSlices when it is positive, else SliceThickness (what
  dcm2niix uses; it falls back to 1 mm when both are missing, we refuse).

Not covered: Siemens XA (syngo MR XA10 and later) files. The shared test data holds none (its
mosaics are all syngo MR B17), so nothing about how XA stores slices is assumed here; a file whose
ImageType says MOSAIC but that has no CSA image header is refused by :func:`mosaic_layout`, never
read as one huge 2D slice.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np


def _csareader():
    """nibabel's CSA reader, imported on first use (only Siemens CSA headers need it: the main
    process of a conversion never imports nibabel)."""
    with warnings.catch_warnings():  # nibabel.nicom warns on import that its DICOM *readers* are experimental
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import csareader
    return csareader


#: the CSA image header is element 0x10 of the ``SIEMENS CSA HEADER`` private block of group 0x0029
CSA_GROUP, CSA_CREATOR, CSA_IMAGE_ELEMENT = 0x0029, "SIEMENS CSA HEADER", 0x10
#: its usual tag, with the private creator at (0029,0010); see :func:`csa_image_bytes` for the general case
CSA_IMAGE_TAG = 0x00291010
#: the CSA SliceNormalVector must be a unit vector, and parallel to ``r x c``, within this tolerance
NORMAL_TOL = 1e-2


class MosaicError(ValueError):
    """A mosaic whose CSA header or sizes cannot be right. ``reason`` is a report code
    (``invalid_value`` for the header and sizes, ``invalid_geometry`` for the slice normal), ``detail``
    names the attribute, never its value (same shape as :class:`data_prep.headers.InvalidHeader`)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class MosaicLayout:
    """How a mosaic image of ``(rows, cols)`` pixels holds ``n_images`` tiles.

    ``tiles_per_side`` = ``ceil(sqrt(n_images))`` tiles in each direction, each ``(tile_rows,
    tile_cols)`` pixels; ``slice_normal`` (3,) is the unit CSA SliceNormalVector (LPS), the
    direction in which tile ``i + 1`` follows tile ``i``.
    """

    n_images: int
    tiles_per_side: int
    tile_rows: int
    tile_cols: int
    slice_normal: tuple[float, float, float]


def is_mosaic_type(image_type) -> bool:
    """True when ImageType (a ``\\``-separated string or a sequence of strings) contains MOSAIC."""
    if image_type is None:
        return False
    values = image_type.split("\\") if isinstance(image_type, str) else image_type
    return any(str(v).strip().upper() == "MOSAIC" for v in values)


def csa_image_bytes(ds) -> bytes | None:
    """The raw CSA image header of a pydicom Dataset, found through its private creator
    ``SIEMENS CSA HEADER`` (usually at ``(0029,1010)``); None when absent."""
    try:
        block = ds.private_block(CSA_GROUP, CSA_CREATOR)
        value = block[CSA_IMAGE_ELEMENT].value
    except (KeyError, ValueError):
        return None
    return bytes(value) if value else None


def mosaic_layout(image_type, csa_image_bytes: bytes | None, rows: int, cols: int) -> MosaicLayout | None:
    """The tile layout of a Siemens mosaic, or None when the image is not a mosaic.

    ``image_type`` is ImageType (string or sequence), ``csa_image_bytes`` the raw value of the CSA
    image header (see :func:`csa_image_bytes`), ``rows``/``cols`` the size of the whole mosaic image.
    Returns None when ImageType does not contain MOSAIC. Raises :class:`MosaicError` when it does
    but the CSA header is absent, cannot be parsed, lacks NumberOfImagesInMosaic or
    SliceNormalVector, or does not fit the image (``rows``/``cols`` not divisible by the number of
    tiles per side): such an image must not be read as one huge 2D slice.
    """
    if not is_mosaic_type(image_type):
        return None
    if not csa_image_bytes:
        raise MosaicError("invalid_value", "ImageType is MOSAIC but the Siemens CSA image header (0029,1010) "
                                           "is absent, so the number of slices is unknown")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tags = _csareader().read(bytes(csa_image_bytes))["tags"]
    except Exception as exc:  # struct.error, CSAReadError, AssertionError, converter ValueError, ...
        raise MosaicError("invalid_value", f"the Siemens CSA image header (0029,1010) is damaged "
                                           f"({type(exc).__name__})") from None
    n = _csa_int(tags, "NumberOfImagesInMosaic")
    if n is None or n < 1:
        raise MosaicError("invalid_value", "CSA NumberOfImagesInMosaic is missing or not a positive integer")
    side = math.isqrt(n - 1) + 1  # ceil(sqrt(n)) without floating point
    if rows < side or cols < side or rows % side or cols % side:
        raise MosaicError("invalid_value", "Rows/Columns are not a multiple of the number of tiles per side "
                                           "that CSA NumberOfImagesInMosaic implies")
    return MosaicLayout(n, side, rows // side, cols // side, _csa_normal(tags))


def _csa_items(tags: dict, name: str) -> list:
    tag = tags.get(name)
    return list(tag.get("items") or []) if isinstance(tag, dict) else []


def _csa_int(tags: dict, name: str) -> int | None:
    items = _csa_items(tags, name)
    if len(items) != 1:
        return None
    try:
        f = float(items[0])
    except (TypeError, ValueError):
        return None
    return int(f) if math.isfinite(f) and f == int(f) else None


def _csa_normal(tags: dict) -> tuple[float, float, float]:
    """The CSA SliceNormalVector as a unit (3,) tuple (LPS); a missing, NaN or non-unit vector raises."""
    items = _csa_items(tags, "SliceNormalVector")
    try:
        v = np.array([float(x) for x in items], dtype=float)
    except (TypeError, ValueError):
        v = np.array([np.nan])
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise MosaicError("invalid_geometry", "CSA SliceNormalVector is missing or not 3 finite numbers")
    norm = float(np.linalg.norm(v))
    if abs(norm - 1.0) > NORMAL_TOL:
        raise MosaicError("invalid_geometry", "CSA SliceNormalVector is not a unit vector")
    return tuple(float(x) for x in v / norm)


def spacing_between_tiles(spacing_between_slices, slice_thickness) -> float:
    """Distance (mm) between neighbouring tiles: SpacingBetweenSlices when positive, else
    SliceThickness (dcm2niix's choice for mosaics; it uses SpacingBetweenSlices even when it is
    smaller than the thickness). Raises :class:`MosaicError` when neither is a positive number."""
    for value in (spacing_between_slices, slice_thickness):
        try:
            f = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f) and f > 0:
            return f
    raise MosaicError("invalid_geometry", "neither SpacingBetweenSlices nor SliceThickness is a positive "
                                          "number, so the mosaic's slice spacing is unknown")


def tile_positions(layout: MosaicLayout, image_position, orientation, pixel_spacing,
                   slice_spacing: float) -> np.ndarray:
    """ImagePositionPatient (LPS mm) of the first voxel of every tile, shape ``(n_images, 3)``.

    ``image_position`` (3,) is the mosaic's ImagePositionPatient, ``orientation`` (6,) its
    ImageOrientationPatient ``(r, c)``, ``pixel_spacing`` ``(row spacing, column spacing)`` and
    ``slice_spacing`` the tile-to-tile distance (see :func:`spacing_between_tiles`). Tile ``i`` (in
    mosaic order, as :func:`demosaic` returns them) lies at
    ``p0 + i * slice_spacing * s * (r x c)``, where ``p0`` is the mosaic position moved from the
    grid's corner to the first tile's corner,
    ``p0 = position + r * Δcol * (cols - tile_cols) / 2 + c * Δrow * (rows - tile_rows) / 2``,
    and ``s = ±1`` is the sign of the CSA SliceNormalVector along ``r x c``. Raises
    :class:`MosaicError` (``invalid_geometry``) when the CSA normal is not parallel to ``r x c``.
    """
    o = np.asarray(orientation, dtype=float).reshape(6)
    r, c = o[:3], o[3:]
    dr, dc = (float(v) for v in pixel_spacing)
    rc = np.cross(r, c)
    norm = float(np.linalg.norm(rc))
    if norm < 1e-6:
        raise MosaicError("invalid_geometry", "ImageOrientationPatient row and column are parallel")
    rc /= norm
    csa = np.asarray(layout.slice_normal, dtype=float)
    cos = float(csa @ rc)
    if abs(cos) < 1.0 - NORMAL_TOL:
        raise MosaicError("invalid_geometry", "CSA SliceNormalVector is not perpendicular to the "
                                              "ImageOrientationPatient plane")
    side = layout.tiles_per_side
    rows, cols = layout.tile_rows * side, layout.tile_cols * side
    first = (np.asarray(image_position, dtype=float).reshape(3)
             + r * dc * (cols - layout.tile_cols) / 2.0
             + c * dr * (rows - layout.tile_rows) / 2.0)
    step = math.copysign(float(slice_spacing), cos) * rc
    return first + np.arange(layout.n_images, dtype=float)[:, None] * step


def tile_of(image: np.ndarray, index: int, tiles_per_side: int, tile_rows: int, tile_cols: int) -> np.ndarray:
    """Tile ``index`` of a mosaic ``(rows, cols)``: a ``(tile_rows, tile_cols)`` view (no copy)."""
    r0, c0 = (index // tiles_per_side) * tile_rows, (index % tiles_per_side) * tile_cols
    return image[r0:r0 + tile_rows, c0:c0 + tile_cols]


def demosaic(image: np.ndarray, layout: MosaicLayout) -> np.ndarray:
    """Cut a mosaic ``(rows, cols)`` (pydicom ``pixel_array`` orientation) into its tiles,
    ``(n_images, tile_rows, tile_cols)``, same dtype.

    Tile ``i`` is the block at grid row ``i // tiles_per_side`` and grid column
    ``i % tiles_per_side``. The grid is a reshaped view of ``image``; the only copy is of the
    ``n_images`` tiles kept (blank padding tiles are never copied).
    """
    side, tr, tc = layout.tiles_per_side, layout.tile_rows, layout.tile_cols
    if image.shape != (side * tr, side * tc):
        raise MosaicError("invalid_value", "the pixel data's shape does not match the mosaic layout")
    grid = image.reshape(side, tr, side, tc).swapaxes(1, 2)  # (grid row, grid col, tile row, tile col)
    i = np.arange(layout.n_images)
    return grid[i // side, i % side]
