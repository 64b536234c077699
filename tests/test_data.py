"""medimb.data: datalist/MedMNIST loading, clear errors, transforms (incl. inversion), samplers."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.nifti import write_datalist, write_nifti
from helpers.paths import SHARED

from medimb.data import (
    ClassBalancedSampler,
    DataError,
    build_eval_transforms,
    check_labels,
    create_sampler,
    load_datalist,
    load_medmnist,
    load_splits,
)


def _datalist(tmp_path: Path, channels=1, labels=(0, 1, 0, 1)) -> Path:
    """Noise volumes in ``img/``, the datalist in ``lists/`` (paths ``../img/...``, relative to the datalist's
    folder); training is every case, validation the first two, test the rest."""
    n = len(labels)
    return write_datalist(tmp_path, labels, channels=channels, shape=(12, 10, 8),
                          affine=np.diag([2.0, 1.0, 1.5, 1.0]), image="img/{case}_c{c}.nii.gz",
                          datalist="lists/datalist.json", image_list=False,
                          splits={"training": range(n), "validation": range(2), "test": range(2, n)})


def test_datalist_paths_resolve_against_the_datalist_folder_not_cwd(tmp_path, monkeypatch):
    path = _datalist(tmp_path)
    monkeypatch.chdir(tmp_path / "img")  # a cwd where the relative paths would not resolve
    splits = load_datalist(path)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [4, 2, 2]
    assert all(Path(p).is_absolute() and Path(p).exists() for it in splits["train"] for p in it["image"])


def test_datalist_missing_path_is_a_clear_error(tmp_path):
    path = _datalist(tmp_path)
    data = json.loads(path.read_text())
    data["training"][1]["image"] = "../img/does_not_exist.nii.gz"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"training\[1\].*does not exist.*does_not_exist"):
        load_datalist(path)
    with pytest.raises(DataError, match="datalist does not exist"):
        load_datalist(tmp_path / "nope.json")


def test_datalist_wrong_keys_and_mismatched_channels(tmp_path):
    path = _datalist(tmp_path, channels=2)
    data = json.loads(path.read_text())
    data["test"][0]["image"] = data["test"][0]["image"][:1]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="mismatched channels"):
        load_datalist(path)
    data["test"][0] = {"img": "x", "label": 0}
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="need keys 'image' and 'label'"):
        load_datalist(path)
    del data["test"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"no \['test'\] split"):
        load_datalist(path)


def test_label_outside_range_and_one_class_split():
    with pytest.raises(DataError, match="label 3 .*outside the class range 0..1"):
        check_labels([0, 1, 3], 2, "train")
    with pytest.raises(DataError, match="label -1"):
        check_labels([0, 1, -1], 2, "val")
    with pytest.raises(DataError, match="split 'val' contains only class 1"):
        check_labels([1, 1, 1], 2, "val")
    assert check_labels(np.array([[0], [1]], np.uint8), 2, "train").tolist() == [0, 1]


def test_one_class_split_in_datalist(tmp_path):
    path = _datalist(tmp_path, labels=(1, 1, 0, 1))  # validation = first two = class 1 only
    with pytest.raises(DataError, match="split 'val' contains only class 1"):
        load_datalist(path)


def test_nan_input_is_a_clear_error(tmp_path):
    path = _datalist(tmp_path)
    img = tmp_path / "img" / "s2_c0.nii.gz"
    arr = np.ones((12, 10, 8), np.float32)
    arr[3, 3, 3] = np.nan
    arr[4, 4, 4] = np.inf
    write_nifti(img, arr)
    splits = load_splits(path, cache="none", spatial_size=(8, 8, 8))
    with pytest.raises(Exception) as info:
        splits.train_eval[2]
    chain, exc = [], info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__
    err = next(e for e in chain if isinstance(e, DataError))
    assert "s2_c0.nii.gz" in str(err) and "1 NaN and 1 Inf" in str(err)


def test_multichannel_nifti_pipeline_and_inversion(tmp_path):
    from monai.transforms import Invertd

    path = _datalist(tmp_path, channels=2)
    splits = load_splits(path, cache="memory", spatial_size=(16, 16, 16))
    pre = splits.preprocessing
    assert pre.in_channels == 2 and pre.orientation == "RAS"
    item = splits.val[0]
    assert item["image"].shape == (2, 16, 16, 16)
    # z-score per channel
    assert torch.allclose(item["image"].mean(dim=(1, 2, 3)), torch.zeros(2), atol=0.3)
    # the eval pipeline rebuilt from the plain dict inverts back to the source grid
    eval_tf = build_eval_transforms(json.loads(json.dumps(pre.to_dict())))
    src = load_datalist(path)["val"][0]
    d = eval_tf(dict(src))
    d["attention"] = d["image"][:1].clone()
    inv = Invertd(keys="attention", transform=eval_tf, orig_keys="image", nearest_interp=False)(d)
    assert tuple(inv["attention"].shape) == (1, 12, 10, 8)
    assert np.allclose(inv["attention"].affine.numpy(), nib.load(src["image"][0]).affine, atol=1e-4)


@pytest.mark.parametrize("channel_wise", [False, True])
def test_dce_phases_share_normalisation_by_default(tmp_path, channel_wise):
    """Joint statistics keep the contrast uptake between phases (the kinetics signal); per-channel ones erase it."""
    pre_phase = np.random.default_rng(1).random((12, 10, 8)).astype(np.float32) + 1.0
    for name, data in (("pre", pre_phase), ("post", 2.0 * pre_phase)):  # the post phase enhances 2x
        write_nifti(tmp_path / f"{name}.nii.gz", data)
    pre = {"in_channels": 2, "spatial_size": (12, 10, 8), "channel_wise": channel_wise}
    image = build_eval_transforms(pre)({"image": [str(tmp_path / "pre.nii.gz"), str(tmp_path / "post.nii.gz")]})["image"]
    uptake = float(image[1].mean() - image[0].mean())
    if channel_wise:
        assert abs(uptake) < 1e-4
    else:
        assert uptake > 1.0  # post still clearly brighter than pre after normalisation


def test_25d_slab_layout(tmp_path):
    path = _datalist(tmp_path)
    splits = load_splits(path, cache="none", spatial_size=(16, 16), slices=3)
    assert splits.val[0]["image"].shape == (1, 3, 16, 16)  # (C, K, X, Y): slab as the first spatial axis


@pytest.mark.parametrize("network", ["slice_pool", "slice_channels"])
def test_25d_preprocessing_from_the_registry_feeds_the_25d_backbones(tmp_path, network):
    """The one 2.5D mechanism (slices=K): a network's registered defaults give the input its backbone takes."""
    from medimb.networks import backbone_defaults, create_model
    from medimb.training.config import preprocessing_for

    defaults = backbone_defaults(network)
    assert defaults.input_layout == "2.5d"
    train = load_datalist(_datalist(tmp_path))["train"]
    pre = preprocessing_for(network, train)
    assert (pre.slices, pre.orientation) == (defaults.slices, defaults.orientation)
    image = build_eval_transforms(pre)({"image": train[0]["image"]})["image"]
    assert tuple(image.shape) == (1, defaults.slices, *defaults.default_size)  # (C, K, X, Y)
    model = create_model(network, in_channels=1, num_classes=2).eval()
    with torch.no_grad():
        assert model(image.as_tensor()[None]).shape == (1, 2)


