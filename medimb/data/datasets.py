"""One entry point from a path (MedMNIST ``.npz`` or datalist JSON) to train/val/test MONAI datasets."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import CacheDataset, Dataset, PersistentDataset

from medimb.data.datalist import load_datalist
from medimb.data.errors import DataError
from medimb.data.medmnist import load_medmnist
from medimb.data.transforms import Augmentation, Preprocessing, build_eval_transforms, build_train_transforms

#: class names of the MedMNIST files we benchmark on (from the MedMNIST ``INFO`` labels)
MEDMNIST_CLASS_NAMES = {
    "adrenalmnist3d": ["normal", "hyperplasia"],
    "breastmnist": ["malignant", "normal_or_benign"],
}
CACHE_MODES = ("memory", "disk", "none")


@dataclass
class DataSplits:
    """Datasets of the official splits; items are ``{"image": (C, *S) float tensor, "label": int, ...}``.

    ``train`` applies augmentation; ``train_eval`` is the training split without it (stage-2 tau search,
    embeddings); ``labels[split]`` is (N,) int64.
    """

    train: Dataset
    train_eval: Dataset
    val: Dataset
    test: Dataset
    labels: dict[str, np.ndarray]
    num_classes: int
    class_names: list[str]
    preprocessing: Preprocessing

    @property
    def class_counts(self) -> list[int]:
        """Training items per class, (K,)."""
        return np.bincount(self.labels["train"], minlength=self.num_classes).tolist()


def is_medmnist(path: str | Path) -> bool:
    return Path(path).suffix == ".npz"


def _medmnist_preprocessing(images: np.ndarray) -> Preprocessing:
    """Defaults for (N, C, *S) uint8 arrays: scale to [0, 1]; flips and a small affine applied per batch."""
    spatial = tuple(int(s) for s in images.shape[2:])
    return Preprocessing(
        source="medmnist",
        in_channels=int(images.shape[1]),
        spatial_dims=len(spatial),
        spatial_size=spatial,
        orientation=None,
        pixdim=None,
        intensity="scale255",
        augmentation=Augmentation(flip_prob=0.5, affine_prob=0.3, on_batch=True),
    )


def _field_of_view(image_path: str) -> tuple[float, float, float]:
    """Extent in mm of the scan along the R, A, S world axes (NIfTI header only, no voxel data read)."""
    img = nib.load(image_path)
    shape = img.shape[:3]
    zooms = img.header.get_zooms()[:3]
    ornt = nib.orientations.io_orientation(img.affine)
    extent = [0.0, 0.0, 0.0]
    for vox_axis, (world_axis, _) in enumerate(ornt):
        extent[int(world_axis)] = shape[vox_axis] * float(zooms[vox_axis])
    return tuple(extent)


def infer_pixdim(image_paths: str | Sequence[str], spatial_size: tuple[int, ...]) -> tuple[float, ...]:
    """Spacing (mm, RAS axis order) at which the largest field of view among ``image_paths`` fills
    ``spatial_size``, axis by axis.

    Reads NIfTI headers only. Used as the default so that every whole scan, not a central crop, reaches the
    network: fitting to one scan (say the first) crops any scan with a larger field of view along some axis,
    and a lesion near its edge can then fall outside the network input altogether.
    """
    paths = [image_paths] if isinstance(image_paths, (str, Path)) else list(image_paths)
    if not paths:
        raise DataError("no training scans to fit the network grid's spacing to")
    extent = np.max([_field_of_view(str(p)) for p in paths], axis=0)
    return tuple(round(float(e) / s, 4) for e, s in zip(extent, spatial_size))


def default_nifti_preprocessing(
    train_items: Sequence[dict], spatial_size: tuple[int, ...] = (64, 64, 64), slices: int | None = None
) -> Preprocessing:
    """Defaults for a datalist: RAS, spacing fitted so the largest training field of view fills the grid,
    z-score, edge-replicating crop/pad to ``spatial_size``, flips + small affine + intensity jitter + noise."""
    images = train_items[0]["image"]
    size = tuple(spatial_size)
    if slices:
        size = (*size[:2], int(slices))
    pixdim = infer_pixdim([item["image"][0] for item in train_items], tuple(spatial_size))
    if slices:
        pixdim = (*pixdim[:2], 0.0)  # keep native slice spacing: K adjacent acquired slices
    return Preprocessing(
        source="nifti",
        in_channels=len(images),
        spatial_dims=3,
        spatial_size=size,
        orientation="RAS",
        pixdim=pixdim,
        intensity="zscore",
        pad_mode="edge",
        slices=slices,
        augmentation=Augmentation(flip_prob=0.5, affine_prob=0.3, intensity_prob=0.3, noise_prob=0.2),
    )


def _datalist_class_names(path: Path, num_classes: int) -> list[str]:
    data = json.loads(path.read_text())
    names = data.get("class_names") or data.get("labels")
    if isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return names
    if isinstance(names, dict):
        try:
            by_index = {int(v): str(k) for k, v in names.items()}
            if sorted(by_index) == list(range(num_classes)):
                return [by_index[i] for i in range(num_classes)]
        except (TypeError, ValueError):
            pass
    return [str(i) for i in range(num_classes)]


def load_splits(
    path: str | Path,
    preprocessing: Preprocessing | dict | None = None,
    cache: str = "memory",
    cache_dir: str | Path | None = None,
    spatial_size: tuple[int, ...] | None = None,
    slices: int | None = None,
) -> DataSplits:
    """Build the train/val/test datasets of a MedMNIST ``.npz`` or a datalist JSON.

    ``preprocessing`` (e.g. from a checkpoint) overrides the data-derived defaults; ``spatial_size`` and
    ``slices`` adjust the defaults for datalists. ``cache``: ``memory`` (``CacheDataset``, the
    deterministic part of the pipeline), ``disk`` (``PersistentDataset`` in ``cache_dir``, meta kept) or
    ``none``. MedMNIST arrays are always in memory.
    """
    path = Path(path)
    if cache not in CACHE_MODES:
        raise ValueError(f"unknown cache mode {cache!r}; choose from {CACHE_MODES}")
    if is_medmnist(path):
        arrays = load_medmnist(path)
        num_classes = int(max(a.labels.max() for a in arrays.values())) + 1
        pre = _medmnist_preprocessing(arrays["train"].images)
        items = {s: [{"image": img, "label": int(lab)} for img, lab in zip(a.images, a.labels)] for s, a in arrays.items()}
        flag = path.stem.split("_")[0].lower()
        names = MEDMNIST_CLASS_NAMES.get(flag) or [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            names = [str(i) for i in range(num_classes)]
    elif path.suffix == ".json":
        items = load_datalist(path)
        declared = json.loads(path.read_text()).get("num_classes")
        num_classes = declared if isinstance(declared, int) else max(it["label"] for s in items.values() for it in s) + 1
        # the default reads every training scan's header: only when no preprocessing (checkpoint) is given
        pre = None if preprocessing is not None else default_nifti_preprocessing(
            items["train"], spatial_size or (64, 64, 64), slices)
        names = _datalist_class_names(path, num_classes)
    else:
        raise DataError(f"--data must be a MedMNIST .npz file or a datalist .json, got {path}")
    if preprocessing is not None:
        pre = preprocessing if isinstance(preprocessing, Preprocessing) else Preprocessing.from_dict(preprocessing)
    if pre.source == "medmnist" and not is_medmnist(path):
        raise DataError(f"{path}: preprocessing is for MedMNIST arrays but the data is a datalist")
    first = items["train"][0]["image"]
    n_channels = first.shape[0] if pre.source == "medmnist" else len(first)
    if n_channels != pre.in_channels:
        raise DataError(f"{path}: data has {n_channels} channel(s), the preprocessing expects {pre.in_channels}")

    train_tf, eval_tf = build_train_transforms(pre), build_eval_transforms(pre)

    def make(split_items, transform):
        if pre.source == "medmnist" or cache == "none":
            return Dataset(split_items, transform)
        if cache == "disk":
            if cache_dir is None:
                raise ValueError("cache='disk' needs cache_dir")
            return PersistentDataset(split_items, transform, cache_dir=str(cache_dir), track_meta=True, weights_only=False)
        return CacheDataset(split_items, transform, cache_rate=1.0, num_workers=0, progress=False)

    labels = {s: np.asarray([it["label"] for it in v], dtype=np.int64) for s, v in items.items()}
    missing = sorted(set(range(num_classes)) - set(labels["train"].tolist()))
    if missing:
        raise DataError(
            f"{path}: class(es) {missing} of the class range 0..{num_classes - 1} have no training items; "
            "labels must be consecutive class indices starting at 0"
        )
    return DataSplits(
        train=make(items["train"], train_tf),
        train_eval=make(items["train"], eval_tf),
        val=make(items["val"], eval_tf),
        test=make(items["test"], eval_tf),
        labels=labels,
        num_classes=num_classes,
        class_names=names,
        preprocessing=replace(pre),
    )
