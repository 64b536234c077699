"""``create_loss(name, class_counts=None, **kwargs)``: one factory for every classification loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

from torch import nn

from medimb.losses.cmsl import CosineMarginSigmoidLoss
from medimb.losses.rebalancing import (
    CrossEntropyLoss,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    class_weights_from_counts,
)


def _needs_counts(name: str, class_counts: Sequence[int] | None) -> Sequence[int]:
    if class_counts is None:
        raise ValueError(f"loss {name!r} needs class_counts (training samples per class)")
    return class_counts


def _weighted_ce(class_counts=None, weighting: str = "inverse", beta: float = 0.9999) -> nn.Module:
    return CrossEntropyLoss(class_weights_from_counts(_needs_counts("weighted_ce", class_counts), weighting, beta))


def _balanced_softmax(class_counts=None) -> nn.Module:
    return LogitAdjustedLoss(_needs_counts("balanced_softmax", class_counts), tau=1.0)


def _logit_adjustment(class_counts=None, tau: float = 1.0) -> nn.Module:
    return LogitAdjustedLoss(_needs_counts("logit_adjustment", class_counts), tau=tau)


def _ldam(class_counts=None, **kwargs) -> nn.Module:
    return LDAMLoss(_needs_counts("ldam", class_counts), **kwargs)


def _cmsl(class_counts=None, **kwargs) -> nn.Module:
    if "scale" not in kwargs:
        raise ValueError("loss 'cmsl' needs scale= (the s of the model's cosine/CMSL head); "
                         "CosineMarginSigmoidLoss.for_head(model.classifier) reads it from the head")
    return CosineMarginSigmoidLoss(**kwargs)


def _unweighted(cls: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(class_counts=None, **kwargs) -> nn.Module:
        return cls(**kwargs)

    return build


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ce": _unweighted(CrossEntropyLoss),
    "weighted_ce": _weighted_ce,
    "focal": _unweighted(FocalLoss),
    "ldam": _ldam,
    "balanced_softmax": _balanced_softmax,
    "logit_adjustment": _logit_adjustment,
    "cmsl": _cmsl,
}


def create_loss(name: str, class_counts: Sequence[int] | None = None, **kwargs: Any) -> nn.Module:
    """Build a classification loss ``loss(logits (B, K), labels (B,)) -> scalar``.

    Names (``-`` and ``_`` are interchangeable): ``ce``; ``weighted_ce`` (``weighting="inverse" |
    "sqrt_inverse" | "effective"``); ``focal`` (``gamma``, ``alpha``); ``ldam`` (``max_margin``,
    ``scale``; add :class:`~medimb.losses.DeferredReweighting` for LDAM-DRW); ``balanced_softmax``;
    ``logit_adjustment`` (``tau``); ``cmsl`` (``scale``, required: the head's ``s``; ``margin``). ``class_counts`` ``(K,)``
    (training samples per class) is required by the re-balancing losses and ignored by the others.
    """
    key = name.replace("-", "_")
    if key not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}")
    return LOSSES[key](class_counts=class_counts, **kwargs)
