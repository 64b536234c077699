"""MedMNIST ``.npz`` files (2D and 3D, 28 and 64) read from a path: nothing is downloaded.

Official splits are kept: ``train``, ``val``, ``test`` (keys ``<split>_images`` / ``<split>_labels``).
Images stay uint8 in memory; the transform pipeline scales them to float in [0, 1]
(note: AdrenalMNIST3D volumes are 0/255 shape masks, not intensities).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medimb.validation import check_finite, check_labels
from medimb.data.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ArraySplit:
    """One split: ``images`` (N, C, *S) uint8 channel-first, ``labels`` (N,) int64."""

    images: np.ndarray
    labels: np.ndarray


def _channel_first(images: np.ndarray, path: Path) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); (N, H, W, 3) RGB -> (N, 3, H, W); (N, D, H, W) -> (N, 1, D, H, W)."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] == 3 and images.shape[1] != 3:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    if images.ndim == 4:
        return images[:, None]
    raise DataError(f"{path}: unsupported MedMNIST image array shape {images.shape}")


def load_medmnist(path: str | Path, num_classes: int | None = None) -> dict[str, ArraySplit]:
    """Load a MedMNIST ``.npz`` file into ``{"train"|"val"|"test": ArraySplit}``.

    ``num_classes`` defaults to ``max(label) + 1`` over all splits. Labels are checked (range, >= 2 classes
    per split); multi-label files are rejected.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"MedMNIST file does not exist: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    with npz:
        missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in npz.files]
        if missing:
            raise DataError(f"{path}: not a MedMNIST file, missing arrays {missing}")
        raw = {s: (npz[f"{s}_images"], npz[f"{s}_labels"]) for s in SPLITS}
    for split, (images, labels) in raw.items():
        if labels.ndim == 2 and labels.shape[1] > 1:
            raise DataError(f"{path}: multi-label MedMNIST files are not supported ({split}_labels {labels.shape})")
        if len(images) != len(labels):
            raise DataError(f"{path}: {split} has {len(images)} images but {len(labels)} labels")
        check_finite(images, f"{path}: {split}_images", what="the array")
    if num_classes is None:
        num_classes = int(max(int(np.max(lab)) for _, lab in raw.values())) + 1
    return {
        split: ArraySplit(_channel_first(images, path), check_labels(labels, num_classes, split))
        for split, (images, labels) in raw.items()
    }
