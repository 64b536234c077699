"""Loss wiring for the two stages: method config -> loss object (+ per-epoch schedule for LDAM-DRW)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from medimb.losses import (
    CosineMarginSigmoidLoss,
    DeferredReweighting,
    Stage1Loss,
    cosine_head_scale,
    create_loss,
    create_metric_loss,
)


def build_classification_loss(name: str, class_counts: Sequence[int], *, head: nn.Module | None = None,
                              **kwargs: Any) -> nn.Module:
    """``create_loss(name, class_counts=...)``, with the scale ``s`` of margin losses read from ``head`` (the
    model's classifier, e.g. ``model.classifier``), the one source of ``s``, once, here:

    - ``cmsl``: :meth:`~medimb.losses.CosineMarginSigmoidLoss.for_head` (``ValueError`` unless ``head`` is a
      cosine/CMSL head); a ``scale`` in ``kwargs`` must then equal the head's. Without ``head`` the loss
      needs an explicit ``scale``.
    - ``ldam`` with a cosine head: ``scale`` defaults to the head's, so the margins are in cosine units.
    """
    key = name.replace("-", "_")
    if head is not None and key == "cmsl":
        scale = kwargs.pop("scale", None)
        loss = CosineMarginSigmoidLoss.for_head(head, **kwargs)
        if scale is not None and float(scale) != loss.scale:
            raise ValueError(f"cmsl: scale={scale} differs from the head's s={loss.scale}; the loss takes the "
                             "head's (leave scale out)")
        return loss
    if head is not None and key == "ldam" and "scale" not in kwargs and cosine_head_scale(head) is not None:
        kwargs["scale"] = cosine_head_scale(head)
    return create_loss(name, class_counts=list(class_counts), **kwargs)


def build_stage1_loss(
    loss: str = "ce",
    class_counts: Sequence[int] = (),
    metric_loss: str | None = None,
    metric_weight: float = 0.1,
    loss_kwargs: dict | None = None,
    metric_kwargs: dict | None = None,
    *,
    head: nn.Module | None = None,
) -> Stage1Loss:
    """``L = L_cls + metric_weight * L_metric`` as a :class:`medimb.losses.Stage1Loss`
    ``(logits (B, K), embedding (B, E), labels (B,)) -> scalar``; without ``metric_loss`` it is ``L_cls``.
    ``head``: the model's classifier, for :func:`build_classification_loss`."""
    cls = build_classification_loss(loss, class_counts, head=head, **(loss_kwargs or {}))
    metric = create_metric_loss(metric_loss, **(metric_kwargs or {})) if metric_loss else None
    return Stage1Loss(cls, metric, metric_weight if metric is not None else 0.0)


def drw_schedule(loss: nn.Module, class_counts: Sequence[int], max_epochs: int,
                 start: float | None) -> Callable[[int], Any] | None:
    """LDAM-DRW (Cao et al. 2019): hook ``(epoch 0-based) -> None`` that switches class weights on at
    ``start * max_epochs``; None when ``start`` is None."""
    if start is None:
        return None
    target = getattr(loss, "classification_loss", loss)
    if not hasattr(target, "set_class_weights"):
        raise ValueError(f"deferred re-weighting needs a weighted loss, got {type(target).__name__}")
    drw = DeferredReweighting(class_counts, start_epoch=int(start * max_epochs))
    return lambda epoch: drw.apply(target, epoch)
