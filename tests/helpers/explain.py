"""Hand-built networks that follow the explain contract, their inputs, and oblique affines (explain and
localisation tests). Their NIfTI files: :func:`helpers.nifti.write_nifti` with ``scanner_codes=True``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class CosineHead(nn.Module):
    """``s * cos(theta)`` between pooled features and class weights (the cosine/CMSL head contract)."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 10.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(num_classes, in_features, generator=gen))
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))


class BrightSpotNet(nn.Module):
    """A hand-built net whose feature map is high exactly where the input is bright.

    ``forward_features``: stride-2 average pooling then a fixed 1x1 conv with channels
    ``[x - 0.2, 0.5 * x - 0.1]`` and ReLU, so features are zero on the dim background and high at
    bright voxels; class 1's weight is positive on both channels, class 0's negative, so a bright
    spot is evidence for class 1.
    """

    def __init__(self, head: str = "linear", in_channels: int = 1, spatial_dims: int = 3) -> None:
        super().__init__()
        self.config = {"name": "bright_spot", "head": head, "in_channels": in_channels, "num_classes": 2}
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.pool_in = (nn.AvgPool3d if spatial_dims == 3 else nn.AvgPool2d)(2)
        self.conv = conv(in_channels, 2, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0
            self.conv.weight[1, 0] = 0.5
            self.conv.bias.copy_(torch.tensor([-0.2, -0.1]))
        if head == "linear":
            self.classifier = nn.Linear(2, 2)
        else:
            self.classifier = CosineHead(2, 2)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor([[-1.0, -0.5], [3.0, 1.0]]))
            if head == "linear":
                self.classifier.bias.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(self.pool_in(x)))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Two resolution levels, finest first (multi-scale COAM): the same features at full and at half
        resolution."""
        return [F.relu(self.conv(x)), self.forward_features(x)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x).flatten(2).mean(dim=2))


def bright_cube_input(shape=(16, 16, 16), corner=(10, 3, 6), size=4, channels=1) -> torch.Tensor:
    """``(1, channels, *shape)`` low-noise background with a bright cube starting at ``corner``."""
    gen = torch.Generator().manual_seed(0)
    x = 0.05 * torch.rand((1, channels, *shape), generator=gen)
    sl = tuple(slice(c, c + size) for c in corner)
    x[(slice(None), slice(None), *sl)] = 1.0
    return x


def oblique_affine(spacing=(0.8, 1.1, 3.0), angles=(0.3, -0.2, 0.5),
                   origin=(-20.0, 15.0, 40.0)) -> np.ndarray:
    """A RAS affine with anisotropic spacing and a rotation about all three axes (no flips)."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine
