"""Backbone registry: one name -> one builder and its input defaults, as in timm (no if/else chains elsewhere).

``register_backbone(name, input_layout=..., default_size=..., ...)`` records, next to the builder, what the
backbone takes by default (timm's ``default_cfg``): :func:`backbone_defaults` is the one source of a network's
default input size, layout (3D volume or 2.5D slab of K slices) and orientation, read by training, the CLI and
the bundles (``medimb.training.config.preprocessing_for``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from torch import nn

INPUT_LAYOUTS = ("3d", "2.5d")
_AXES = ("LR", "PA", "IS")


@dataclass(frozen=True)
class BackboneDefaults:
    """What a registered backbone takes by default.

    input_layout: ``"3d"`` (a volume ``(B, C, *default_size)``) or ``"2.5d"`` (a slab of ``slices`` adjacent
    slices laid out ``(B, C, K, *default_size)`` by ``medimb.data.Preprocessing(slices=K)``).
    default_size: the network input size after crop/pad, in the array-axis order of ``orientation``: three
    entries for 3D, the two in-plane entries for 2.5D (the slab's depth is ``slices``).
    slices: K, the default slab depth of a 2.5D backbone (None for 3D).
    orientation: axcodes the volume is reoriented to before resampling, e.g. ``"RAS"``.
    default_kwargs: builder arguments ``create_model`` passes unless given (empty: the builder's signature
    holds its own defaults).
    """

    name: str
    input_layout: str
    default_size: tuple[int, ...]
    slices: int | None = None
    orientation: str = "RAS"
    default_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def input_size(self) -> tuple[int, ...]:
        """Spatial shape of the network input: ``default_size`` (3D) or ``(K, *default_size)`` (2.5D)."""
        return self.default_size if self.slices is None else (self.slices, *self.default_size)


_BACKBONES: dict[str, Callable[..., nn.Module]] = {}
_DEFAULTS: dict[str, BackboneDefaults] = {}


def _check_orientation(orientation: str) -> str:
    codes = str(orientation).upper()
    if len(codes) != 3 or sorted(next((i for i, a in enumerate(_AXES) if c in a), 9) for c in codes) != [0, 1, 2]:
        raise ValueError(f"orientation must be 3 axcodes, one of L/R, P/A, I/S each (e.g. 'RAS'), got {orientation!r}")
    return codes


def _make_defaults(name: str, input_layout: str, default_size: Sequence[int], slices: int | None, orientation: str,
                   default_kwargs: Mapping[str, Any] | None) -> BackboneDefaults:
    if input_layout not in INPUT_LAYOUTS:
        raise ValueError(f"{name}: input_layout must be one of {INPUT_LAYOUTS}, got {input_layout!r}")
    size = tuple(int(s) for s in default_size)
    if min(size, default=0) < 1:
        raise ValueError(f"{name}: default_size must be positive integers, got {tuple(default_size)}")
    if input_layout == "3d":
        if len(size) != 3 or slices is not None:
            raise ValueError(f"{name}: a 3d backbone has a 3-entry default_size and no slices, got {size}, {slices}")
    elif len(size) != 2 or slices is None or int(slices) < 1:
        raise ValueError(f"{name}: a 2.5d backbone has a 2-entry in-plane default_size and slices >= 1, "
                         f"got {size}, {slices}")
    return BackboneDefaults(name=name, input_layout=input_layout, default_size=size,
                            slices=None if slices is None else int(slices), orientation=_check_orientation(orientation),
                            default_kwargs=MappingProxyType(dict(default_kwargs or {})))


def register_backbone(
    name: str,
    *,
    input_layout: str = "3d",
    default_size: Sequence[int],
    slices: int | None = None,
    orientation: str = "RAS",
    default_kwargs: Mapping[str, Any] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``builder(in_channels, spatial_dims, **kwargs) -> Backbone`` under ``name`` with its
    input defaults (see :class:`BackboneDefaults`).

    A backbone is an ``nn.Module`` with ``num_features`` (int, F), ``forward(x)`` returning the last
    feature map ``(B, F, *S')`` with ReLU applied, and ``pool(feature_map) -> (B, F)``.

    >>> @register_backbone("tiny3d", default_size=(32, 32, 32))
    ... def tiny3d(in_channels, spatial_dims=3, **kwargs): ...
    """
    defaults = _make_defaults(name, input_layout, default_size, slices, orientation, default_kwargs)

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = builder
        _DEFAULTS[name] = defaults
        return builder

    return wrap


def _unknown(name: str) -> KeyError:
    return KeyError(f"unknown network {name!r}; known: {', '.join(sorted(_BACKBONES))}")


def get_backbone_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered under ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return _BACKBONES[name]
    except KeyError:
        raise _unknown(name) from None


def backbone_defaults(name: str) -> BackboneDefaults:
    """The input defaults registered with backbone ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return _DEFAULTS[name]
    except KeyError:
        raise _unknown(name) from None


def list_models() -> list[str]:
    """Sorted names accepted by :func:`medimb.networks.create_model`."""
    return sorted(_BACKBONES)
