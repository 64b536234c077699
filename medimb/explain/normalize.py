"""Scaling attention maps to [0, 1], so that 1 means most attended.

Two scales: :func:`minmax_per_volume` (each map stretched to [0, 1]: what the explainers return) and a
scale calibrated once per method on the raw maps of other cases (:func:`calibrate_scale`, the validation
split in ``medimb explain``) and applied to every case (:func:`scale_calibrated`), so a case with little
attention stays low instead of being stretched.

MONAI's ``monai.visualize.default_normalizer`` maps (min, max) to (1, 0), i.e. it *inverts* maps;
every method in :mod:`medimb.explain` uses these instead.
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


#: calibrated scale: 1 = the peak of the strongest validation cases (this percentile of their peak values)
CALIBRATION_PEAK_PERCENTILE = 95.0
#: calibrated scale: 0 = the typical floor (median over validation cases of each map's 1st percentile)
CALIBRATION_FLOOR_PERCENTILE = 1.0


def map_statistics(raw_map, floor_percentile: float = CALIBRATION_FLOOR_PERCENTILE) -> tuple[float, float]:
    """``(peak, floor)`` of one raw map (any shape): its maximum and its ``floor_percentile``-th percentile,
    what :func:`scale_from_statistics` needs of each calibration case."""
    flat = torch.as_tensor(raw_map).detach().float().flatten().cpu()
    if flat.numel() > 16_000_000:  # torch.quantile's limit
        flat = flat[torch.linspace(0, flat.numel() - 1, 16_000_000).long()]
    return float(flat.max()), float(torch.quantile(flat, floor_percentile / 100.0))


def scale_from_statistics(statistics,
                          peak_percentile: float = CALIBRATION_PEAK_PERCENTILE) -> tuple[float, float]:
    """One ``(lo, hi)`` from the ``(peak, floor)`` of each calibration case (:func:`map_statistics`)."""
    statistics = list(statistics)
    if not statistics:
        raise ValueError("a calibrated scale needs at least one map")
    peaks = torch.tensor([p for p, _ in statistics], dtype=torch.float64)
    floors = torch.tensor([f for _, f in statistics], dtype=torch.float64)
    hi = float(torch.quantile(peaks, peak_percentile / 100.0))
    lo = float(floors.median())
    return lo, max(hi, lo)


def calibrate_scale(raw_maps, peak_percentile: float = CALIBRATION_PEAK_PERCENTILE,
                    floor_percentile: float = CALIBRATION_FLOOR_PERCENTILE) -> tuple[float, float]:
    """One ``(lo, hi)`` for a method from its raw (unscaled) maps over calibration cases (validation).

    ``hi`` is the ``peak_percentile``-th percentile of the cases' peak values, ``lo`` the median of each
    map's ``floor_percentile``-th percentile: :func:`scale_calibrated` then maps a case as strong as the
    strongest validation cases to 1 and leaves a case with little attention low, where the per-volume
    min-max would stretch every case to [0, 1].

    Args:
        raw_maps: iterable of raw maps (tensors or arrays, any shape), one per case.
    """
    return scale_from_statistics([map_statistics(m, floor_percentile) for m in raw_maps], peak_percentile)


def scale_calibrated(maps: torch.Tensor, lo: float, hi: float, eps: float = 1e-12) -> torch.Tensor:
    """``(maps - lo) / (hi - lo)`` clipped to [0, 1]: the same scale for every case (``hi <= lo``: zeros)."""
    maps = torch.as_tensor(maps).float()
    if hi - lo <= eps:
        return torch.zeros_like(maps)
    return ((maps - lo) / (hi - lo)).clamp(0.0, 1.0)
