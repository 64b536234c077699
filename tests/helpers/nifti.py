"""The one NIfTI volume writer and the one datalist writer of the tests.

:func:`write_datalist` writes a MONAI-style datalist (``{"training": [...], "validation": [...],
"test": [...]}``, items ``{"image", "label", "subject"}``) and one NIfTI file per case and channel, with
paths relative to the datalist's folder, as ``medimb-prep datalist`` writes them. What differs between
callers is a parameter: classes and per-class counts (through ``labels``), channels, shapes, affine, file
layout, split assignment, image contents (a ``volume`` function: :func:`noise`, :func:`blob` or the
caller's), NaN items and lesion masks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

#: a non-orthogonal (sheared), anisotropic affine: what the bundle tests resample from
SHEARED_AFFINE = np.array([[1.5, 0.1, 0, -10], [0, 1.4, 0.1, 5], [0.05, 0, 2.5, 20], [0, 0, 0, 1]])


def write_nifti(path, data, affine=None, *, dtype=np.float32, scanner_codes: bool = False) -> Path:
    """Save ``data`` (cast to ``dtype``; ``None`` keeps it) with ``affine`` (identity by default) to ``path``.

    ``scanner_codes``: store the affine as both qform and sform with code 1 (scanner), as converters write
    oblique scans, so every reader (nibabel, ITK) uses the same geometry; otherwise nibabel's defaults.
    """
    affine = np.eye(4) if affine is None else np.asarray(affine, float)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype) if dtype is not None else np.asarray(data), affine)
    if scanner_codes:
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


# --- image contents: volume(rng, label, channels, shape) -> (image (channels, *shape), lesion mask or None)

def noise(rng: np.random.Generator, label: int, channels: int, shape) -> tuple[np.ndarray, None]:
    """Uniform [0, 1) noise, no class signal."""
    return rng.random((channels, *shape)).astype(np.float32), None


def blob(rng: np.random.Generator, label: int, channels: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """N(100, 10) noise plus a bright ball of radius ``2 + label`` near the centre, ``200 * (c + 1)``
    brighter in channel ``c``: learnable in an epoch or two. The ball is the lesion mask."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    centre = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
    mask = (np.linalg.norm(grid - centre, axis=-1) < 2 + label).astype(np.float32)
    vol = rng.normal(100, 10, (channels, *shape)).astype(np.float32)
    vol += 200 * (np.arange(channels, dtype=np.float32) + 1)[(slice(None),) + (None,) * len(shape)] * mask
    return vol, mask


# --- split assignment: splits(labels) -> {split name: item indices}

def thirds(labels: Sequence[int]) -> dict[str, list[int]]:
    """The first two thirds train; the last third is both validation and test."""
    k = 2 * len(labels) // 3
    rest = list(range(k, len(labels)))
    return {"training": list(range(k)), "validation": rest, "test": list(rest)}


def per_class_halves(labels: Sequence[int]) -> dict[str, list[int]]:
    """Per class: the first half trains, the next quarter validates, the rest tests (50/25/25, stratified)."""
    out: dict[str, list[int]] = {"training": [], "validation": [], "test": []}
    for k in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == k]
        n = len(idx)
        for j, i in enumerate(idx):
            out["training" if j < n // 2 else "validation" if j < 3 * n // 4 else "test"].append(i)
    return out


def per_class_labels(per_class: Sequence[int]) -> list[int]:
    """``(8, 4)`` -> eight 0s then four 1s."""
    return [k for k, n in enumerate(per_class) for _ in range(n)]


def write_datalist(
    root,
    labels: Sequence[int],
    *,
    channels: int = 1,
    shape: Sequence[int] = (8, 8, 6),
    shapes: Mapping[int, Sequence[int]] | None = None,
    affine=None,
    volume: Callable = noise,
    splits: Mapping[str, Sequence[int]] | Callable = thirds,
    case: str = "s{i}",
    image: str = "{case}_c{c}.nii.gz",
    subject: str | None = "sub-{i}",
    datalist: str = "datalist.json",
    image_list: bool = True,
    nan_items: Sequence[int] = (),
    masks: bool = False,
    scanner_codes: bool = False,
    extra: Mapping | None = None,
    seed: int = 0,
) -> Path:
    """Write one NIfTI per case and channel under ``root`` and the datalist ``root/datalist``; its path back.

    - ``labels``: one class index per case (``per_class_labels((8, 4))`` for per-class counts).
    - ``shape`` for every case, or ``shapes[i]`` for case ``i``; ``affine`` (identity by default).
    - ``volume(rng, label, channels, shape)``: the image contents and an optional lesion mask; one
      ``np.random.default_rng(seed)`` is drawn from case by case, so the files are the same on every run.
    - ``splits``: ``{split: case indices}`` or a function of ``labels`` giving it (default :func:`thirds`).
    - ``case``, ``image``, ``subject``: name templates; ``{i}`` is the case index, ``{label}`` its class,
      ``{j}`` its index within its class, ``{case}`` the case name and ``{c}`` the channel; ``image`` is
      relative to ``root``. ``subject=None`` writes no subject key.
    - ``datalist``: the datalist's path relative to ``root``; image paths are written relative to its folder.
    - ``image_list``: every item's ``image`` is a list; ``False`` writes one path for single-channel items.
    - ``nan_items``: cases whose first voxel is NaN in every channel.
    - ``masks``: also write ``<case>_mask.nii.gz`` next to the first channel (uint8, from ``volume``) and a
      ``mask`` key.
    - ``scanner_codes``: see :func:`write_nifti`. ``extra``: top-level keys added to the datalist.
    """
    root = Path(root)
    path = root / datalist
    rng = np.random.default_rng(seed)
    seen: dict[int, int] = {}
    items = []
    for i, label in enumerate(labels):
        j = seen.get(label, 0)
        seen[label] = j + 1
        name = case.format(i=i, label=label, j=j)
        size = tuple((shapes or {}).get(i, shape))
        data, mask = volume(rng, label, channels, size)
        if i in nan_items:
            data.reshape(channels, -1)[:, 0] = np.nan
        paths = []
        for c in range(channels):
            file = write_nifti(root / image.format(case=name, c=c, i=i, label=label, j=j), data[c], affine,
                               scanner_codes=scanner_codes)
            paths.append(os.path.relpath(file, path.parent))
        item = {"image": paths if image_list or channels > 1 else paths[0], "label": int(label)}
        if subject is not None:
            item["subject"] = subject.format(case=name, i=i, label=label, j=j)
        if masks:
            if mask is None:
                raise ValueError(f"volume {getattr(volume, '__name__', volume)} gives no lesion mask")
            first = root / image.format(case=name, c=0, i=i, label=label, j=j)
            file = write_nifti(first.parent / f"{name}_mask.nii.gz", mask, affine, dtype=np.uint8,
                               scanner_codes=scanner_codes)
            item["mask"] = os.path.relpath(file, path.parent)
        items.append(item)
    assignment = splits(labels) if callable(splits) else splits
    data = {split: [dict(items[i]) for i in idx] for split, idx in assignment.items()}
    data.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path
