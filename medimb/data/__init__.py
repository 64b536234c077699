"""medimb.data: datasets (MedMNIST ``.npz``, MONAI datalists of NIfTI), transform pipelines, samplers."""

from medimb.data.batch_augment import BatchAugmentation
from medimb.validation import check_channels, check_finite, check_labels
from medimb.data.datalist import load_datalist
from medimb.data.datasets import DataSplits, SafePersistentDataset, SequentialCacheDataset, load_splits
from medimb.data.errors import DataError
from medimb.data.medmnist import load_medmnist
from medimb.data.samplers import ClassBalancedSampler, create_sampler
from medimb.data.transforms import (
    Augmentation,
    Preprocessing,
    build_eval_transforms,
    build_train_transforms,
)

__all__ = [
    "Augmentation",
    "BatchAugmentation",
    "ClassBalancedSampler",
    "DataError",
    "DataSplits",
    "Preprocessing",
    "SafePersistentDataset",
    "SequentialCacheDataset",
    "build_eval_transforms",
    "build_train_transforms",
    "check_channels",
    "check_finite",
    "check_labels",
    "create_sampler",
    "load_datalist",
    "load_medmnist",
    "load_splits",
]
