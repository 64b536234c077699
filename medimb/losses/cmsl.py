"""Cosine Margin Sigmoid Loss (Luo et al., MICCAI 2019), as specified in DESIGN.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medimb.validation import check_logits_labels


class CosineMarginSigmoidLoss(nn.Module):
    """CMSL: binary cross-entropy on margin-shifted scaled cosines, one-vs-rest over classes.

    The model's CMSL head (:class:`medimb.networks.CMSLHead`) L2-normalises features and class
    weights and returns ``logits = s * cos(theta)`` ``(B, K)``; the class weights live in that head
    (``model.classifier.weight``), so gradients reach features and weights through the logits and
    this loss has one signature with the other classification losses: ``loss(logits, labels)``.
    For each sample and class ``k`` with target ``t_k = [y == k]``, the loss trains

    - positives (``t_k = 1``) on ``s * (cos - m) = logits - s*m``,
    - negatives (``t_k = 0``) on ``s * (cos + m) = logits + s*m``,

    with ``BCEWithLogits`` (log-sum-exp form: finite even at ``s = 64`` with saturated cosines).
    With ``m = 0`` it is exactly ``BCEWithLogits(s*cos, one_hot(y))``. Binary problems use either
    a 2-class head (one-vs-rest over both) or one logit ``(B,)``/``(B, 1)`` scored against ``y``.
    Prediction uses ``sigmoid(s * cos)`` without the margin (:func:`medimb.networks.predict_proba`).

    The head is the one source of ``s``: build the loss with :meth:`for_head` (training does), which reads the
    head's scale once; the constructor takes an explicit ``s`` for a standalone loss, and then the logits it is
    given must be ``s * cos`` with that same ``s`` (not re-checked per batch).

    Args:
        scale: ``s``, the head's scale (the loss subtracts ``s*m`` from its logits).
        margin: ``m`` in cosine units, ``0 <= m < 1``.
        reduction: ``"mean"`` (over all ``B*K`` terms, as ``BCEWithLogits``), ``"sum"`` or ``"none"``
            (returns ``(B, K)``).
        weight: optional per-class weights ``(K,)`` applied to each class's term.

    Example::

        >>> loss = CosineMarginSigmoidLoss.for_head(model.classifier, margin=0.2)  # model built with head="cmsl"
        >>> loss(model(x), y)
        >>> CosineMarginSigmoidLoss(scale=16.0, margin=0.2)(16.0 * cos, y)  # standalone, explicit s
    """

    def __init__(self, scale: float, margin: float = 0.2, reduction: str = "mean",
                 weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if not 0 <= margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {margin}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.scale = float(scale)
        self.margin = float(margin)
        self.reduction = reduction
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    @classmethod
    def for_head(cls, head: nn.Module, margin: float = 0.2, reduction: str = "mean",
                 weight: torch.Tensor | None = None) -> "CosineMarginSigmoidLoss":
        """The loss for ``head`` (e.g. ``model.classifier``), with ``s`` read from it once: ``ValueError`` unless
        its logits are scaled cosines (:func:`cosine_head_scale`)."""
        scale = cosine_head_scale(head)
        if scale is None:
            kind = getattr(head, "head_type", None)
            raise ValueError(
                f"CosineMarginSigmoidLoss needs a cosine or CMSL head (logits s*cos with a scale s), got "
                f"{type(head).__name__}" + (f" (head type {kind!r})" if kind else "")
                + "; build the model with head='cmsl'"
            )
        return cls(scale, margin=margin, reduction=reduction, weight=weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``logits (B, K)`` = ``s * cos`` (or ``(B,)``/``(B, 1)`` binary), ``labels (B,)`` int -> loss."""
        single_logit = logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1)
        if single_logit:
            logits = logits.reshape(-1, 1)
            check_logits_labels(torch.cat([-logits, logits], dim=1), labels, "CosineMarginSigmoidLoss")
            targets = labels.to(logits.dtype).unsqueeze(1)
        else:
            check_logits_labels(logits, labels, "CosineMarginSigmoidLoss")
            targets = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        shifted = logits - self.scale * self.margin * (2 * targets - 1)
        weight = None if self.weight is None else self.weight.to(logits.dtype).expand_as(logits)
        return F.binary_cross_entropy_with_logits(shifted, targets, weight=weight, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}, reduction={self.reduction!r}"


def cosine_head_scale(head: nn.Module) -> float | None:
    """``s`` of a classifier head whose logits are ``s * cos`` (``medimb.networks``: a cosine or CMSL head, or
    LWS on one, whose per-class factors multiply ``s * cos``), else None (linear, tau-norm heads)."""
    kind = getattr(head, "head_type", None)
    if kind in ("cosine", "cmsl") or (kind == "lws" and getattr(head, "cosine", False) is True):
        scale = getattr(head, "scale", None)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0:
            return float(scale)
    return None