def test_datalist_preprocessing_comes_from_the_caller(tmp_path):
    """medimb.data holds no network default: a datalist needs a size or a function giving its preprocessing."""
    from medimb.data.datasets import default_nifti_preprocessing

    path = _datalist(tmp_path)
    with pytest.raises(ValueError, match="spatial_size="):
        load_splits(path, cache="none")
    seen = []

    def defaults(train_items):
        seen.append(len(train_items))
        return default_nifti_preprocessing(train_items, (8, 8, 8))

    splits = load_splits(path, preprocessing=defaults, cache="none")
    assert seen == [4] and splits.preprocessing == load_splits(path, cache="none", spatial_size=(8, 8, 8)).preprocessing
    assert splits.num_classes == 2


def test_orientation_other_than_ras_fits_the_spacing_in_its_own_axis_order(tmp_path):
    from medimb.data.datasets import default_nifti_preprocessing

    train = load_datalist(_datalist(tmp_path))["train"]
    ras = default_nifti_preprocessing(train, (24, 20, 16))
    sar = default_nifti_preprocessing(train, (16, 20, 24), orientation="SAR")
    assert sar.orientation == "SAR" and sar.pixdim == ras.pixdim[::-1]
    image = build_eval_transforms(sar)({"image": train[0]["image"]})["image"]
    assert tuple(image.shape) == (1, 16, 20, 24)


def test_network_grid_fits_the_largest_training_field_of_view(tmp_path):
    """The spacing is fitted per axis to the largest training scan, not the first, so no scan is cropped."""
    from medimb.data.datasets import infer_pixdim

    small = str(tmp_path / "small.nii.gz")
    wide = str(tmp_path / "wide.nii.gz")  # stored LPS: its voxel axes map to R and A with flipped signs
    write_nifti(small, np.zeros((10, 10, 4)), np.diag([1.0, 1.0, 3.0, 1.0]))
    write_nifti(wide, np.zeros((20, 8, 2)), np.diag([-1.5, -1.0, 2.0, 1.0]))
    assert infer_pixdim(small, (10, 10, 6)) == (1.0, 1.0, 2.0)
    # R: max(10, 30) mm / 10; A: max(10, 8) / 10; S: max(12, 4) / 6
    assert infer_pixdim([small, wide], (10, 10, 6)) == (3.0, 1.0, 2.0)
    with pytest.raises(DataError, match="no training scans"):
        infer_pixdim([], (10, 10, 6))


