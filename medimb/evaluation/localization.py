"""How well an attention map localises a lesion whose mask is known (weakly supervised localisation).

All functions take a map and a mask on the **same voxel grid** (e.g. both on the source scan's grid)
with the grid's voxel-to-world ``affine`` (4 x 4, mm), so distances are in millimetres whatever the
voxel spacing or orientation.

- :func:`pointing_game`: is the map's maximum inside the lesion? (Zhang et al., ECCV 2016)
- :func:`centre_of_mass_distance_mm`: distance from the map's centre of mass (over the voxels at or
  above ``threshold``, weighted by the map) to the lesion's centroid.
- :func:`dice_of_threshold`: Dice between ``map >= threshold`` and the lesion (MONAI ``compute_dice``).
- :func:`peak_on_border`: does the map peak on the scan's outer faces? A diagnostic, not a score: a
  map that peaks there more often than the faces' share of the volume responds to the field-of-view
  edge (e.g. padding) rather than anatomy.
- :func:`summarize_scores` / :func:`summarize_by_label`: those scores over many cases, and per true class. The
  pointing game of a classifier's maps means most over the lesions of the class the maps explain (the
  malignant ones): a benign mass is not what a malignancy detector's evidence should sit on.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_dice

DEFAULT_THRESHOLD = 0.5


def _check(heat: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    heat, mask = np.asarray(heat, dtype=np.float64), np.asarray(mask) > 0
    if heat.shape != mask.shape:
        raise ValueError(f"map {heat.shape} and mask {mask.shape} must be on the same grid")
    if not mask.any():
        raise ValueError("the lesion mask is empty")
    if not np.isfinite(heat).all():
        raise ValueError("the map contains NaN or Inf")
    return heat, mask


def _to_world(ijk: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``(N, 3)`` voxel coordinates -> ``(N, 3)`` world mm."""
    affine = np.asarray(affine, dtype=np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def peak_voxel(heat: np.ndarray) -> tuple[int, ...]:
    """Index of the map's maximum (the first one if several voxels tie)."""
    heat = np.asarray(heat)
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(heat)), heat.shape))


def peak_on_border(heat: np.ndarray) -> bool:
    """``(*S)`` map -> True when its maximum lies on the first or last index of any axis."""
    heat = np.asarray(heat)
    return any(i in (0, n - 1) for i, n in zip(peak_voxel(heat), heat.shape))


def pointing_game(heat: np.ndarray, mask: np.ndarray) -> bool:
    """``(*S)`` map and ``(*S)`` mask -> True when the map's maximum lies inside the mask."""
    heat, mask = _check(heat, mask)
    return bool(mask[peak_voxel(heat)])


def centre_of_mass_mm(weights: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World position (mm, ``(3,)``) of the weighted centre of mass of a non-negative ``(*S)`` array."""
    weights = np.asarray(weights, dtype=np.float64)
    total = weights.sum()
    if total <= 0:
        raise ValueError("nothing to take the centre of mass of (all weights are zero)")
    ijk = np.stack(np.nonzero(weights), axis=1).astype(np.float64)
    centre = (ijk * weights[weights != 0][:, None]).sum(axis=0) / total
    return _to_world(centre[None], affine)[0]


def centre_of_mass_distance_mm(heat: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                               threshold: float = DEFAULT_THRESHOLD) -> float:
    """Distance in mm between the map's centre of mass and the lesion centroid.

    The map's centre of mass is taken over voxels with ``heat >= threshold`` (weighted by ``heat``), so a
    diffuse low background does not pull it towards the middle of the volume; ``threshold=0`` uses the
    whole map. Maps are expected in [0, 1] (max 1), so the region is never empty for ``threshold <= 1``.
    """
    heat, mask = _check(heat, mask)
    weights = np.where(heat >= threshold, heat, 0.0)
    lesion_centre = centre_of_mass_mm(mask.astype(float), affine)
    return float(np.linalg.norm(centre_of_mass_mm(weights, affine) - lesion_centre))


def dice_of_threshold(heat: np.ndarray, mask: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> float:
    """Dice between the region ``heat >= threshold`` and the lesion mask (``(*S)`` each)."""
    heat, mask = _check(heat, mask)
    pred = torch.as_tensor(heat >= threshold, dtype=torch.float32)[None, None]
    truth = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    return float(compute_dice(pred, truth, include_background=True)[0, 0])


def localization_scores(heat: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                        threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """``{"pointing_game": 0/1, "com_distance_mm": float, "dice": float, "peak_on_border": 0/1}`` for one
    map and lesion."""
    return {
        "pointing_game": float(pointing_game(heat, mask)),
        "peak_on_border": float(peak_on_border(heat)),
        "com_distance_mm": centre_of_mass_distance_mm(heat, mask, affine, threshold),
        "dice": dice_of_threshold(heat, mask, threshold),
    }


def summarize_scores(scores: list[dict]) -> dict:
    """Per-case :func:`localization_scores` -> ``{"cases", "hits", "pointing_game", "com_distance_mm_median",
    "dice_median"}`` (``hits``: maps whose peak lies in the lesion)."""
    if not scores:
        raise ValueError("no scores to summarise")
    hits = int(sum(s["pointing_game"] for s in scores))
    return {"cases": len(scores), "hits": hits, "pointing_game": hits / len(scores),
            "com_distance_mm_median": float(np.median([s["com_distance_mm"] for s in scores])),
            "dice_median": float(np.median([s["dice"] for s in scores]))}


def summarize_by_label(scores: list[dict], labels: list[int | None]) -> dict[str, dict]:
    """:func:`summarize_scores` per true class label (keys ``"0"``, ``"1"``, ...; cases without a label left out)."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    groups: dict[int, list[dict]] = {}
    for score, label in zip(scores, labels):
        if label is not None:
            groups.setdefault(int(label), []).append(score)
    return {str(label): summarize_scores(groups[label]) for label in sorted(groups)}
