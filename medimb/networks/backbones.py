"""Convolutional backbones: a CPU-aware default network, a plain CNN baseline, MONAI ResNet/DenseNet.

Every backbone returns its last feature map ``(B, F, *S')`` with ReLU applied (what COAM and CAM
read); ``cpunet``, ``plain_cnn`` and the ResNets also give the feature map at the end of each resolution level
(``forward_stages``, what multi-scale COAM reads). Each pools its last map with ``pool(feature_map) -> (B, F)``: global average pooling by default, or global max
or avg+max (see :data:`GLOBAL_POOLS`), chosen with ``create_model(..., global_pool=...)``. All are
``spatial_dims``-generic: one code path for 2D ``(B, C, H, W)`` and 3D ``(B, C, D, H, W)`` input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv, Norm, Pool
from monai.networks.nets import DenseNet, ResNet
from torch import nn

from medimb.networks.registry import register_backbone

#: registered default input of the 3D backbones (``medimb.networks.backbone_defaults``), RAS axis order; the
#: 2.5D backbones (:mod:`medimb.networks.slices`) take its first two entries in-plane
DEFAULT_VOLUME_SIZE = (64, 64, 64)

def global_avg_pool(feature_map: torch.Tensor) -> torch.Tensor:
    """``(B, F, *S') -> (B, F)`` mean over all spatial positions."""
    return feature_map.flatten(2).mean(dim=2)


def global_max_pool(feature_map: torch.Tensor) -> torch.Tensor:
    """``(B, F, *S') -> (B, F)`` maximum over all spatial positions."""
    return feature_map.flatten(2).amax(dim=2)


def global_avgmax_pool(feature_map: torch.Tensor) -> torch.Tensor:
    """``(B, F, *S') -> (B, F)`` mean of the global average and the global maximum."""
    return 0.5 * (global_avg_pool(feature_map) + global_max_pool(feature_map))


#: global pooling of the last feature map. ``avg`` dilutes a small lesion by the volume it sits in
#: (a 3-voxel lesion in a 16^3 map is 0.7 % of the mean); ``max`` and ``avgmax`` keep it visible.
GLOBAL_POOLS = {"avg": global_avg_pool, "max": global_max_pool, "avgmax": global_avgmax_pool}


class Backbone(nn.Module):
    """Base class: ``forward(x) -> feature map (B, F, *S')``; ``pool`` reduces it to ``(B, F)``
    with the function named by ``global_pool`` (a key of :data:`GLOBAL_POOLS`, default ``"avg"``)."""

    num_features: int
    spatial_dims: int
    global_pool: str = "avg"

    def set_global_pool(self, mode: str) -> None:
        """Choose the global pooling (``"avg"``, ``"max"`` or ``"avgmax"``)."""
        if mode not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {tuple(GLOBAL_POOLS)}, got {mode!r}")
        self.global_pool = mode

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``(B, F, *S') -> (B, F)`` global pooling (average unless ``global_pool`` says otherwise)."""
        return GLOBAL_POOLS[self.global_pool](feature_map)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, *S)`` -> the feature map at the end of each resolution level, finest first, each
        ``(B, F_l, *S_l)`` with ReLU applied; the last one is ``forward(x)``. Backbones that do not expose their
        levels raise ``NotImplementedError``."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its feature maps per resolution level")


def _sequential_stages(layers: nn.Sequential, ends: Sequence[int], x: torch.Tensor) -> list[torch.Tensor]:
    """Run ``layers`` on ``x`` and keep the outputs of the layers whose index is in ``ends``."""
    outs = []
    for i, layer in enumerate(layers):
        x = layer(x)
        if i in ends:
            outs.append(x)
    return outs


