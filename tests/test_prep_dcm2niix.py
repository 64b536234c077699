"""Geometry and voxels against dcm2niix on real MR data (shared Siemens series, pydicom-data files).

Both outputs are brought to RAS+ with ``nibabel.as_closest_canonical``; voxel arrays (after
scl_slope/scl_inter) must be identical and affines agree within 1e-3 mm.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from data_prep.convert import convert_archive
from helpers.dicom import add_enhanced_geometry

DCM2NIIX = Path(sys.executable).parent / "dcm2niix"
pytestmark = pytest.mark.skipif(not DCM2NIIX.exists() and shutil.which("dcm2niix") is None,
                                reason="dcm2niix not installed (pip install dcm2niix)")

#: classic MR files: native LE/BE/implicit, RLE, JPEG 2000 (lossless + lossy), JPEG-LS, Philips rescale
CLASSIC = [
    "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
    "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm",
    "MR2_UNCR.dcm", "MR2_UNCI.dcm", "MR2_J2KR.dcm", "MR2_J2KI.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm",
]
#: enhanced multi-frame MR (10 frames): native LE, big endian, RLE, JPEG 2000, JPEG-LS
ENHANCED = ["emri_small.dcm", "emri_small_big_endian.dcm", "emri_small_RLE.dcm",
            "emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm"]


def _testfile(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} not available (pip install pydicom-data)")
    return Path(path)


def _dcm2niix(src: Path, out: Path) -> nib.Nifti1Image | None:
    out.mkdir(parents=True, exist_ok=True)
    exe = str(DCM2NIIX) if DCM2NIIX.exists() else "dcm2niix"
    subprocess.run([exe, "-z", "y", "-b", "n", "-f", "ref", "-o", str(out), str(src)], check=False,
                   capture_output=True)
    ref = out / "ref.nii.gz"
    return nib.load(ref) if ref.exists() else None


def _ours(src: Path, out: Path) -> nib.Nifti1Image:
    res = convert_archive(str(src), str(out), workers=1, progress=False)
    assert res.converted == 1, [i.to_dict() for i in res.issues]
    return nib.load(out / res.rows[0]["path"])


def _assert_same(ref: nib.Nifti1Image, ours: nib.Nifti1Image) -> None:
    a, b = nib.as_closest_canonical(ref), nib.as_closest_canonical(ours)
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-3)


@pytest.mark.real_data
def test_real_siemens_series_matches_dcm2niix(shared_data, tmp_path):
    src = shared_data / "dicom" / "decubitus_hfs_t1_fl2d_sag"
    if not src.is_dir():
        pytest.skip("decubitus_hfs_t1_fl2d_sag not in shared data")
    _assert_same(_dcm2niix(src, tmp_path / "ref"), _ours(src, tmp_path / "ours"))


@pytest.mark.parametrize("name", CLASSIC)
def test_pydicom_data_mr_matches_dcm2niix(name, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(_testfile(name), src / name)
    _assert_same(_dcm2niix(src, tmp_path / "ref"), _ours(src, tmp_path / "ours"))


def _with_geometry(name: str, dst: Path, frame_slots: list[int]) -> None:
    """emri_small* files carry no functional groups (no geometry at all): add an oblique plane,
    pixel measures and per-frame positions; frame f lies at slice slot ``frame_slots[f]``."""
    ds = pydicom.dcmread(_testfile(name))
    add_enhanced_geometry(ds, frame_slots)
    dst.mkdir(parents=True)
    ds.save_as(dst / "f.dcm")


@pytest.mark.parametrize("name", ENHANCED)
def test_enhanced_multiframe_matches_dcm2niix(name, tmp_path):
    _with_geometry(name, tmp_path / "in", list(range(10)))
    _assert_same(_dcm2niix(tmp_path / "in", tmp_path / "ref"), _ours(tmp_path / "in", tmp_path / "ours"))


def test_enhanced_frames_out_of_order_sorted_by_position(tmp_path):
    # frames stored out of spatial order: we sort by position for every transfer syntax. dcm2niix
    # (v1.0.20260724) does so for native files but keeps the stored order for compressed ones.
    slots = [3, 1, 4, 0, 9, 2, 8, 5, 7, 6]
    outs = {}
    for name in ("emri_small_big_endian.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm"):
        _with_geometry(name, tmp_path / name / "in", slots)
        outs[name] = _ours(tmp_path / name / "in", tmp_path / name / "ours")
    ref = _dcm2niix(tmp_path / "emri_small_big_endian.dcm" / "in", tmp_path / "ref")
    for img in outs.values():
        _assert_same(ref, img)
    native = pydicom.dcmread(_testfile("emri_small.dcm")).pixel_array  # (frames, rows, cols)
    got = np.asanyarray(outs["emri_small_RLE.dcm"].dataobj)
    for f, slot in enumerate(slots):
        np.testing.assert_array_equal(got[:, :, slot], native[f].T)


def test_enhanced_without_geometry_is_refused(tmp_path):
    # dcm2niix converts these with a made-up spatial matrix and a warning; we refuse: silently wrong
    # geometry would propagate to every model and overlay downstream
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(_testfile("emri_small.dcm"), src / "f.dcm")
    res = convert_archive(str(src), str(tmp_path / "ours"), progress=False)
    assert res.rows == [] and [i.reason for i in res.issues] == ["missing_geometry"]


def test_truncated_file_refused_like_dcm2niix(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(_testfile("MR_truncated.dcm"), src / "f.dcm")
    assert _dcm2niix(src, tmp_path / "ref") is None  # "File not large enough to store image data"
    res = convert_archive(str(src), str(tmp_path / "ours"), progress=False)
    assert [(i.path, i.reason) for i in res.issues] == [("f.dcm", "truncated")]
