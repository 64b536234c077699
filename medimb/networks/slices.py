"""2.5D backbones: a 2D encoder applied to slices of a 3D volume.

Both take a 3D volume ``(B, C, D, H, W)`` (the slab of ``D`` adjacent slices cut by the data
pipeline) and return a 3D-shaped feature map, so COAM/CAM can map it back onto the volume:

- ``slice_channels``: the ``D = num_slices`` slices are stacked as channels, ``(B, C*D, H, W)``, into
  one 2D encoder; the map ``(B, F, H', W')`` is returned as ``(B, F, 1, H', W')`` (no depth
  resolution: it is constant over the slab when upsampled).
- ``slice_pool``: one shared 2D encoder runs on every slice, ``(B*D, C, H, W) -> (B*D, F, H', W')``,
  re-assembled as ``(B, F, D, H', W')``; the feature vector pools per-slice features over the slices
  with attention (Ilse et al. 2018, gated), mean or max.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medimb.networks.backbones import DEFAULT_VOLUME_SIZE, Backbone
from medimb.networks.registry import backbone_defaults, get_backbone_builder, register_backbone

#: registered slab depths K (``--slices``): ``slice_channels`` stacks 3 adjacent slices as channels (also its
#: ``num_slices`` unless given); ``slice_pool`` takes any K, and its default 32 holds every slice of the demo
#: archive's scans (``medimb-prep synth``: 24-32 slices at native spacing); raise it for scans with more slices
SLICE_CHANNELS_K = 3
SLICE_POOL_K = 32


def _check_volume(x: torch.Tensor, name: str) -> None:
    if x.ndim != 5:
        raise ValueError(f"{name} expects a volume (B, C, D, H, W), got shape {tuple(x.shape)}")


class SliceChannels(Backbone):
    """K adjacent slices as channels into a 2D encoder. Input ``(B, C, K, H, W)``, ``K == num_slices``.

    Output feature map ``(B, F, 1, H', W')``.
    """

    def __init__(
        self,
        in_channels: int,
        num_slices: int,
        encoder: str = "cpunet",
        encoder_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_slices < 1:
            raise ValueError(f"num_slices must be >= 1, got {num_slices}")
        self.spatial_dims = 3
        self.in_channels = in_channels
        self.num_slices = num_slices
        self.encoder = get_backbone_builder(encoder)(in_channels * num_slices, 2, **(encoder_kwargs or {}))
        self.num_features = self.encoder.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, K, H, W) -> (B, F, 1, H', W')``."""
        _check_volume(x, "slice_channels")
        b, c, k, h, w = x.shape
        if c != self.in_channels or k != self.num_slices:
            raise ValueError(
                f"slice_channels was built for {self.in_channels} channel(s) x {self.num_slices} slices, "
                f"got {c} x {k} (input shape {tuple(x.shape)})"
            )
        return self.encoder(x.reshape(b, c * k, h, w)).unsqueeze(2)


class SlicePool(Backbone):
    """Shared 2D encoder per slice, features pooled over slices. Input ``(B, C, D, H, W)``, any ``D``.

    Output feature map ``(B, F, D, H', W')``; ``pool`` gives ``(B, F)``.
    ``pooling``: ``"attention"`` (gated attention over slices), ``"mean"`` or ``"max"``.
    """

    POOLINGS = ("attention", "mean", "max")

    def __init__(
        self,
        in_channels: int,
        encoder: str = "cpunet",
        encoder_kwargs: dict[str, Any] | None = None,
        pooling: str = "attention",
        attention_dim: int = 64,
    ) -> None:
        super().__init__()
        if pooling not in self.POOLINGS:
            raise ValueError(f"pooling must be one of {self.POOLINGS}, got {pooling!r}")
        self.spatial_dims = 3
        self.in_channels = in_channels
        self.pooling = pooling
        self.encoder = get_backbone_builder(encoder)(in_channels, 2, **(encoder_kwargs or {}))
        self.num_features = self.encoder.num_features
        if pooling == "attention":
            self.attention_value = nn.Linear(self.num_features, attention_dim)
            self.attention_gate = nn.Linear(self.num_features, attention_dim)
            self.attention_score = nn.Linear(attention_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W) -> (B, F, D, H', W')``."""
        _check_volume(x, "slice_pool")
        b, c, d, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"slice_pool was built for {self.in_channels} channel(s), got {c}")
        slices = x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
        fmap = self.encoder(slices)  # (B*D, F, H', W')
        return fmap.reshape(b, d, *fmap.shape[1:]).permute(0, 2, 1, 3, 4)

    def slice_weights(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``(B, F, D, H', W') -> (B, D)`` weights of each slice in the pooled feature (sum to 1)."""
        per_slice = feature_map.mean(dim=(3, 4)).transpose(1, 2)  # (B, D, F)
        if self.pooling == "attention":
            gated = torch.tanh(self.attention_value(per_slice)) * torch.sigmoid(self.attention_gate(per_slice))
            return torch.softmax(self.attention_score(gated).squeeze(-1), dim=1)
        if self.pooling == "mean":
            return per_slice.new_full(per_slice.shape[:2], 1.0 / per_slice.shape[1])
        raise ValueError("max pooling has no per-slice weights")

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``(B, F, D, H', W') -> (B, F)``."""
        per_slice = feature_map.mean(dim=(3, 4))  # (B, F, D)
        if self.pooling == "max":
            return per_slice.amax(dim=2)
        return torch.einsum("bfd,bd->bf", per_slice, self.slice_weights(feature_map))


@register_backbone("slice_channels", input_layout="2.5d", default_size=DEFAULT_VOLUME_SIZE[:2],
                   slices=SLICE_CHANNELS_K)
def slice_channels(in_channels: int, spatial_dims: int = 3, num_slices: int | None = None, **kwargs) -> Backbone:
    """2.5D (a): ``num_slices`` adjacent slices as channels into a 2D encoder (:class:`SliceChannels`);
    ``num_slices`` defaults to the registered slab depth (``backbone_defaults("slice_channels").slices``)."""
    if spatial_dims != 3:
        raise ValueError("slice_channels takes 3D input (B, C, D, H, W); use spatial_dims=3")
    if num_slices is None:
        num_slices = backbone_defaults("slice_channels").slices
    return SliceChannels(in_channels, num_slices, **kwargs)


@register_backbone("slice_pool", input_layout="2.5d", default_size=DEFAULT_VOLUME_SIZE[:2], slices=SLICE_POOL_K)
def slice_pool(in_channels: int, spatial_dims: int = 3, **kwargs) -> Backbone:
    """2.5D (b): shared 2D encoder per slice, features pooled over slices (:class:`SlicePool`)."""
    if spatial_dims != 3:
        raise ValueError("slice_pool takes 3D input (B, C, D, H, W); use spatial_dims=3")
    return SlicePool(in_channels, **kwargs)
