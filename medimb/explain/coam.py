"""COAM: feature-correlation attention from the last convolutional feature map.

Luo et al. (MICCAI 2019) define the attention of location ``i`` as its mean correlation with every
location's feature vector, ``A_i = mean_j <f_i, f_j>``. By linearity this equals
``<f_i, mean_j f_j>``, so it costs O(N*C) (one mean and one dot product per location) instead of
building the N x N correlation matrix. No gradients and no class weights are involved.

:class:`MultiScaleCOAM` (method ``coam_ms``) computes the same COAM on the feature maps of the network's last
``levels`` resolution levels (``model.forward_stages``: one forward pass, e.g. 24x24x16 and 12x12x8 for a 48x48x32
input to the two-stage ``cpunet``), upsamples each to the input grid and fuses them by their geometric mean: a
voxel scores high only where the coarse, class-relevant level and the finer level agree, and the finer level puts
the peak on a grid of half the cell size (docs/explain_methods.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .normalize import minmax_per_volume


def coam_from_features(feature_map: torch.Tensor, cosine: bool = False) -> torch.Tensor:
    """Raw COAM on the feature-map grid.

    Args:
        feature_map: ``(B, C, *S')`` last conv feature map (ReLU applied).
        cosine: L2-normalise each location's feature vector first, so the map measures direction
            agreement only (a location with a zero vector gets attention 0).
    Returns:
        ``(B, 1, *S')`` attention ``A_i = <f_i, mean_j f_j>`` (unscaled).
    """
    b, c = feature_map.shape[:2]
    spatial = feature_map.shape[2:]
    f = feature_map.reshape(b, c, -1).float()  # (B, C, N)
    if cosine:
        f = F.normalize(f, dim=1, eps=1e-12)
    mean_vec = f.mean(dim=2, keepdim=True)  # (B, C, 1)
    attention = (f * mean_vec).sum(dim=1, keepdim=True)  # (B, 1, N)
    return attention.reshape(b, 1, *spatial)


def upsample_to(maps: torch.Tensor, spatial_size) -> torch.Tensor:
    """Linear (bi/trilinear) upsampling of ``(B, 1, *S')`` maps to ``(B, 1, *spatial_size)``."""
    spatial_size = tuple(int(s) for s in spatial_size)
    if tuple(maps.shape[2:]) == spatial_size:
        return maps
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial_size)]
    return F.interpolate(maps, size=spatial_size, mode=mode, align_corners=False)


class COAM:
    """Feature-correlation attention map for a model following the medimb model contract.

    ``model.forward_features(x)`` must return the last conv feature map with ReLU applied.

    Example::

        coam = COAM(model)
        heat = coam(x)  # x: (B, C, D, H, W) -> (B, 1, D, H, W) in [0, 1], 1 = most attended
    """

    def __init__(self, model: torch.nn.Module, cosine: bool = False) -> None:
        self.model = model
        self.cosine = cosine

    def compute_map(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` input -> ``(B, 1, *S')`` raw attention on the feature-map grid."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                fmap = self.model.forward_features(x)
        finally:
            self.model.train(was_training)
        return coam_from_features(fmap, cosine=self.cosine)

    def raw_map(self, x: torch.Tensor, class_idx: int | None = None) -> torch.Tensor:
        """``(B, C, *S)`` -> ``(B, 1, *S)`` unscaled attention upsampled to the input grid (for a scale
        shared across cases, :func:`medimb.explain.normalize.calibrate_scale`); ``class_idx`` is ignored."""
        return upsample_to(self.compute_map(x), x.shape[2:])

    def __call__(self, x: torch.Tensor, class_idx: int | None = None) -> torch.Tensor:
        """``(B, C, *S)`` -> ``(B, 1, *S)`` attention in [0, 1]; ``class_idx`` is ignored (class-free)."""
        return minmax_per_volume(self.raw_map(x))


def multiscale_coam_from_stages(stage_maps, spatial_size, levels: int = 2) -> torch.Tensor:
    """Fused COAM of the last ``levels`` feature maps, on the input grid.

    Args:
        stage_maps: the feature maps per resolution level, finest first (``model.forward_stages(x)``), each
            ``(B, C_l, *S_l)`` with ReLU applied.
        spatial_size: the input grid ``S`` the maps are upsampled to (trilinear).
        levels: how many of the last levels to fuse (>= 1; all when the network has fewer).
    Returns:
        ``(B, 1, *S)`` geometric mean over the levels of their raw COAM ``A_i = <f_i, mean_j f_j>`` (>= 0 for
        ReLU features), unscaled, so a scale calibrated across cases still applies.
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    chosen = list(stage_maps)[-levels:]
    log_sum = None
    for fmap in chosen:
        # clamp: the product of non-negative maps; a zero anywhere in one level vetoes that voxel
        level = upsample_to(coam_from_features(fmap), spatial_size).clamp_min(0.0)
        logged = torch.log(level + 1e-12)
        log_sum = logged if log_sum is None else log_sum + logged
    return torch.exp(log_sum / len(chosen))


class MultiScaleCOAM:
    """COAM fused over the last ``levels`` resolution levels of the backbone (method ``coam_ms``).

    ``model.forward_stages(x)`` must return the feature map at the end of each resolution level, finest first
    (:meth:`medimb.networks.model.ImbalanceClassifier.forward_stages`); costs one forward pass, like COAM.

    Example::

        heat = MultiScaleCOAM(model)(x)  # x: (B, C, D, H, W) -> (B, 1, D, H, W) in [0, 1]
    """

    def __init__(self, model: torch.nn.Module, levels: int = 2) -> None:
        self.model = model
        self.levels = int(levels)
        if self.levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")

    def raw_map(self, x: torch.Tensor, class_idx: int | None = None) -> torch.Tensor:
        """``(B, C, *S)`` -> ``(B, 1, *S)`` unscaled fused attention on the input grid; ``class_idx`` is ignored.
        ``ValueError`` when the model does not expose its resolution levels."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                stages = self.model.forward_stages(x)
        except (AttributeError, NotImplementedError) as exc:
            raise ValueError(f"coam_ms needs a network that exposes its feature maps per resolution level "
                             f"(cpunet, plain_cnn, resnet*): {exc}") from exc
        finally:
            self.model.train(was_training)
        return multiscale_coam_from_stages([s.float() for s in stages], x.shape[2:], self.levels)

    def __call__(self, x: torch.Tensor, class_idx: int | None = None) -> torch.Tensor:
        """``(B, C, *S)`` -> ``(B, 1, *S)`` attention in [0, 1]; ``class_idx`` is ignored (class-free)."""
        return minmax_per_volume(self.raw_map(x))
