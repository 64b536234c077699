"""One entry point from a path (MedMNIST ``.npz`` or datalist JSON) to train/val/test MONAI datasets."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset
from monai.data.meta_obj import MetaObj
from monai.utils.enums import MetaKeys, SpaceKeys, TraceKeys

from medimb.data.datalist import read_datalist
from medimb.data.errors import DataError
from medimb.data.medmnist import load_medmnist
from medimb.data.transforms import Augmentation, Preprocessing, build_eval_transforms, build_train_transforms

#: class names of the MedMNIST files we benchmark on (from the MedMNIST ``INFO`` labels)
MEDMNIST_CLASS_NAMES = {
    "adrenalmnist3d": ["normal", "hyperplasia"],
    "breastmnist": ["malignant", "normal_or_benign"],
}
CACHE_MODES = ("memory", "disk", "none")

logger = logging.getLogger(__name__)


def _numpy_array_globals() -> list:
    """What pickle needs to rebuild a numeric numpy array or scalar (NIfTI header values in MetaTensor.meta):
    no object arrays."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType") and n != "ObjectDType"]
    dtypes = [d for d in dtypes if isinstance(d, type)]
    return [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar, *dtypes]


#: the only classes a disk-cache file may contain besides tensors and plain containers: a MetaTensor with
#: its meta dict (numpy header values, MONAI key enums) and the applied-operation trace Invertd needs
CACHE_SAFE_GLOBALS = [MetaTensor, MetaObj, MetaKeys, SpaceKeys, TraceKeys, *_numpy_array_globals()]


class SafePersistentDataset(PersistentDataset):
    """``PersistentDataset`` (MetaTensor tracking on, so the affine survives) that never unpickles code.

    A cache file is read with ``torch.load(weights_only=True)``, allowing only :data:`CACHE_SAFE_GLOBALS`.
    A file that fails that load for any reason (planted pickle, truncated, foreign) is deleted and the item
    recomputed from its source, with a warning; MONAI's own loader re-raises several of these errors and,
    when unrestricted unpickling is allowed, would execute whatever a planted file holds.
    """

    def __init__(self, data, transform, cache_dir) -> None:
        super().__init__(data, transform, cache_dir=cache_dir, track_meta=True, weights_only=True)

    def _cachecheck(self, item_transformed):
        if self.cache_dir is not None:
            name = self.hash_func(item_transformed).decode("utf-8") + self.transform_hash
            hashfile = self.cache_dir / f"{name}.pt"
            if hashfile.is_file():
                try:
                    with torch.serialization.safe_globals(CACHE_SAFE_GLOBALS):
                        return torch.load(hashfile, map_location="cpu", weights_only=True)
                except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, recompute it
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    logger.warning("disk cache file %s failed the safe load and is recomputed (%s)", hashfile,
                                   first[:200])
                    hashfile.unlink(missing_ok=True)
        return super()._cachecheck(item_transformed)  # computes and writes the item (no file there now)


class SequentialCacheDataset(CacheDataset):
    """``CacheDataset`` that fills its cache in the calling thread, item by item.

    MONAI fills it through a ``ThreadPool``; when an item raises (a NaN image -> :class:`DataError`) the
    pool's worker thread is not joined and keeps transforming the next item while the error reaches the
    user. When the process then exits, that daemon thread is stopped in the middle of a torch call and the
    C++ runtime aborts (SIGABRT, exit 134, "terminate called without an active exception") after the
    one-line error was printed. With ``num_workers=0`` the pool had one thread anyway, so nothing is lost.
    """

    def __init__(self, data, transform) -> None:
        super().__init__(data, transform, cache_rate=1.0, num_workers=0, progress=False)

    def _fill_cache(self, indices=None) -> list:
        if self.cache_num <= 0:
            return []
        return [self._load_cache_item(i) for i in (range(self.cache_num) if indices is None else indices)]


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
        augmentation=Augmentation(on_batch=True),
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


#: world axis (0 R-L, 1 A-P, 2 S-I) of each axcode letter
_WORLD_AXIS = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}


def default_nifti_preprocessing(
    train_items: Sequence[dict], spatial_size: Sequence[int], slices: int | None = None, orientation: str = "RAS"
) -> Preprocessing:
    """Defaults for a datalist at network input ``spatial_size``: reoriented to ``orientation``, spacing fitted
    so the largest training field of view fills the grid, z-score, edge-replicating crop/pad to
    ``spatial_size``, flips + small affine + intensity jitter + noise.

    ``spatial_size`` is in the axis order of ``orientation``; the network's default comes from
    ``medimb.networks.backbone_defaults`` (``medimb.training.config.preprocessing_for`` passes it). 2.5D
    (``slices=K``): the first two entries are the in-plane size, and a slab of K adjacent slices along the third
    axis, at native slice spacing, becomes the first spatial axis of the network input ``(C, K, X, Y)``.
    """
    images = train_items[0]["image"]
    size = tuple(int(s) for s in spatial_size)
    try:
        world = [_WORLD_AXIS[c] for c in orientation.upper()]
    except KeyError:
        world = []
    if sorted(world) != [0, 1, 2] or not 2 <= len(size) <= 3 or (len(size) == 2 and not slices):
        raise ValueError(f"orientation {orientation!r} and spatial_size {size} are not a 3D axis order "
                         "(2 in-plane entries only with slices)")
    size_ras = [1, 1, 1]  # an axis without a size (the slab's, 2.5D) keeps its native spacing below
    for axis, n in zip(world, size):
        size_ras[axis] = n
    pixdim_ras = infer_pixdim([item["image"][0] for item in train_items], tuple(size_ras))
    pixdim = tuple(pixdim_ras[axis] for axis in world)
    if slices:
        size = (*size[:2], int(slices))
        pixdim = (*pixdim[:2], 0.0)  # keep native slice spacing: K adjacent acquired slices
    return Preprocessing(
        source="nifti",
        in_channels=len(images),
        spatial_dims=3,
        spatial_size=size,
        orientation=orientation.upper(),
        pixdim=pixdim,
        intensity="zscore",
        pad_mode="edge",
        slices=slices,
        augmentation=Augmentation(intensity_prob=0.3, noise_prob=0.2),
    )


