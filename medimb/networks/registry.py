"""Backbone registry: one name -> one builder, as in timm (no if/else chains elsewhere)."""

from __future__ import annotations

from typing import Callable

from torch import nn

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``builder(in_channels, spatial_dims, **kwargs) -> Backbone`` under ``name``.

    A backbone is an ``nn.Module`` with ``num_features`` (int, F), ``forward(x)`` returning the last
    feature map ``(B, F, *S')`` with ReLU applied, and ``pool(feature_map) -> (B, F)``.
    """

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = builder
        return builder

    return wrap


def get_backbone_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered under ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return _BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown network {name!r}; known: {', '.join(sorted(_BACKBONES))}") from None


def list_models() -> list[str]:
    """Sorted names accepted by :func:`medimb.networks.create_model`."""
    return sorted(_BACKBONES)
