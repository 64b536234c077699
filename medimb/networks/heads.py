"""Classifier and embedding heads: ``features (B, F) -> logits (B, K)`` or ``embedding (B, E)``.

Every classifier head has ``.weight`` ``(K, F)`` (its stored parameter), ``class_weights()``
``(K, F)`` (the weights it actually applies: L2-normalised, tau-normalised or LWS-scaled),
``activation`` (``"softmax"`` or ``"sigmoid"``, read by :func:`medimb.networks.predict_proba`) and
``head_kwargs()`` (what ``create_model(head=..., head_kwargs=...)`` needs to rebuild it).

Stage-2 re-balancing heads (Kang et al., "Decoupling representation and classifier", ICLR 2020)
are built from a trained head with ``from_head``: :class:`TauNormHead` (``w_k / ||w_k||^tau``,
no training) and :class:`LWSHead` (frozen weights, a learnable scale per class). cRT re-initialises
a head of the same type (:func:`medimb.networks.rebalance_classifier`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("softmax", "sigmoid")


def _check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def tau_normalize(weight: torch.Tensor, tau: float = 1.0, eps: float = 1e-12) -> torch.Tensor:
    """``(K, F) -> (K, F)``: each class row divided by its L2 norm to the power ``tau``.

    ``tau=0`` leaves the weights unchanged, ``tau=1`` gives unit-norm rows (Kang et al. 2020).
    """
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(eps).pow(tau)


class LinearHead(nn.Linear):
    """Plain linear classifier ``logits = f W^T + b``; probabilities by softmax."""

    head_type = "linear"
    activation = "softmax"

    def __init__(self, num_features: int, num_classes: int, bias: bool = True) -> None:
        super().__init__(num_features, num_classes, bias=bias)

    def class_weights(self) -> torch.Tensor:
        """``(K, F)``."""
        return self.weight

    def head_kwargs(self) -> dict[str, Any]:
        return {"bias": self.bias is not None}


class CosineHead(nn.Module):
    """Cosine classifier: ``logits = s * cos(theta) = s * <f/||f||, w_k/||w_k||>``, ``(B, F) -> (B, K)``.

    ``activation`` defaults to softmax (normalised-softmax / CosFace-style training with CE-type
    losses); the CMSL head uses sigmoid.
    """

    head_type = "cosine"
    activation = "softmax"

    def __init__(self, num_features: int, num_classes: int, scale: float = 16.0, activation: str = "softmax") -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.activation = _check_activation(activation)
        self.weight = nn.Parameter(torch.empty(num_classes, num_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, F) -> (B, K)`` cosine similarity of each feature vector with each class weight."""
        return F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, F) -> (B, K)`` logits ``s * cos``."""
        return self.scale * self.cosine(features)

    def class_weights(self) -> torch.Tensor:
        """``(K, F)`` L2-normalised class weights."""
        return F.normalize(self.weight, dim=1)

    def head_kwargs(self) -> dict[str, Any]:
        return {"scale": self.scale, "activation": self.activation}


class CMSLHead(CosineHead):
    """Head for the Cosine Margin Sigmoid Loss: logits ``s * cos``; probabilities ``sigmoid(s * cos)``.

    The margin lives in :class:`medimb.losses.CosineMarginSigmoidLoss`, not here, so prediction
    uses the margin-free logit as DESIGN.md specifies.
    """

    head_type = "cmsl"
    activation = "sigmoid"

    def __init__(self, num_features: int, num_classes: int, scale: float = 16.0, activation: str = "sigmoid") -> None:
        super().__init__(num_features, num_classes, scale=scale, activation=activation)


class TauNormHead(nn.Module):
    """Tau-normalised linear classifier: ``logits = f (W / ||W||_row^tau)^T + b``, ``(B, F) -> (B, K)``.

    Built from a trained linear head with :meth:`from_head`; its parameters are frozen (post-hoc
    re-balancing, no training).
    """

    head_type = "tau_norm"
    activation = "softmax"

    def __init__(self, num_features: int, num_classes: int, tau: float = 1.0, bias: bool = True,
                 activation: str = "softmax") -> None:
        super().__init__()
        self.tau = float(tau)
        self.activation = _check_activation(activation)
        self.weight = nn.Parameter(torch.zeros(num_classes, num_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(num_classes), requires_grad=False) if bias else None

    @classmethod
    def from_head(cls, head: nn.Module, tau: float = 1.0) -> "TauNormHead":
        """Tau-normalise a trained :class:`LinearHead` (or another tau/linear-type head)."""
        if not isinstance(head, (LinearHead, TauNormHead)):
            raise TypeError(f"tau-normalisation applies to linear heads, got {type(head).__name__}")
        bias = getattr(head, "bias", None)
        new = cls(head.weight.shape[1], head.weight.shape[0], tau=tau, bias=bias is not None,
                  activation=head.activation)
        new.to(head.weight.device, head.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(head.weight)
            if bias is not None:
                new.bias.copy_(bias)
        return new

    def class_weights(self) -> torch.Tensor:
        """``(K, F)`` tau-normalised weights."""
        return tau_normalize(self.weight, self.tau)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, F) -> (B, K)``."""
        return F.linear(features, self.class_weights(), self.bias)

    def head_kwargs(self) -> dict[str, Any]:
        return {"tau": self.tau, "bias": self.bias is not None, "activation": self.activation}


