"""The uncompressed fast path (pixels read at the offset found by the scan) equals pydicom's pixel_array."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from data_prep.headers import FileHeader, read_header
from data_prep.pixels import read_frames


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                                  "MR_small_expb.dcm", "MR_small_padded.dcm", "emri_small_big_endian.dcm"])
def test_native_fast_path_matches_pydicom(name, tmp_path):
    src = get_testdata_file(name, download=False)
    if src is None:
        pytest.skip(f"{name} not available")
    shutil.copy(src, tmp_path / "f.dcm")
    head = read_header(str(tmp_path / "f.dcm"), str(tmp_path))
    assert isinstance(head, FileHeader) and head.frames[0].pixel is not None
    (got,) = read_frames(str(tmp_path), [head.frames])
    want = pydicom.dcmread(tmp_path / "f.dcm").pixel_array
    np.testing.assert_array_equal(got, want.reshape(got.shape))
    assert got.dtype.isnative


def test_high_bits_above_bits_stored_are_masked_like_pydicom(tmp_path, dicom_series):
    dicom_series(tmp_path, shape=(4, 6, 1))
    (path,) = list(tmp_path.iterdir())
    ds = pydicom.dcmread(path)
    ds.PixelData = (np.arange(24, dtype=np.uint16).reshape(4, 6) | 0xF000).tobytes()  # BitsStored 12
    ds.save_as(path)
    head = read_header(str(path), str(tmp_path))
    (got,) = read_frames(str(tmp_path), [head.frames])
    np.testing.assert_array_equal(got[0], pydicom.dcmread(path).pixel_array)
    assert got.max() == 23


def test_compressed_files_use_pydicom(tmp_path):
    shutil.copy(get_testdata_file("MR_small_RLE.dcm", download=False), tmp_path / "f.dcm")
    head = read_header(str(tmp_path / "f.dcm"), str(tmp_path))
    assert head.frames[0].pixel is None
    (got,) = read_frames(str(tmp_path), [head.frames])
    np.testing.assert_array_equal(got[0], pydicom.dcmread(tmp_path / "f.dcm").pixel_array)
