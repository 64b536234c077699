"""Pixel decoding and volume assembly.

pydicom decodes every transfer syntax we meet (native little/big endian, RLE via pylibjpeg-rle,
JPEG lossless / JPEG-LS via pylibjpeg-libjpeg or gdcm, JPEG 2000 via pylibjpeg-openjpeg); each file is
read once, and only the frames the plan needs are kept. Rescale slope/intercept are kept exact:
when they are the same for every slice the raw integers are stored with NIfTI ``scl_slope`` /
``scl_inter`` (as dcm2niix does); when they vary per slice the volume is stored as float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pydicom

from data_prep.headers import Frame
from data_prep.mosaic import tile_of


#: NIfTI's RGB24 voxel (datatype 128): what colour DICOM images become
RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])


class PixelError(RuntimeError):
    """Pixel data that cannot be decoded; carries the archive-relative path."""

    def __init__(self, path: str, detail: str):
        super().__init__(detail)
        self.path = path
        self.detail = detail


@dataclass
class Volume:
    """``data`` (cols, rows, slices[, phases]) raw pixels (index i, j, k as in :mod:`data_prep.geometry`),
    stored values = ``data * slope + inter``."""

    data: np.ndarray
    slope: float
    inter: float

    def scaled(self) -> np.ndarray:
        """float32 physical values, same shape as ``data``."""
        return (self.data.astype(np.float32) * np.float32(self.slope) + np.float32(self.inter)).astype(np.float32)


def read_frames(root: str, frames: list[list[Frame]]) -> list[np.ndarray]:
    """Decode the frames of several phases, opening each file once.

    ``frames[p][k]`` is slice k of phase p; returns per phase an array (slices, rows, cols) in the
    DICOM pixel dtype.
    """
    by_file: dict[str, list[tuple[int, int, int | None]]] = {}
    for p, phase in enumerate(frames):
        for k, f in enumerate(phase):
            by_file.setdefault(f.path, []).append((p, k, f.frame))
    out: list[np.ndarray | None] = [None] * len(frames)
    for path, wanted in by_file.items():
        full = os.path.join(root, path)
        layout = frames[wanted[0][0]][wanted[0][1]].pixel
        if layout and len(wanted) == 1 and _read_into(full, layout, frames, out, *wanted[0]):
            continue
        try:
            arr = _read_native(full, layout) if layout else _read_pydicom(full)
        except Exception as exc:  # codecs raise many types
            raise PixelError(path, f"{type(exc).__name__}: {str(exc)[:120]}") from exc
        for p, k, fr in wanted:
            image = arr[fr or 0]
            tile = frames[p][k].tile
            if tile is not None:  # Siemens mosaic: the frame is one tile of the grid
                image = tile_of(image, *tile)
            if out[p] is None:
                # native byte order: big-endian files decode to '>u2', which the NIfTI writer must not see
                out[p] = np.empty((len(frames[p]),) + image.shape, dtype=arr.dtype.newbyteorder("="))
            elif np.promote_types(out[p].dtype, image.dtype) != out[p].dtype:
                # images of one series stored differently (signed and unsigned, 8 and 16 bits): a type that
                # holds both, never a silent wrap-around (int16 -56 assigned to uint16 would be 65480)
                out[p] = out[p].astype(np.promote_types(out[p].dtype, image.dtype))
            out[p][k] = image
        del arr
    return out  # type: ignore[return-value]


def _read_into(full: str, layout: tuple, frames, out, p: int, k: int, fr) -> bool:
    """The common case, read without an intermediate array: one uncompressed native-endian image,
    straight into slice ``k`` of phase ``p``. False when the case is not that one (the caller then
    reads the file the general way, which also reports any error)."""
    start, dtype, stored, rows, cols, n_frames = layout
    dt = np.dtype(dtype)
    if n_frames != 1 or fr not in (None, 0) or frames[p][k].tile is not None or not dt.isnative:
        return False
    if out[p] is None:
        out[p] = np.empty((len(frames[p]), rows, cols), dtype=dt)
    target = out[p][k]
    if target.dtype != dt or target.shape != (rows, cols):
        return False
    try:
        with open(full, "rb") as fh:
            fh.seek(start)
            got = fh.readinto(memoryview(target).cast("B"))
    except OSError:
        return False
    if got != target.nbytes:
        return False
    bits = dt.itemsize * 8
    if dt.kind == "u" and stored < bits:  # as pydicom's pixel_array: unsigned values masked to BitsStored
        target &= np.array((1 << stored) - 1, dtype=dt)
    return True


def _read_pydicom(full: str) -> np.ndarray:
    """Any transfer syntax through pydicom's decoders; (frames, rows, cols)."""
    ds = pydicom.dcmread(full)
    arr = ds.pixel_array  # colour: (frames,) rows, cols, 3 in RGB (pydicom converts YBR)
    colour = int(ds.get("SamplesPerPixel") or 1) > 1
    if int(ds.get("NumberOfFrames") or 1) == 1 and arr.ndim == (3 if colour else 2):
        arr = arr[None]
    return arr


def _read_native(full: str, layout: tuple) -> np.ndarray:
    """Uncompressed pixels straight from the offset the scan found (no second header parse);
    unsigned values are masked to BitsStored exactly as pydicom's ``pixel_array`` does."""
    start, dtype, stored, ds_rows, ds_cols, n_frames = layout
    count = ds_rows * ds_cols * n_frames
    arr = np.fromfile(full, dtype=np.dtype(dtype), count=count, offset=start)
    if arr.size != count:
        raise ValueError(f"pixel data holds {arr.size} values, expected {count}")
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False).reshape(n_frames, ds_rows, ds_cols)
    bits = arr.dtype.itemsize * 8
    if arr.dtype.kind == "u" and stored < bits:
        arr &= np.array((1 << stored) - 1, dtype=arr.dtype)
    return arr


def to_volume(stacks: list[np.ndarray], frames: list[list[Frame]]) -> Volume:
    """Stack phases (slices, rows, cols) into ``(cols, rows, slices[, phases])`` with one scaling.

    The transpose is a view, so writing in Fortran order needs no copy.
    """
    data = np.stack(stacks, axis=0) if len(stacks) > 1 else stacks[0][None]  # (P, K, rows, cols[, 3])
    if data.ndim == 5:  # colour: one RGB24 triple per voxel, no rescaling (as dcm2niix writes it)
        arr = np.ascontiguousarray(data, dtype=np.uint8).view(RGB24)[..., 0].transpose(3, 2, 1, 0)
        return Volume(arr[..., 0] if arr.shape[3] == 1 else arr, 1.0, 0.0)
    slopes = np.array([f.slope for phase in frames for f in phase])
    inters = np.array([f.inter for phase in frames for f in phase])
    if np.ptp(slopes) == 0 and np.ptp(inters) == 0:
        slope, inter = float(slopes[0]), float(inters[0])
        if data.dtype == np.uint16 and data.size and int(data.max()) <= np.iinfo(np.int16).max:
            data = data.astype(np.int16)  # like dcm2niix: signed when the range allows
    else:
        scale = slopes.reshape(data.shape[0], data.shape[1], 1, 1)
        offset = inters.reshape(data.shape[0], data.shape[1], 1, 1)
        data = (data.astype(np.float64) * scale + offset).astype(np.float32)
        slope, inter = 1.0, 0.0
    arr = data.transpose(3, 2, 1, 0)  # (cols, rows, slices, phases)
    if arr.shape[3] == 1:
        arr = arr[..., 0]
    return Volume(arr, slope, inter)
