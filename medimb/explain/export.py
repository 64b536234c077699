"""Bring attention maps back to the source scan's grid and write them as NIfTI overlays.

The evaluation transforms (``medimb.data.transforms.build_eval_transforms``) record every spatial
operation (orientation, spacing, crop/pad) on the image's MetaTensor; ``monai.transforms.Invertd``
replays them backwards on the map, so the map lands voxel for voxel on the source file's grid. The
file is then written with the *source file's own header* (qform and sform copied; free-text fields and
extensions left out), so any reader, 3D Slicer included, places it exactly where it places the source.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from medimb.atomic import atomic_output
from medimb.explain.settings import DEFAULT_THRESHOLD

#: maps are in [0, 1]; the label map / Dice region is ``map >= DEFAULT_THRESHOLD``

#: NIfTI header fields where converters put free text (acquisition times, names): never copied into outputs
FREE_TEXT_FIELDS = ("descrip", "aux_file", "db_name", "intent_name", "data_type")


def strip_free_text(header) -> None:
    """Empty a NIfTI header's free-text fields and drop its extensions, in place (geometry untouched)."""
    for field in FREE_TEXT_FIELDS:
        if field in header:
            header[field] = b""
    header.extensions.clear()


def invert_to_source(heat: torch.Tensor, data: dict, transform, key: str = "image") -> np.ndarray:
    """Undo the preprocessing spatial transforms on a map.

    Args:
        heat: ``(1, *S)`` map on the network-input grid (one channel, no batch axis).
        data: the preprocessed dict whose ``data[key]`` MetaTensor carries ``applied_operations``.
        transform: the (invertible) MONAI transform that produced ``data``.
    Returns:
        ``(*S_src)`` float32 array on the source file's voxel grid, trilinear (not nearest) resampling.
    """
    image = data[key]
    if not isinstance(image, MetaTensor):
        raise TypeError("the preprocessed image must be a MetaTensor that tracks its transforms")
    pred = MetaTensor(torch.as_tensor(heat).detach().float().cpu())
    inverter = Invertd(keys="heat", transform=transform, orig_keys=key, nearest_interp=False)
    inverted = inverter({key: image, "heat": pred})["heat"]
    array = np.asarray(torch.as_tensor(inverted).detach().cpu().numpy(), dtype=np.float32)
    return array[0] if array.ndim == 4 else array


def forward_to_network_grid(source_path: str | os.PathLike, preprocessing) -> torch.Tensor:
    """Push a source-grid volume (e.g. a lesion mask) through the *geometric* part of a checkpoint's
    preprocessing (orientation, spacing, crop/pad; no intensity scaling), bilinear.

    It lands voxel for voxel where the scan's network input is, so it can stand in for an attention
    map: an oracle that :func:`invert_to_source` must bring back onto the source (localisation
    benchmark sanity row, geometry tests). ``preprocessing``: a ``Preprocessing`` or its dict.
    Returns ``(1, *S_net)`` float32.
    """
    from medimb.data.transforms import Preprocessing, build_eval_transforms

    pre = preprocessing if isinstance(preprocessing, dict) else preprocessing.to_dict()
    geometry = build_eval_transforms(Preprocessing.from_dict({**pre, "in_channels": 1, "intensity": "none"}))
    return geometry({"image": [str(source_path)]})["image"].as_tensor().float()


def source_shape(source_path: str | os.PathLike) -> tuple[int, ...]:
    """Spatial shape of a NIfTI file (trailing singleton axes dropped)."""
    shape = tuple(nib.load(str(source_path)).shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape[:3]


def _write_like(path: Path, array: np.ndarray, source_path, dtype, display_range=(0.0, 1.0)) -> None:
    source = nib.load(str(source_path))
    expected = source_shape(source_path)
    if tuple(array.shape) != expected:
        raise ValueError(f"map shape {tuple(array.shape)} does not match the source grid {expected}")
    header = source.header.copy()
    strip_free_text(header)  # a converter's free text (e.g. an acquisition time) stays in the source
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    header.set_data_shape(expected)
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), None, header=header)
    # nibabel rebuilds qform/sform from the header we copied; make that explicit and unchanged
    image.set_qform(source.get_qform(), code=int(source.header["qform_code"]))
    image.set_sform(source.get_sform(), code=int(source.header["sform_code"]))
    image.header["cal_min"], image.header["cal_max"] = display_range if display_range is not None else (0, 0)
    with atomic_output(path, suffix=".part.nii.gz") as tmp:
        nib.save(image, tmp)


def write_heatmap(path: str | os.PathLike, heat: np.ndarray, source_path: str | os.PathLike) -> None:
    """Write a ``(*S_src)`` map as float32 ``.nii.gz`` with the source's affine, shape and header."""
    _write_like(Path(path), np.clip(heat, 0.0, 1.0), source_path, np.float32)


def threshold_region(heat: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """``(*S)`` map in [0, 1] -> uint8 mask, 1 where ``heat >= threshold``."""
    return (np.asarray(heat) >= threshold).astype(np.uint8)


def write_label(path: str | os.PathLike, mask: np.ndarray, source_path: str | os.PathLike) -> None:
    """Write a ``(*S_src)`` 0/1 mask as a uint8 label map on the source grid."""
    _write_like(Path(path), mask.astype(np.uint8), source_path, np.uint8)


def write_volume(path: str | os.PathLike, volume: np.ndarray, source_path: str | os.PathLike) -> None:
    """Write a ``(*S_src)`` image (e.g. the subtraction background) as float32 on the source grid, with no
    display range (viewers choose their own window)."""
    _write_like(Path(path), np.asarray(volume, dtype=np.float32), source_path, np.float32, display_range=None)


def load_on_grid(path: str | os.PathLike, reference_path: str | os.PathLike, order: int = 1) -> np.ndarray:
    """The ``(*S_ref)`` float32 voxels of the 3D NIfTI ``path`` on ``reference_path``'s grid: the file's own
    voxels when it shares the grid (shape and affine), else resampled (``order`` 1: linear, 0: nearest, for
    masks) with ``nibabel.processing``, 0 outside the file's field of view."""
    image, reference = nib.load(str(path)), nib.load(str(reference_path))
    shape = source_shape(reference_path)
    if source_shape(path) == shape and np.allclose(image.affine, reference.affine, atol=1e-3):
        return np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    from nibabel.processing import resample_from_to

    data = np.asarray(image.dataobj, dtype=np.float32).reshape(source_shape(path))
    resampled = resample_from_to(nib.Nifti1Image(data, image.affine), (shape, reference.affine), order=order,
                                 mode="constant", cval=0.0)
    return np.asarray(resampled.dataobj, dtype=np.float32)


def background_volume(sources: list[str], channels: tuple[int, ...]) -> np.ndarray:
    """The background on the first channel's grid (the grid of every overlay): channel ``channels[0]``, or
    for ``channels == (post, pre)`` the subtraction ``post - pre``
    (:func:`medimb.explain.settings.background_channels`)."""
    reference = sources[0]
    volume = load_on_grid(sources[channels[0]], reference)
    if len(channels) == 2:
        volume = volume - load_on_grid(sources[channels[1]], reference)
    return volume
