"""Overlays land on the source scan's grid: affine and shape as SimpleITK (and so 3D Slicer) reads
them, and a bright point planted at a known world coordinate comes back there within one voxel."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers.explain import oblique_affine
from helpers.nifti import write_nifti
from helpers.paths import SHARED

from medimb.data.transforms import Preprocessing, build_eval_transforms
from medimb.explain.export import invert_to_source, threshold_region, write_heatmap, write_label
from medimb.explain.normalize import minmax_per_volume

REAL_SERIES = SHARED / "dicom" / "decubitus_hfs_t1_fl2d_sag"


def identity_explainer(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, *S) -> (B, 1, *S)``: the preprocessed image itself, so a planted point propagates."""
    return minmax_per_volume(x[:, :1])


def explain_identity(source: Path, pre: Preprocessing, out: Path) -> Path:
    transform = build_eval_transforms(pre)
    data = transform({"image": [str(source)]})
    heat = identity_explainer(data["image"].as_tensor()[None])[0]
    back = invert_to_source(heat, data, transform)
    write_heatmap(out, back / max(float(back.max()), 1e-12), source)
    return out


def assert_same_geometry(source: Path, overlay: Path) -> None:
    a, b = sitk.ReadImage(str(source)), sitk.ReadImage(str(overlay))
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(nib.load(str(source)).affine, nib.load(str(overlay)).affine, atol=1e-4)


def assert_peak_at(overlay: Path, world_lps: np.ndarray, network_spacing=None) -> None:
    """The overlay's maximum lies within one voxel of the LPS world point.

    On the native grid (no resampling) that is one source voxel per axis. When preprocessing
    resamples to a coarser grid, a point can only be resolved to one *network* voxel, so the check is
    then a world distance of at most the largest network spacing.
    """
    image = sitk.ReadImage(str(overlay))
    array = sitk.GetArrayFromImage(image)  # (k, j, i)
    peak = np.array(np.unravel_index(int(array.argmax()), array.shape)[::-1])
    if network_spacing is None:
        expected = np.array(image.TransformPhysicalPointToContinuousIndex([float(v) for v in world_lps]))
        assert np.all(np.abs(peak - expected) <= 1.0 + 1e-3), (peak, expected)
    else:
        found = np.array(image.TransformIndexToPhysicalPoint([int(v) for v in peak]))
        assert np.linalg.norm(found - world_lps) <= max(network_spacing) + 1e-3, (found, world_lps)


@pytest.mark.parametrize("pixdim", [None, (1.5, 1.5, 1.5)], ids=["native", "resampled"])
@pytest.mark.parametrize("flip", [False, True], ids=["oblique", "oblique_flipped"])
def test_oblique_anisotropic_overlay_matches_source(tmp_path, flip, pixdim):
    affine = oblique_affine(spacing=(0.8, 1.1, 3.0))
    if flip:  # LPS-like storage: first two axes run the other way
        affine = affine @ np.diag([-1.0, -1.0, 1.0, 1.0])
    shape = (40, 30, 12)
    volume = np.random.default_rng(0).random(shape).astype(np.float32) * 0.1
    ijk = (23, 11, 5)
    volume[ijk] = 10.0
    source = tmp_path / "oblique.nii.gz"
    write_nifti(source, volume, affine, scanner_codes=True)
    world_ras = (affine @ np.array([*ijk, 1.0]))[:3]
    # the native grid after RAS reorientation is at most 40 voxels per axis: no voxel is cropped
    pre = Preprocessing(spatial_size=(40, 40, 40), pixdim=pixdim, intensity="percentile",
                        percentiles=(0.0, 100.0))
    overlay = explain_identity(source, pre, tmp_path / "oblique_identity.nii.gz")
    assert_same_geometry(source, overlay)
    assert nib.load(str(overlay)).get_data_dtype() == np.float32
    assert_peak_at(overlay, world_ras * np.array([-1.0, -1.0, 1.0]), pixdim)


def test_label_map_is_uint8_on_source_grid(tmp_path):
    affine = oblique_affine()
    source = tmp_path / "src.nii.gz"
    write_nifti(source, np.zeros((6, 5, 4)), affine, scanner_codes=True)
    heat = np.linspace(0, 1, 120).reshape(6, 5, 4).astype(np.float32)
    write_label(tmp_path / "src_coam_label.nii.gz", threshold_region(heat, 0.5), source)
    label = nib.load(str(tmp_path / "src_coam_label.nii.gz"))
    assert label.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(label.dataobj))) == {0, 1}
    assert_same_geometry(source, tmp_path / "src_coam_label.nii.gz")
    with pytest.raises(ValueError, match="source grid"):
        write_heatmap(tmp_path / "bad.nii.gz", np.zeros((5, 5, 4)), source)
    assert not (tmp_path / "bad.nii.gz").exists()


def convert_real_series(out_dir: Path) -> Path:
    """The real series converted to NIfTI by ``medimb-prep convert`` (the archive is a copy)."""
    archive, converted = out_dir / "archive", out_dir / "converted"
    shutil.copytree(REAL_SERIES, archive / "series", ignore=shutil.ignore_patterns("*.md", "LICENSE*"))
    done = subprocess.run([sys.executable, "-m", "data_prep", "convert", str(archive), str(converted)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = sorted(converted.rglob("*.nii.gz"))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def real_series_nifti(tmp_path_factory) -> Path:
    if not REAL_SERIES.is_dir():
        pytest.skip(f"real DICOM series not found at {REAL_SERIES}")
    return convert_real_series(tmp_path_factory.mktemp("real_series"))


@pytest.mark.real_data
@pytest.mark.slow
@pytest.mark.parametrize("pixdim", [None, (4.0, 4.0, 4.0)], ids=["native", "resampled"])
def test_real_series_overlay_matches_source(tmp_path, pixdim, real_series_nifti):
    source = real_series_nifti
    image = nib.load(str(source))
    volume = np.asarray(image.dataobj, dtype=np.float32)
    # plant a point well inside the head, away from the crop border
    ijk = tuple(int(s * f) for s, f in zip(volume.shape[:3], (0.55, 0.4, 0.6)))
    volume[ijk] = volume.max() * 20
    planted = tmp_path / "planted.nii.gz"
    # not helpers.nifti.write_nifti: the copy keeps the real scanner header (codes, units, pixdim) as it is
    out = nib.Nifti1Image(volume, None, header=image.header.copy())
    out.set_qform(image.get_qform(), int(image.header["qform_code"]))
    out.set_sform(image.get_sform(), int(image.header["sform_code"]))
    nib.save(out, str(planted))
    size = (64, 64, 64) if pixdim else (40, 256, 256)  # native: sagittal 35 x 256 x 256, padded only
    pre = Preprocessing(spatial_size=size, pixdim=pixdim, intensity="percentile", percentiles=(0.0, 100.0))
    overlay = explain_identity(planted, pre, tmp_path / "planted_identity.nii.gz")
    assert_same_geometry(planted, overlay)
    assert_same_geometry(source, overlay)
    world_ras = (image.affine @ np.array([*ijk, 1.0]))[:3]
    assert_peak_at(overlay, world_ras * np.array([-1.0, -1.0, 1.0]), pixdim)
