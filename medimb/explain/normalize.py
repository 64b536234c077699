"""Per-volume min-max scaling of attention maps, so that 1 means most attended.

MONAI's ``monai.visualize.default_normalizer`` maps (min, max) to (1, 0), i.e. it *inverts* maps;
every method in :mod:`medimb.explain` uses :func:`minmax_per_volume` instead.
"""

from __future__ import annotations

import torch


def minmax_per_volume(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each map in a batch linearly to [0, 1] (min -> 0, max -> 1).

    Args:
        maps: ``(B, 1, *S)`` (or ``(B, *S)``) raw maps, high = attended.
    Returns:
        A float tensor of the same shape; a constant map becomes all zeros (nothing stands out).
    """
    maps = torch.as_tensor(maps).float()
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = hi - lo
    scaled = torch.where(span > eps, (flat - lo) / span.clamp_min(eps), torch.zeros_like(flat))
    return scaled.reshape(maps.shape)
