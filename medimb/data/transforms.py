"""MONAI dictionary transform pipelines for 3D MRI, 2.5D input and MedMNIST arrays.

Everything a pipeline needs is in one plain ``preprocessing`` dict (see :class:`Preprocessing`), which
training stores in the checkpoint so that evaluation and explanation preprocess exactly as training
did. The NIfTI evaluation pipeline keeps MetaTensor tracking on, so ``monai.transforms.Invertd`` can map
a network-grid output (e.g. an attention map) back through crop/pad, spacing and orientation to the
source grid::

    pre = checkpoint["preprocessing"]
    eval_tf = build_eval_transforms(pre)
    data = eval_tf({"image": "/path/scan.nii.gz"})
    ...
    Invertd(keys="attention", transform=eval_tf, orig_keys="image", nearest_interp=False)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    Transposed,
)

from medimb.validation import check_channels, check_finite
from medimb.data.errors import DataError

INTENSITY_MODES = ("zscore", "percentile", "scale255", "none")


@dataclass
class Augmentation:
    """Training-time augmentation; each ``*_prob`` is the probability per item (0 disables)."""

    flip_prob: float = 0.5  # per spatial axis
    affine_prob: float = 0.3
    rotate_range: float = 0.15  # radians, each axis
    scale_range: float = 0.1  # +-10 %
    intensity_prob: float = 0.0  # shift and scale of intensities
    intensity_range: float = 0.1
    noise_prob: float = 0.0
    noise_std: float = 0.05
    on_batch: bool = False  # apply to whole batches on the device (medimb.data.BatchAugmentation), not per item


@dataclass
class Preprocessing:
    """How raw images become network input. ``asdict`` of this goes into the checkpoint.

    source: ``"nifti"`` (datalist of files) or ``"medmnist"`` (in-memory uint8 arrays).
    spatial_size: network input size after crop/pad, in the axis order of ``orientation``; with ``slices=K``
    its last entry is K. Required, keyword only: a network's default size is registered with it
    (``medimb.networks.backbone_defaults``; ``medimb.training.config.preprocessing_for`` applies it).
    pad_mode: how crop/pad fills voxels beyond the scan: ``"edge"`` repeats the outermost voxels (the
    default for datalists: after z-scoring, a constant 0 is the scan's mean intensity, and the step from
    dark background or the end slice to that value is an artificial edge that features and attention
    maps latch on to) or any other ``ResizeWithPadOrCrop`` mode, e.g. ``"constant"`` (zeros, the
    behaviour of checkpoints that predate this field).
    pixdim: target voxel spacing in mm (None keeps the native grid; an entry <= 0 keeps that axis). orientation: axcodes, e.g. ``"RAS"``.
    intensity: ``zscore``, ``percentile`` (``percentiles`` -> [0, 1]), ``scale255`` (uint8 -> [0, 1]) or ``none``.
    channel_wise: normalise each channel with its own statistics. Off by default: the channels
    medimb-prep produces are DCE phases of one scan, and the class signal is how intensity *changes*
    between phases (wash-in, wash-out); per-phase statistics would scale that change away. Turn it on
    for unrelated modalities as channels (e.g. T1 + T2 + FLAIR).
    slices: 2.5D input: a slab of K adjacent slices (last, slice axis after reorientation) is cut and
    moved to the first spatial axis, (C, X, Y, K) -> (C, K, X, Y), the layout the 2.5D networks of
    :mod:`medimb.networks` take (``slice_channels`` stacks the K slices as channels, ``slice_pool`` runs a
    2D encoder per slice).
    channels: what each input channel is, as the datalist names them (its ``"channels"``, e.g.
    ``("phase-00", ..., "phase-03")``; ``medimb.training.config.preprocessing_for`` records them), so that
    ``medimb predict`` can assemble the same channels from a new study; None when unknown (hand-written
    datalists without ``"channels"``, checkpoints written before this field).
    """

    source: str = "nifti"
    in_channels: int = 1
    spatial_dims: int = 3
    spatial_size: tuple[int, ...] = field(kw_only=True)
    orientation: str | None = "RAS"
    pixdim: tuple[float, ...] | None = None
    intensity: str = "zscore"
    pad_mode: str = "constant"
    channel_wise: bool = False
    percentiles: tuple[float, float] = (0.5, 99.5)
    slices: int | None = None
    augmentation: Augmentation = field(default_factory=Augmentation)
    channels: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> Preprocessing:
        d = dict(d)
        aug = Augmentation(**d.pop("augmentation", {}) or {})
        for key in ("spatial_size", "pixdim", "percentiles", "channels"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d, augmentation=aug)


class CheckImaged(MapTransform):
    """Raise :class:`DataError` on NaN/Inf or a channel count other than ``channels`` (C, *S input)."""

    def __init__(self, keys: KeysCollection, channels: int | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            where = _describe(img)
            check_finite(img, where)
            if self.channels is not None:
                check_channels(img, self.channels, where)
        return d


class SafeLoadImaged(LoadImaged):
    """``LoadImaged`` (a list of files becomes the channel axis) whose failures name the file."""

    def __call__(self, data, reader=None):
        try:
            return super().__call__(data, reader)
        except Exception as exc:  # noqa: BLE001 - re-raised as one clear line naming the input
            names = data.get(self.keys[0]) if isinstance(data, Mapping) else data
            raise DataError(f"cannot load {names}: {exc}".replace("\n", " ")) from exc


def _describe(img) -> str:
    meta = getattr(img, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return f"image {name}" if name else "image"


def _intensity(pre: Preprocessing) -> list:
    if pre.intensity == "zscore":
        return [NormalizeIntensityd(keys="image", channel_wise=pre.channel_wise)]
    if pre.intensity == "percentile":
        lo, hi = pre.percentiles
        return [ScaleIntensityRangePercentilesd("image", lo, hi, 0.0, 1.0, clip=True, channel_wise=pre.channel_wise)]
    if pre.intensity == "scale255":
        return [ScaleIntensityRanged("image", 0.0, 255.0, 0.0, 1.0)]
    if pre.intensity == "none":
        return []
    raise ValueError(f"unknown intensity mode {pre.intensity!r}; choose from {INTENSITY_MODES}")


def _as_pre(preprocessing: Preprocessing | Mapping) -> Preprocessing:
    return preprocessing if isinstance(preprocessing, Preprocessing) else Preprocessing.from_dict(preprocessing)


def _deterministic(pre: Preprocessing) -> list:
    """Load, check, reorient, resample, normalise, crop/pad (all invertible where geometric)."""
    if pre.source == "medmnist":
        return [
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
            CheckImaged(keys="image", channels=pre.in_channels),
            *_intensity(pre),
        ]
    if pre.source != "nifti":
        raise ValueError(f"unknown preprocessing source {pre.source!r}")
    tf: list = [
        SafeLoadImaged(keys="image", ensure_channel_first=True, image_only=True),
        EnsureTyped(keys="image", dtype=torch.float32),
        CheckImaged(keys="image", channels=pre.in_channels),
    ]
    if pre.orientation:
        tf.append(Orientationd(keys="image", axcodes=pre.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if pre.pixdim:
        tf.append(Spacingd(keys="image", pixdim=pre.pixdim, mode="bilinear"))
    tf += _intensity(pre)
    tf.append(ResizeWithPadOrCropd(keys="image", spatial_size=pre.spatial_size, mode=pre.pad_mode))
    return tf


def _final(pre: Preprocessing) -> list:
    # Transposed is invertible, so Invertd maps 2.5D outputs back onto the (X, Y, K) slab too
    return [Transposed(keys="image", indices=(0, 3, 1, 2))] if pre.slices else []


def _augmentation(pre: Preprocessing) -> list:
    a = pre.augmentation
    nd = pre.spatial_dims
    tf: list = []
    if a.flip_prob > 0:
        tf += [RandFlipd(keys="image", prob=a.flip_prob, spatial_axis=ax) for ax in range(nd)]
    if a.affine_prob > 0:
        tf.append(
            RandAffined(
                keys="image",
                prob=a.affine_prob,
                rotate_range=[a.rotate_range] * (1 if nd == 2 else 3),
                scale_range=[a.scale_range] * nd,
                # the same fill beyond the scan as crop/pad: border voxels, unless zeros were chosen
                padding_mode="zeros" if pre.pad_mode == "constant" else "border",
                mode="bilinear",
            )
        )
    if a.intensity_prob > 0:
        tf.append(RandScaleIntensityd(keys="image", factors=a.intensity_range, prob=a.intensity_prob))
        tf.append(RandShiftIntensityd(keys="image", offsets=a.intensity_range, prob=a.intensity_prob))
    if a.noise_prob > 0:
        tf.append(RandGaussianNoised(keys="image", prob=a.noise_prob, std=a.noise_std))
    return tf


def build_eval_transforms(preprocessing: Preprocessing | Mapping) -> Compose:
    """Deterministic pipeline: dict item ``{"image": path(s) or (C, *S) array}`` -> network input.

    For ``source="nifti"`` the output image is a MetaTensor (C, *spatial_size) whose applied operations
    let ``Invertd`` undo the 2.5D transpose, crop/pad, spacing and orientation.
    """
    pre = _as_pre(preprocessing)
    return Compose([*_deterministic(pre), *_final(pre)])


def build_train_transforms(preprocessing: Preprocessing | Mapping) -> Compose:
    """:func:`build_eval_transforms` plus random augmentation (before the 2.5D transpose); with
    ``augmentation.on_batch`` the augmentation is left to :class:`medimb.data.BatchAugmentation`.

    The random part starts at the first ``Randomizable`` transform, so ``CacheDataset`` caches the
    deterministic part only.
    """
    pre = _as_pre(preprocessing)
    per_item = [] if pre.augmentation.on_batch else _augmentation(pre)
    tf = [*_deterministic(pre), *per_item, *_final(pre)]
    if pre.source == "medmnist":
        # arrays arrive as plain tensors; keep them plain after augmentation (no meta needed)
        tf.append(EnsureTyped(keys="image", dtype=torch.float32, track_meta=False))
    return Compose(tf)