#: an image with fewer voxels than this along a spatial axis carries no usable spatial information
MIN_IMAGE_SIZE = 4
MAX_SIZE_WARNINGS = 10


def _image_shape(path: str) -> tuple[int, ...] | None:
    try:
        shape = tuple(int(s) for s in nib.load(path).shape[:3])
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the loading transform, with its name
        return None
    return shape + (1,) * (3 - len(shape))


def warn_small_images(items: dict[str, list[dict]], network_size: Sequence[int],
                      min_size: int = MIN_IMAGE_SIZE) -> list[str]:
    """Log a warning for every datalist image smaller than ``min_size`` voxels along a spatial axis (NIfTI
    headers only) and return the messages. Such a scan is stretched to ``network_size`` by resampling and
    crop/pad, so the network gets a near-constant volume: the run stays valid, the case is useless."""
    net = "x".join(map(str, network_size))
    found = []
    for split, split_items in items.items():
        for index, item in enumerate(split_items):
            for path in item["image"]:
                shape = _image_shape(path)
                if shape is not None and min(shape) < min_size:
                    name = item.get("case") or item.get("subject")
                    who = f"{split} case {name}" if name else f"{split} item {index}"
                    size = "x".join(map(str, shape))
                    found.append(f"{who} ({Path(path).name}) is {size} voxels, smaller than {min_size} along an "
                                 f"axis: stretched to the {net} network input it carries no spatial detail; check "
                                 "its conversion or leave it out")
    for message in found[:MAX_SIZE_WARNINGS]:
        logger.warning("small image: %s", message)
    if len(found) > MAX_SIZE_WARNINGS:
        logger.warning("small image: %d more images smaller than %d voxels along an axis",
                       len(found) - MAX_SIZE_WARNINGS, min_size)
    return found


def load_splits(
    path: str | Path,
    preprocessing: Preprocessing | dict | Callable[[list[dict]], Preprocessing] | None = None,
    cache: str = "memory",
    cache_dir: str | Path | None = None,
    spatial_size: Sequence[int] | None = None,
    slices: int | None = None,
) -> DataSplits:
    """Build the train/val/test datasets of a MedMNIST ``.npz`` or a datalist JSON.

    ``preprocessing``: a :class:`Preprocessing` or its dict (e.g. from a checkpoint) used as is, or for a
    datalist a function of its training items that returns one (training passes
    ``medimb.training.config.preprocessing_for``, the network's registered defaults); MedMNIST arrays
    otherwise get theirs from the arrays. Without it a datalist needs ``spatial_size`` (and ``slices`` for
    2.5D): :func:`default_nifti_preprocessing`. ``cache``: ``memory`` (``CacheDataset``, the
    deterministic part of the pipeline), ``disk`` (``PersistentDataset`` in ``cache_dir``, meta kept) or
    ``none``. MedMNIST arrays are always in memory.
    """
    # a function gives a datalist's defaults from its training items; anything else is used as is
    default_for, preprocessing = (preprocessing, None) if callable(preprocessing) else (None, preprocessing)
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
        datalist = read_datalist(path)
        items, num_classes = datalist.splits, datalist.num_classes
        # the default reads every training scan's header: only when no preprocessing (checkpoint) is given
        pre = None
        if preprocessing is None:
            if default_for is not None:
                pre = default_for(items["train"])
            elif spatial_size is not None:
                pre = default_nifti_preprocessing(items["train"], spatial_size, slices)
            else:
                raise ValueError("a datalist needs its preprocessing: pass preprocessing= (a Preprocessing, or a "
                                 "function of the training items such as medimb.training.config.preprocessing_for) "
                                 "or the network input spatial_size=")
        names = datalist.class_names
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

    if pre.source == "medmnist":
        size = tuple(int(s) for s in items["train"][0]["image"].shape[1:])
        if min(size) < MIN_IMAGE_SIZE:
            logger.warning("small image: %s holds %s images, smaller than %d voxels along an axis: too small "
                           "to classify by their spatial content", path, "x".join(map(str, size)), MIN_IMAGE_SIZE)
    else:
        warn_small_images(items, pre.spatial_size)
    train_tf, eval_tf = build_train_transforms(pre), build_eval_transforms(pre)

    def make(split_items, transform):
        if pre.source == "medmnist" or cache == "none":
            return Dataset(split_items, transform)
        if cache == "disk":
            if cache_dir is None:
                raise ValueError("cache='disk' needs cache_dir")
            return SafePersistentDataset(split_items, transform, cache_dir=str(cache_dir))
        return SequentialCacheDataset(split_items, transform)

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
