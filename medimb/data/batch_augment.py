"""Augmentation of whole batches on the training device, for in-memory datasets (MedMNIST).

Per-item MONAI transforms cost a few ms per 28^3 volume on a CPU, about as much as the network's own
step; drawing per-sample flips and one small affine warp for the whole batch with ``affine_grid`` /
``grid_sample`` costs a fraction of that. Every sample still gets its own random flips, rotation and
scale. Randomness comes from a private generator (``set_random_state``), so runs are reproducible.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from medimb.data.transforms import Augmentation


def _rotation(angles: torch.Tensor, nd: int) -> torch.Tensor:
    """(B, 1) angles (2D) or (B, 3) angles (3D) -> (B, nd, nd) rotation matrices."""
    if nd == 2:
        c, s = torch.cos(angles[:, 0]), torch.sin(angles[:, 0])
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    rot = torch.eye(3, dtype=angles.dtype).expand(angles.shape[0], 3, 3)
    for axis in range(3):
        c, s = torch.cos(angles[:, axis]), torch.sin(angles[:, axis])
        i, j = [a for a in range(3) if a != axis]
        r = torch.eye(3, dtype=angles.dtype).repeat(angles.shape[0], 1, 1)
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
        rot = rot @ r
    return rot


class BatchAugmentation:
    """Random per-sample flips (each spatial axis with ``flip_prob``) and, with ``affine_prob``, a rotation
    (+-``rotate_range`` rad per axis) and isotropic-per-axis scaling (+-``scale_range``), zero padding.

    ``__call__(x)``: ``(B, C, *S)`` float tensor -> same shape, same device.
    """

    def __init__(self, augmentation: Augmentation | dict, spatial_dims: int, seed: int = 0) -> None:
        self.aug = augmentation if isinstance(augmentation, Augmentation) else Augmentation(**augmentation)
        self.nd = spatial_dims
        self.generator = torch.Generator().manual_seed(seed)

    def set_random_state(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a, nd, b = self.aug, self.nd, x.shape[0]
        if a.flip_prob > 0:
            flips = self._rand(b, nd) < a.flip_prob
            for axis in range(nd):
                mask = flips[:, axis].to(x.device).view(b, *([1] * (x.ndim - 1)))
                x = torch.where(mask, x.flip(2 + axis), x)
        if a.affine_prob > 0:
            apply = self._rand(b) < a.affine_prob
            n_angles = 1 if nd == 2 else 3
            angles = (self._rand(b, n_angles) * 2 - 1) * a.rotate_range
            scales = 1 + (self._rand(b, nd) * 2 - 1) * a.scale_range
            idx = apply.nonzero().reshape(-1)
            if idx.numel():  # warp only the chosen samples: grid_sample is the costly part on a CPU
                theta = _rotation(angles[idx], nd) @ torch.diag_embed(scales[idx])
                theta = torch.cat([theta, torch.zeros(idx.numel(), nd, 1)], dim=2).to(x.device, x.dtype)
                sub = x[idx.to(x.device)]
                grid = F.affine_grid(theta, list(sub.shape), align_corners=False)
                x = x.clone()
                x[idx.to(x.device)] = F.grid_sample(sub, grid, mode="bilinear", padding_mode="zeros",
                                                    align_corners=False)
        if a.intensity_prob > 0:
            on = (self._rand(b) < a.intensity_prob).to(x.device, x.dtype).view(b, *([1] * (x.ndim - 1)))
            scale = 1 + on * ((self._rand(b).to(x) * 2 - 1) * a.intensity_range).view_as(on)
            shift = on * ((self._rand(b).to(x) * 2 - 1) * a.intensity_range).view_as(on)
            x = x * scale + shift
        if a.noise_prob > 0:
            on = (self._rand(b) < a.noise_prob).to(x.device, x.dtype).view(b, *([1] * (x.ndim - 1)))
            noise = torch.randn(x.shape, generator=self.generator).to(x) * a.noise_std
            x = x + on * noise
        return x