class LWSHead(nn.Module):
    """Learnable weight scaling: frozen classifier, one learnable scale ``g_k`` per class (init 1).

    ``logits_k = g_k * (f . w_k + b_k)`` for a linear base, ``g_k * s * cos(theta_k)`` for a
    cosine/CMSL base (``cosine=True``). Only ``scales`` ``(K,)`` requires grad. ``(B, F) -> (B, K)``.
    """

    head_type = "lws"
    activation = "softmax"

    def __init__(self, num_features: int, num_classes: int, bias: bool = True, cosine: bool = False,
                 scale: float = 1.0, activation: str = "softmax") -> None:
        super().__init__()
        self.cosine = bool(cosine)
        self.scale = float(scale)
        self.activation = _check_activation(activation)
        self.weight = nn.Parameter(torch.zeros(num_classes, num_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(num_classes), requires_grad=False) if bias else None
        self.scales = nn.Parameter(torch.ones(num_classes))

    @classmethod
    def from_head(cls, head: nn.Module) -> "LWSHead":
        """Wrap a trained linear, cosine or CMSL head (its weights are copied and frozen)."""
        if isinstance(head, CosineHead):
            new = cls(head.weight.shape[1], head.weight.shape[0], bias=False, cosine=True,
                      scale=head.scale, activation=head.activation)
        elif isinstance(head, LinearHead):
            new = cls(head.weight.shape[1], head.weight.shape[0], bias=head.bias is not None,
                      activation=head.activation)
        else:
            raise TypeError(f"LWS applies to linear, cosine or CMSL heads, got {type(head).__name__}")
        new.to(head.weight.device, head.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(head.weight)
            if new.bias is not None:
                new.bias.copy_(head.bias)
        return new

    def class_weights(self) -> torch.Tensor:
        """``(K, F)`` the frozen weights (normalised for a cosine base) times the per-class scales."""
        base = F.normalize(self.weight, dim=1) if self.cosine else self.weight
        return base * self.scales.unsqueeze(1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, F) -> (B, K)``."""
        if self.cosine:
            base = self.scale * F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))
        else:
            base = F.linear(features, self.weight, self.bias)
        return base * self.scales

    def head_kwargs(self) -> dict[str, Any]:
        return {"bias": self.bias is not None, "cosine": self.cosine, "scale": self.scale,
                "activation": self.activation}


class EmbeddingHead(nn.Module):
    """Projection for metric losses: ``Linear(F, H) -> ReLU -> Linear(H, E)``, then L2-normalised.

    ``(B, F) -> (B, E)`` with unit-norm rows. ``hidden_dim`` defaults to ``F``.
    """

    def __init__(self, num_features: int, embedding_dim: int = 128, hidden_dim: int | None = None) -> None:
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        hidden = hidden_dim or num_features
        self.mlp = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, embedding_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, F) -> (B, E)``."""
        return F.normalize(self.mlp(features), dim=1)


HEADS: dict[str, type[nn.Module]] = {
    cls.head_type: cls for cls in (LinearHead, CosineHead, CMSLHead, TauNormHead, LWSHead)
}


def create_head(head: str, num_features: int, num_classes: int, **head_kwargs: Any) -> nn.Module:
    """Build the classifier head registered as ``head`` (see ``HEADS``)."""
    try:
        cls = HEADS[head]
    except KeyError:
        raise KeyError(f"unknown head {head!r}; known: {', '.join(sorted(HEADS))}") from None
    return cls(num_features, num_classes, **head_kwargs)
