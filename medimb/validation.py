"""The one validation module: checks of labels and tensors that fail early, with a message naming the problem.

Input data (a datalist's labels, an image's voxels) fails with :class:`~medimb.errors.DataError`, a one-line
user error; tensors inside the losses (logits, embeddings, labels of a batch) fail with ``ValueError``, a
programming or divergence error. The rules are written once, here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medimb.errors import DataError


def labels_outside(labels: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int) -> list[int]:
    """The distinct label values of ``labels`` (N,) outside ``[0, num_classes)``, sorted (empty when all fit)."""
    arr = torch.as_tensor(labels).reshape(-1)
    if not arr.numel():
        return []
    bad = arr[(arr < 0) | (arr >= num_classes)]
    return sorted(int(v) for v in bad.unique().tolist()) if bad.numel() else []


def check_labels(labels: Sequence[int] | np.ndarray, num_classes: int, split: str) -> np.ndarray:
    """Check that a data split's ``labels`` (N,) are integers in ``[0, num_classes)`` and hold >= 2 classes.

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
    if labels_outside(arr, num_classes):
        index = int(np.flatnonzero((arr < 0) | (arr >= num_classes))[0])
        raise DataError(f"split '{split}': label {int(arr[index])} (item {index}) is outside the class range "
                        f"0..{num_classes - 1}")
    present = np.unique(arr)
    if present.size < 2:
        raise DataError(
            f"split '{split}' contains only class {int(present[0])}: training and evaluation need at least two "
            "classes in every split"
        )
    return arr


def check_finite(values: torch.Tensor | np.ndarray, where: str, what: str = "image",
                 error: type[Exception] = DataError) -> None:
    """Raise ``error`` (default :class:`DataError`) naming ``where`` when floating ``values`` hold NaN or Inf."""
    t = torch.as_tensor(values)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        hint = "" if error is DataError else " (diverged training? try a lower learning rate)"
        raise error(f"{where}: {what} contains {n_nan} NaN and {n_inf} Inf values{hint}")


def check_channels(image: torch.Tensor, expected: int, where: str) -> None:
    """Raise :class:`DataError` if the channel-first ``image`` (C, *S) does not have ``expected`` channels."""
    if image.shape[0] != expected:
        raise DataError(f"{where}: image has {image.shape[0]} channels, expected {expected}")


def check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    """A loss's batch: ``logits (B, K)`` finite, integer ``labels (B,)`` in ``[0, K)``; ``ValueError`` otherwise."""
    if logits.ndim != 2:
        raise ValueError(f"{name}: logits must be (B, K), got shape {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{name}: labels must be (B,) = ({logits.shape[0]},), got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be integer class indices, got dtype {labels.dtype}")
    bad = labels_outside(labels, logits.shape[1])
    if bad:
        raise ValueError(f"{name}: label(s) {bad} outside the class range [0, {logits.shape[1] - 1}]")
    check_finite(logits, name, "logits", error=ValueError)