def _conv_bn_relu(spatial_dims: int, cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        Conv[Conv.CONV, spatial_dims](cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
        Norm[Norm.BATCH, spatial_dims](cout),
        nn.ReLU(inplace=True),
    )


class _ResidualConv(nn.Module):
    """``relu(x + bn(conv3(x)))``: one 3x3(x3) conv with an identity shortcut (cheap, eases training)."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.conv = Conv[Conv.CONV, spatial_dims](channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn = Norm[Norm.BATCH, spatial_dims](channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.bn(self.conv(x)))


class CPUNet(Backbone):
    """CPU-aware default network: strided stem, few wide stages, stride-2 convs instead of pooling.

    Layout for ``widths=(w0, w1, w2)``: a stem brings the input to half resolution (28 -> 14),
    then stage 0 convs to ``w0`` and each later stage opens with a stride-2 conv ``w(i-1) -> w(i)``
    (14 -> 7 -> 4); every stage adds ``depths[i]`` residual 3x3(x3) convs. All convs are followed
    by BatchNorm and ReLU. The stem is either ``stem_width`` full-resolution 3x3(x3) filters + max-pool
    2 (``stem_width > 0``: shift-robust detection of fine shape detail, the plain CNN's first stage at
    half its width) or, with ``stem_width=0``, stage 0's conv itself at stride 2 (fastest). Most of the
    work happens at 1/8 of the input voxels or fewer, which is what makes it fast on a CPU; see
    docs/benchmarks.md "Network training speed (CPU)". Channels-last memory format is on by default
    (``prefers_channels_last``) because it measured faster on CPU.

    Input ``(B, C, *S)``; output feature map ``(B, widths[-1], *S/2**len(widths))`` (ceil), ReLU applied.
    """

    def __init__(
        self,
        in_channels: int,
        spatial_dims: int = 3,
        widths: Sequence[int] = (24, 48, 96),
        depths: Sequence[int] = (1, 1, 1),
        stem_width: int = 0,
    ) -> None:
        super().__init__()
        self.prefers_channels_last = True
        if len(widths) != len(depths) or not widths:
            raise ValueError(f"widths {tuple(widths)} and depths {tuple(depths)} must be non-empty, same length")
        self.spatial_dims = spatial_dims
        layers: list[nn.Module] = []
        cin = in_channels
        self.stage_ends: list[int] = []  # index in ``features`` of the last layer of each resolution level
        if stem_width:
            layers.append(_conv_bn_relu(spatial_dims, cin, stem_width))
            self.stage_ends.append(len(layers) - 1)  # the full-resolution stem, before its max-pool
            layers.append(Pool[Pool.MAX, spatial_dims](kernel_size=2, ceil_mode=True))
            cin = stem_width
        for i, (width, depth) in enumerate(zip(widths, depths)):
            layers.append(_conv_bn_relu(spatial_dims, cin, width, stride=1 if (i == 0 and stem_width) else 2))
            layers.extend(_ResidualConv(spatial_dims, width) for _ in range(depth))
            self.stage_ends.append(len(layers) - 1)
            cin = width
        self.features = nn.Sequential(*layers)
        self.num_features = int(widths[-1])
        for module in self.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, F, *S')``."""
        return self.features(x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, *S)`` -> ``[(B, stem_width, *S)]`` (with a stem) ``+ [(B, widths[i], *S_i)]``, finest first."""
        return _sequential_stages(self.features, self.stage_ends, x)


class PlainCNN(Backbone):
    """Baseline: ``len(widths)`` stages of 3x3(x3) conv + BN + ReLU, max-pool 2 between stages.

    With the default ``widths=(16, 32, 64, 128)`` this is the "plain 4-stage 16-128-channel 3D CNN"
    the issue compares against. Input ``(B, C, *S)``; output ``(B, widths[-1], *S/8)``.
    """

    def __init__(self, in_channels: int, spatial_dims: int = 3, widths: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        layers: list[nn.Module] = []
        cin = in_channels
        self.stage_ends: list[int] = []
        for i, width in enumerate(widths):
            if i > 0:
                layers.append(Pool[Pool.MAX, spatial_dims](kernel_size=2, ceil_mode=True))
            layers.append(_conv_bn_relu(spatial_dims, cin, width))
            self.stage_ends.append(len(layers) - 1)
            cin = width
        self.features = nn.Sequential(*layers)
        self.num_features = int(widths[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, F, *S')``."""
        return self.features(x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, *S)`` -> ``[(B, widths[i], *S/2**i)]``, finest first."""
        return _sequential_stages(self.features, self.stage_ends, x)


class MonaiResNet(Backbone):
    """MONAI ``ResNet`` (basic blocks) up to ``layer4``; the classification ``fc`` is not built.

    ``widths`` are MONAI's ``block_inplanes`` (small by default for CPU). ``stem_kernel``/``stem_stride``
    are MONAI's ``conv1_t_size``/``conv1_t_stride``; ``no_max_pool`` skips the stem max-pool (useful
    for 28^3 input, which the default stem already reduces to 14^3 before layer1).
    Input ``(B, C, *S)``; output ``(B, widths[3], *S')`` ReLU applied (the last block ends in ReLU).
    """

    def __init__(
        self,
        in_channels: int,
        spatial_dims: int = 3,
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (16, 32, 64, 128),
        stem_kernel: int = 3,
        stem_stride: int = 1,
        no_max_pool: bool = False,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.net = ResNet(
            block="basic",
            layers=list(layers),
            block_inplanes=list(widths),
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=stem_kernel,
            conv1_t_stride=stem_stride,
            no_max_pool=no_max_pool,
            feed_forward=False,
        )
        self.num_features = int(widths[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, F, *S')``."""
        return self.forward_stages(x)[-1]

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, *S)`` -> the outputs of ``layer1`` .. ``layer4``, finest first."""
        net = self.net
        x = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        outs = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = layer(x)
            outs.append(x)
        return outs


class MonaiDenseNet(Backbone):
    """MONAI ``DenseNet`` feature extractor (DenseNet121 block layout by default) + final ReLU.

    ``growth_rate``/``init_features`` default small for CPU. ``stem_pool=False`` (default) drops
    the stem max-pool so 28^3 input still has a 1^3 map after the three transitions (64^3 -> 4^3);
    set it for large volumes. Input ``(B, C, *S)``; output ``(B, F, *S/16)`` (``/32`` with the
    stem pool), ReLU applied.
    """

    def __init__(
        self,
        in_channels: int,
        spatial_dims: int = 3,
        growth_rate: int = 8,
        init_features: int = 16,
        block_config: Sequence[int] = (6, 12, 24, 16),
        bn_size: int = 4,
        stem_pool: bool = False,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        net = DenseNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=1,
            init_features=init_features,
            growth_rate=growth_rate,
            block_config=tuple(block_config),
            bn_size=bn_size,
        )
        self.features = net.features
        if not stem_pool:
            self.features.pool0 = nn.Identity()
        self.act = nn.ReLU(inplace=False)
        self.num_features = int(net.class_layers.out.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, F, *S')``."""
        return self.act(self.features(x))


