"""Loss wiring for the two stages: method config -> loss object (+ per-epoch schedule for LDAM-DRW)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from medimb.losses import DeferredReweighting, Stage1Loss, create_loss, create_metric_loss


def build_classification_loss(name: str, class_counts: Sequence[int], head_kwargs: dict | None = None,
                              **kwargs: Any) -> nn.Module:
    """``create_loss(name, class_counts=...)``; a CMSL loss takes the head's scale ``s`` so margins match."""
    if name == "cmsl" and head_kwargs and "scale" in head_kwargs:
        kwargs.setdefault("scale", head_kwargs["scale"])
    return create_loss(name, class_counts=list(class_counts), **kwargs)


def build_stage1_loss(
    loss: str = "ce",
    class_counts: Sequence[int] = (),
    metric_loss: str | None = None,
    metric_weight: float = 0.1,
    loss_kwargs: dict | None = None,
    metric_kwargs: dict | None = None,
    head_kwargs: dict | None = None,
) -> Stage1Loss:
    """``L = L_cls + metric_weight * L_metric`` as a :class:`medimb.losses.Stage1Loss`
    ``(logits (B, K), embedding (B, E), labels (B,)) -> scalar``; without ``metric_loss`` it is ``L_cls``."""
    cls = build_classification_loss(loss, class_counts, head_kwargs, **(loss_kwargs or {}))
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
