"""Validation of labels and images before training: fail early with a message that names the problem."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medimb.data.errors import DataError


def check_labels(labels: Sequence[int] | np.ndarray, num_classes: int, split: str) -> np.ndarray:
    """Check that ``labels`` (N,) are integers in ``[0, num_classes)`` and that ``split`` has >= 2 classes.

    Returns the labels as an int64 array. Raises :class:`DataError` otherwise.
    """
    arr = np.asarray(labels)
    if arr.size == 0:
        raise DataError(f"split '{split}' is empty")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DataError(f"split '{split}' has non-integer labels")
    elif arr.dtype.kind not in "iub":
        raise DataError(f"split '{split}' has non-integer labels (dtype {arr.dtype})")
    arr = arr.astype(np.int64).reshape(-1)
    bad = np.flatnonzero((arr < 0) | (arr >= num_classes))
    if bad.size:
        raise DataError(
            f"split '{split}': label {int(arr[bad[0]])} (item {int(bad[0])}) is outside the class range "
            f"0..{num_classes - 1}"
        )
    present = np.unique(arr)
    if present.size < 2:
        raise DataError(
            f"split '{split}' contains only class {int(present[0])}: training and evaluation need at least two "
            "classes in every split"
        )
    return arr


def check_finite(image: torch.Tensor | np.ndarray, where: str) -> None:
    """Raise :class:`DataError` if ``image`` contains NaN or Inf (``where`` names the source)."""
    t = torch.as_tensor(image)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise DataError(f"{where}: image contains {n_nan} NaN and {n_inf} Inf values")


def check_channels(image: torch.Tensor, expected: int, where: str) -> None:
    """Raise :class:`DataError` if the channel-first ``image`` (C, *S) does not have ``expected`` channels."""
    if image.shape[0] != expected:
        raise DataError(f"{where}: image has {image.shape[0]} channels, expected {expected}")