@register_backbone("cpunet", default_size=DEFAULT_VOLUME_SIZE)
def cpunet(in_channels: int, spatial_dims: int = 3, **kwargs) -> Backbone:
    """The default network (:class:`CPUNet`): >= 80 volumes/s training at 28^3 on 2 CPU cores."""
    return CPUNet(in_channels, spatial_dims, **kwargs)


@register_backbone("plain_cnn", default_size=DEFAULT_VOLUME_SIZE)
def plain_cnn(in_channels: int, spatial_dims: int = 3, **kwargs) -> Backbone:
    """The plain 4-stage 16-128-channel CNN baseline (:class:`PlainCNN`)."""
    return PlainCNN(in_channels, spatial_dims, **kwargs)


def _register_resnet(name: str, layers: tuple[int, int, int, int]) -> None:
    def build(in_channels: int, spatial_dims: int = 3, **kwargs) -> Backbone:
        return MonaiResNet(in_channels, spatial_dims, layers=layers, **kwargs)

    build.__doc__ = f"MONAI {name} (basic blocks {layers}), small widths by default."
    register_backbone(name, default_size=DEFAULT_VOLUME_SIZE)(build)


_register_resnet("resnet10", (1, 1, 1, 1))
_register_resnet("resnet18", (2, 2, 2, 2))
_register_resnet("resnet34", (3, 4, 6, 3))


@register_backbone("densenet121", default_size=DEFAULT_VOLUME_SIZE)
def densenet121(in_channels: int, spatial_dims: int = 3, **kwargs) -> Backbone:
    """MONAI DenseNet121 block layout (6, 12, 24, 16) with a small growth rate for CPU."""
    return MonaiDenseNet(in_channels, spatial_dims, **kwargs)
