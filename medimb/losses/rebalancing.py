"""Re-balancing baselines: (class-weighted) CE, focal, LDAM-DRW, balanced softmax / logit adjustment.

All take ``loss(logits (B, K), labels (B,))`` and return a scalar (``reduction="mean"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import FocalLoss as MonaiFocalLoss
from torch import nn

from medimb.validation import check_logits_labels

CLASS_WEIGHTINGS = ("inverse", "sqrt_inverse", "effective")


def _counts(class_counts: Sequence[int] | np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    counts = np.asarray(torch.as_tensor(class_counts).cpu(), dtype=np.float64).reshape(-1)
    if counts.size < 2:
        raise ValueError(f"{name}: class_counts needs one count per class (>= 2 classes), got {counts.tolist()}")
    if (counts <= 0).any():
        raise ValueError(
            f"{name}: every class needs at least one training sample, got counts {counts.astype(int).tolist()}"
        )
    return counts


def class_weights_from_counts(class_counts: Sequence[int], method: str = "inverse", beta: float = 0.9999) -> torch.Tensor:
    """Per-class loss weights ``(K,)`` from training counts, normalised to mean 1.

    ``"inverse"``: ``1/n_k``; ``"sqrt_inverse"``: ``1/sqrt(n_k)``; ``"effective"``: inverse effective
    number ``(1 - beta) / (1 - beta^n_k)`` (Cui et al., CVPR 2019; used by DRW).
    """
    counts = _counts(class_counts, "class_weights_from_counts")
    if method == "inverse":
        weights = 1.0 / counts
    elif method == "sqrt_inverse":
        weights = 1.0 / np.sqrt(counts)
    elif method == "effective":
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
    else:
        raise ValueError(f"method must be one of {CLASS_WEIGHTINGS}, got {method!r}")
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


class _WeightedLoss(nn.Module):
    """Holds optional per-class weights ``(K,)`` as a buffer that a schedule may replace."""

    def __init__(self, weight: torch.Tensor | Sequence[float] | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def set_class_weights(self, weight: torch.Tensor | Sequence[float] | None) -> None:
        """Replace the per-class weights (``None`` for unweighted), e.g. from :class:`DeferredReweighting`."""
        self.weight = None if weight is None else torch.as_tensor(weight, dtype=torch.float32, device=self._device())

    def _device(self) -> torch.device:
        return self.weight.device if self.weight is not None else torch.device("cpu")

    def _weight_for(self, logits: torch.Tensor) -> torch.Tensor | None:
        if self.weight is None:
            return None
        if self.weight.numel() != logits.shape[1]:
            raise ValueError(f"{type(self).__name__}: {self.weight.numel()} class weights for {logits.shape[1]} classes")
        return self.weight.to(device=logits.device, dtype=logits.dtype)


class CrossEntropyLoss(_WeightedLoss):
    """Cross-entropy, optionally class-weighted (``weight (K,)``, e.g. :func:`class_weights_from_counts`)."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``logits (B, K)``, ``labels (B,)`` -> scalar."""
        check_logits_labels(logits, labels, type(self).__name__)
        return F.cross_entropy(logits, labels, weight=self._weight_for(logits))


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al. 2017) via ``monai.losses.FocalLoss``: summed over classes, mean over batch.

    Args:
        gamma: focusing parameter.
        alpha: optional per-class weights ``(K,)`` (MONAI's ``alpha`` sequence for softmax).
    """

    def __init__(self, gamma: float = 2.0, alpha: Sequence[float] | None = None) -> None:
        super().__init__()
        self.gamma = float(gamma)
        self.focal = MonaiFocalLoss(
            to_onehot_y=True, use_softmax=True, gamma=gamma,
            alpha=None if alpha is None else [float(a) for a in alpha], reduction="none",
        )

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``logits (B, K)``, ``labels (B,)`` -> scalar."""
        check_logits_labels(logits, labels, type(self).__name__)
        return self.focal(logits, labels.unsqueeze(1)).sum(dim=1).mean()


class LDAMLoss(_WeightedLoss):
    """Label-distribution-aware margin loss (Cao et al., NeurIPS 2019).

    The target logit is lowered by ``scale * m_y`` with ``m_k = C / n_k^(1/4)`` (largest margin
    ``max_margin``), then weighted CE. Cao et al. use a cosine classifier with ``s = 30``: build the
    model with ``head="cosine", head_kwargs={"scale": 30}`` and pass ``scale=30`` here so the margin
    is in cosine units; with a linear head ``scale=1`` puts it in logit units. Pair with
    :class:`DeferredReweighting` for LDAM-DRW.
    """

    def __init__(self, class_counts: Sequence[int], max_margin: float = 0.5, scale: float = 1.0,
                 weight: torch.Tensor | Sequence[float] | None = None) -> None:
        super().__init__(weight)
        counts = _counts(class_counts, "LDAMLoss")
        margins = 1.0 / np.power(counts, 0.25)
        self.register_buffer("margins", torch.tensor(margins * (max_margin / margins.max()), dtype=torch.float32))
        self.scale = float(scale)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``logits (B, K)``, ``labels (B,)`` -> scalar."""
        check_logits_labels(logits, labels, type(self).__name__)
        if logits.shape[1] != self.margins.numel():
            raise ValueError(f"LDAMLoss: built for {self.margins.numel()} classes, logits have {logits.shape[1]}")
        shift = F.one_hot(labels, logits.shape[1]).to(logits.dtype) * self.margins.to(logits)[labels].unsqueeze(1)
        return F.cross_entropy(logits - self.scale * shift, labels, weight=self._weight_for(logits))


class DeferredReweighting:
    """DRW schedule (Cao et al. 2019): no class weights before ``start_epoch``, then inverse effective number.

    ``schedule(epoch) -> (K,) weights or None``; ``schedule.apply(loss, epoch)`` sets them on a loss
    with ``set_class_weights`` (call it at the start of every epoch, epochs counted from 0).
    """

    def __init__(self, class_counts: Sequence[int], start_epoch: int, beta: float = 0.9999) -> None:
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        self.start_epoch = int(start_epoch)
        self.late_weights = class_weights_from_counts(class_counts, "effective", beta)

    def __call__(self, epoch: int) -> torch.Tensor | None:
        return None if epoch < self.start_epoch else self.late_weights.clone()

    def apply(self, loss: _WeightedLoss, epoch: int) -> torch.Tensor | None:
        weights = self(epoch)
        loss.set_class_weights(weights)
        return weights


class LogitAdjustedLoss(nn.Module):
    """Balanced softmax (Ren et al. 2020) = logit-adjusted CE (Menon et al. 2021).

    Trains ``CE(logits + tau * log(prior), y)`` with ``prior_k = n_k / N``; at test time the raw
    logits are used, which removes the training prior. ``tau = 1`` is balanced softmax.
    """

    def __init__(self, class_counts: Sequence[int], tau: float = 1.0) -> None:
        super().__init__()
        counts = _counts(class_counts, "LogitAdjustedLoss")
        self.tau = float(tau)
        self.register_buffer("log_prior", torch.tensor(np.log(counts / counts.sum()), dtype=torch.float32))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``logits (B, K)``, ``labels (B,)`` -> scalar."""
        check_logits_labels(logits, labels, type(self).__name__)
        if logits.shape[1] != self.log_prior.numel():
            raise ValueError(f"LogitAdjustedLoss: built for {self.log_prior.numel()} classes, logits have {logits.shape[1]}")
        return F.cross_entropy(logits + self.tau * self.log_prior.to(logits), labels)