def test_padding_repeats_the_scan_edge_instead_of_a_constant(tmp_path):
    """Constant 0 after z-scoring is the scan's mean: a bright slab next to a dark scan end. Datalist
    defaults pad by repeating the outermost voxels, so the padded slices equal the scan's end slices."""
    path = _datalist(tmp_path)
    splits = load_splits(path, cache="none", spatial_size=(12, 10, 8))  # grid as large as the scans
    pre = splits.preprocessing
    assert pre.pad_mode == "edge"
    pre.pixdim = (2.0, 1.0, 1.5)  # native spacing; the 8 slices are padded to 14 (3 on each side)
    pre.spatial_size = (12, 10, 14)
    image = build_eval_transforms(pre)({"image": load_datalist(path)["val"][0]["image"]})["image"]
    assert image.shape == (1, 12, 10, 14)
    assert torch.equal(image[..., 0], image[..., 3]) and torch.equal(image[..., -1], image[..., -4])
    assert not torch.equal(image[..., 3], image[..., 4])  # real slices differ (random data)
    legacy = type(pre).from_dict({k: v for k, v in pre.to_dict().items() if k != "pad_mode"})
    assert legacy.pad_mode == "constant"  # checkpoints written before pad_mode keep zero padding
    zero_padded = build_eval_transforms(legacy)({"image": load_datalist(path)["val"][0]["image"]})["image"]
    assert torch.count_nonzero(zero_padded[..., :3]) == 0


def test_channel_mismatch_with_checkpoint_preprocessing(tmp_path):
    path = _datalist(tmp_path, channels=1)
    pre = load_splits(path, cache="none", spatial_size=(8, 8, 8)).preprocessing.to_dict()
    pre["in_channels"] = 3
    with pytest.raises(DataError, match="1 channel.*expects 3"):
        load_splits(path, preprocessing=pre, cache="none")


@pytest.mark.parametrize("num_replicas", [1, 3])
def test_class_balanced_sampler_is_uniform_disjoint_and_deterministic(num_replicas):
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    samplers = [ClassBalancedSampler(labels, num_samples=6000, num_replicas=num_replicas, rank=r, seed=7)
                for r in range(num_replicas)]
    for s in samplers:
        s.set_epoch(3)
    draws = np.concatenate([list(s) for s in samplers])
    freq = np.bincount(labels[draws], minlength=3) / draws.size
    assert np.all(np.abs(freq - 1 / 3) < 0.02), freq
    assert list(samplers[0]) == list(samplers[0])  # same epoch -> same draws
    samplers[0].set_epoch(4)
    assert list(samplers[0]) != list(ClassBalancedSampler(labels, 6000, num_replicas, 0, seed=7))
    if num_replicas > 1:  # ranks take disjoint positions of one shared sequence
        ref_s = ClassBalancedSampler(labels, 6000 * num_replicas, seed=7)
        ref_s.set_epoch(3)
        ref = list(ref_s)
        assert list(samplers[1]) == ref[1::num_replicas]


def test_instance_sampler_covers_every_item_once():
    s = create_sampler("instance", [0, 1] * 10, seed=1)
    s.set_epoch(2)
    assert sorted(s) == list(range(20))


@pytest.mark.real_data
def test_medmnist_files_load_with_official_splits():
    path = SHARED / "medmnist" / "adrenalmnist3d.npz"
    if not path.exists():
        pytest.skip(f"MedMNIST data not found at {path}")
    arrays = load_medmnist(path)
    assert arrays["train"].images.shape == (1188, 1, 28, 28, 28)
    assert np.bincount(arrays["test"].labels).tolist() == [229, 69]
    splits = load_splits(SHARED / "medmnist" / "breastmnist.npz")
    assert splits.class_counts == [147, 399]
    x = splits.test[0]["image"]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_medmnist_bad_files(tmp_path):
    # hand-written archives, not helpers.training.tiny_npz: they are malformed on purpose
    np.savez(tmp_path / "bad.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="missing arrays"):
        load_medmnist(tmp_path / "bad.npz")
    arrays = {f"{s}_images": np.zeros((4, 4, 4), np.float32) for s in ("train", "val", "test")}
    arrays |= {f"{s}_labels": np.array([[0], [1], [0], [1]]) for s in ("train", "val", "test")}
    arrays["val_images"][0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", **arrays)
    with pytest.raises(DataError, match=r"val_images: the array contains 1 NaN and 0 Inf values"):
        load_medmnist(tmp_path / "nan.npz")


def test_case_ids_name_sessions_like_predict_and_stay_unique():
    from medimb.data.datalist import case_ids

    items = [{"image": ["sub-a/ses-1/sub-a_ses-1_s003-dyn_phase-00.nii.gz"], "subject": "sub-a", "session": "ses-1"},
             {"image": ["sub-a/ses-1/sub-a_ses-1_s005-dyn_phase-00.nii.gz"], "subject": "sub-a", "session": "ses-1"},
             {"image": ["x/scan one.nii.gz"]}, {"image": ["y.nii"], "case": "given"}]
    assert case_ids(items) == ["sub-a_ses-1", "sub-a_ses-1_2", "scan_one", "given"]
