"""Cheap input checks shared by the losses: clear errors instead of silent NaN or index errors."""

from __future__ import annotations

import torch


def check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    """Validate ``logits (B, K)`` and integer ``labels (B,)`` in ``[0, K)``; raise ``ValueError`` otherwise."""
    if logits.ndim != 2:
        raise ValueError(f"{name}: logits must be (B, K), got shape {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{name}: labels must be (B,) = ({logits.shape[0]},), got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be integer class indices, got dtype {labels.dtype}")
    num_classes = logits.shape[1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)].unique().tolist()
        raise ValueError(f"{name}: label(s) {bad} outside the class range [0, {num_classes - 1}]")
    check_finite(logits, name, "logits")


def check_finite(tensor: torch.Tensor, name: str, what: str) -> None:
    """Raise ``ValueError`` when ``tensor`` holds NaN or Inf (diverged training or corrupt input)."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name}: {what} contain NaN or Inf (diverged training? try a lower learning rate)")
